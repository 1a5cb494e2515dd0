"""The two parameterised maps: the linear layer y = x W + b, and the embedding lookup E[ids] (a linear
map of one-hot rows, whose backward is a scatter-add). numlm keeps every linear weight as
(C_in, C_out), so the forward is one BLAS call, x @ W."""
import numpy as np

from ._check import float_array, ids_in_range
from .. import kernels
from ..kernels.embedding import embedding_scatter_add
from ..kernels.matmul import mm, mm_pair  # a @ b, split across the cores unless NUMLM_NUMBA=0


def linear_forward(x, w, b=None):
    """y = x W + b
    x: (N, C_in)  w: (C_in, C_out)  b: (C_out,) or None  ->  y: (N, C_out)"""
    float_array("w", w, 2)
    float_array("x", x, 1, w=w, b=b)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} input channels (shape {x.shape}) but w expects "
                         f"{w.shape[0]} (shape {w.shape})")
    if b is not None and b.shape != (w.shape[1],):
        raise ValueError(f"b must have shape ({w.shape[1]},), got {b.shape}")
    # one (N, C_in) @ (C_in, C_out) product: a stacked (B, T, C) @ W would be B smaller ones
    y = mm(x.reshape(-1, x.shape[-1]), w, b).reshape(x.shape[:-1] + (w.shape[1],))  # (N, C_out), + b
    return y, (x, w, b is not None)


def linear_backward(dy, cache, need_dw=True, need_db=True):
    """forward: y = x W + b;  so  dx = dy W^T,  dW = x^T dy (summed over N),  db = sum_N dy
    dy: (N, C_out)  ->  dx: (N, C_in), dw: (C_in, C_out), db: (C_out,) or None
    need_dw / need_db False (a frozen weight or bias) skip that gradient and return None for it."""
    x, w, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])
    if need_dw:  # dx (N, C_in) and dW (C_in, C_out), the same work: one core each
        dx, dw = mm_pair(dy2, w.T, x.reshape(-1, x.shape[-1]).T, dy2)
    else:
        dx, dw = mm(dy2, w.T), None
    dx = dx.reshape(x.shape)
    db = dy2.sum(axis=0) if has_bias and need_db else None
    return dx, dw, db


def embedding_forward(ids, weight, padding_idx=None):
    """out[n] = weight[ids[n]]
    ids: (N) ints in [0, V)  weight: (V, C)  ->  out: (N, C)
    `padding_idx` (transformers' semantics): that row is looked up normally but gets no gradient."""
    float_array("weight", weight, 2)
    ids = ids_in_range("ids", ids, weight.shape[0])
    if padding_idx is not None and not 0 <= padding_idx < weight.shape[0]:
        raise ValueError(f"padding_idx must lie in [0, {weight.shape[0]}), got {padding_idx}")
    out = weight[ids]  # (N, C)
    return out, (ids, weight.shape, weight.dtype, padding_idx)


def embedding_backward(dout, cache, out=None):
    """forward: out[n] = weight[ids[n]];  so  dweight[v] = sum over n with ids[n] == v of dout[n]
    dout: (N, C)  ->  dweight: (V, C)  (row padding_idx gets nothing: it stays zero)
    out: a (V, C) array (a layer's gradient) that dweight is added into, row by row, and returned:
    no (V, C) array of zeros made and added (row padding_idx of out is left as it is)."""
    ids, shape, dtype, padding_idx = cache
    flat_ids = ids.reshape(-1).astype(np.int64, copy=False)
    flat_d = np.ascontiguousarray(dout.reshape(-1, shape[1]), dtype=dtype)
    if out is None:
        out = np.zeros(shape, dtype=dtype)
    elif out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {shape} {dtype} array, got {out.shape} {out.dtype}")
    if kernels.enabled:
        return embedding_scatter_add(flat_ids, flat_d, out, -1 if padding_idx is None else padding_idx)
    keep = flat_ids != padding_idx
    np.add.at(out, flat_ids[keep], flat_d[keep])
    return out
