"""Embedding lookup; its backward is a scatter-add of the output gradient into the table rows."""
import numpy as np

from ._check import float_array, ids_in_range
from .. import kernels
from ..kernels.embedding import embedding_scatter_add


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


def embedding_backward(dout, cache):
    """forward: out[n] = weight[ids[n]];  so  dweight[v] = sum over n with ids[n] == v of dout[n]
    dout: (N, C)  ->  dweight: (V, C)  (row padding_idx stays zero)"""
    ids, shape, dtype, padding_idx = cache
    flat_ids = ids.reshape(-1).astype(np.int64, copy=False)
    flat_d = np.ascontiguousarray(dout.reshape(-1, shape[1]), dtype=dtype)
    if kernels.numba_enabled():
        dweight = embedding_scatter_add(flat_ids, flat_d, shape[0])
    else:
        dweight = np.zeros(shape, dtype=dtype)
        np.add.at(dweight, flat_ids, flat_d)
    if padding_idx is not None:
        dweight[padding_idx] = 0
    return dweight
