"""Multi-head scaled dot-product attention with transformers' masking semantics.

A masked score is set to the dtype's most negative finite value (transformers adds
finfo.min, which absorbs any finite score), so a query row with no allowed key gets a uniform
distribution over all keys rather than NaN. OpenAI GPT instead replaces future scores by -1e4
(`causal_fill=-1e4`), so its left-padded queries attend uniformly to the future real tokens.

The kernel path skips the keys no query sees (visible_forward): the masked future of causal
attention (the queries go in blocks, each multiplying only the keys up to its last query), and a
padded batch row's keys after its last real one. Exact where every query has a key it may see: the
skipped scores are finfo.min below that key's, so their probabilities are exactly 0. The
probabilities stay (B, H, Tq, Tk), zeros where skipped, as the full path gives them.
"""
import math
from typing import NamedTuple

import numpy as np

from ._check import float_array
from .. import kernels
from ..kernels.matmul import mm, mm_pair  # a @ b, the B*H products split across the cores
from ..kernels.matmul import mm_visible, mm_from_visible, mm_t_from_visible
from ..kernels.softmax import masked_softmax_kernel, masked_softmax_backward_kernel, attention_rows_kernel
from .activations import dropout_forward
from .softmax import softmax_forward, softmax_backward

# mask codes per (query, key): 1 allowed, 0 masked (finfo.min), 2 future key in OpenAI style (-1e4)
MASKED, ALLOWED, FUTURE = 0, 1, 2
# the kernel path's causal query blocks: about this many queries each. Smaller blocks skip more of the
# future but BLAS runs slower per multiply-add on them; with the softmax over the visible keys only,
# 32 was fastest here (attention fwd + bwd a layer at gpt-small's 8x6x256x64: 18.0 ms against 19.1 at 64
# in one run, 15.4 against 16.5 at 24 and 18.7 at 16 in another; at gpt-mini's 16x4x128x64 likewise)
BLOCK_ROWS = 32


class AttentionCache(NamedTuple):
    q: np.ndarray          # (B, H, Tq, D)
    k: np.ndarray          # (B, H, Tk, D)
    v: np.ndarray          # (B, H, Tk, D)
    probs: np.ndarray      # (B, H, Tq, Tk) softmax probabilities, before dropout
    dropped: np.ndarray    # (B, H, Tq, Tk) the probabilities after dropout, or None (no dropout)
    codes: np.ndarray      # (B|1, H|1, Tq, Tk) int8 mask codes, or None
    scale: float
    blocks: list = None    # visible_forward's query blocks [(i0, i1, j1)] (or per batch row), or None
    ends: np.ndarray = None  # (1|B, Tq) the keys each query row's softmax read (visible_forward)


def attention_allowed(attention_mask, B, Tq, Tk, causal, causal_fill=None, H=None):
    """Mask codes (Bc, Hc, Tq, Tk) int8 from a padding mask and/or causality, or None if all allowed.
    attention_mask: (B, Tk) with 1 = real token, 0 = padding; or a boolean array broadcastable to
    (B, H, Tq, Tk) saying which keys each query may see; or int8 codes this function made (returned
    as they are, so a model builds them once per forward and every layer passes them on). Causal with Tq < Tk (a KV cache) puts query i
    at absolute position Tk - Tq + i. H: the scores' heads, when known (an attention op): codes that do not
    broadcast to (B, H, Tq, Tk) are refused, the kernels index them unchecked."""
    codes = None
    if attention_mask is not None:
        m = np.asarray(attention_mask)
        if m.dtype == np.int8 and m.ndim == 4 and m.shape[2:] == (Tq, Tk):
            codes, causal = m, False  # already the codes, causality in (a model builds them once per forward)
        elif m.ndim == 2:
            if m.shape != (B, Tk):
                raise ValueError(f"attention_mask must have shape (B, T_k) = {(B, Tk)}, got {m.shape}")
            if m.dtype != np.bool_ and not np.isin(m, (0, 1)).all():
                raise ValueError("attention_mask must hold only 0 and 1")
            codes = m.astype(bool)[:, None, None, :]  # (B, 1, 1, Tk)
        elif m.ndim == 4:
            if m.dtype != np.bool_:
                raise ValueError(f"a 4-D attention_mask must be boolean, got dtype {m.dtype}")
            if m.shape[0] not in (1, B) or m.shape[2] not in (1, Tq) or m.shape[3] not in (1, Tk):
                raise ValueError(f"attention_mask of shape {m.shape} does not broadcast to "
                                 f"(B, H, T_q, T_k) = ({B}, H, {Tq}, {Tk})")
            codes = m
        else:
            raise ValueError(f"attention_mask must be (B, T_k) or 4-D boolean, got shape {m.shape}")
        if codes.dtype != np.int8:
            codes = np.broadcast_to(codes, codes.shape[:2] + (Tq, Tk)).astype(np.int8)
    if causal and Tq > 1:  # one new query over a KV cache sees every key
        future = np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + (Tk - Tq)  # (Tq, Tk)
        if codes is None:
            codes = np.ones((1, 1, Tq, Tk), dtype=np.int8)
        fill = FUTURE if causal_fill is not None else MASKED
        codes = np.where(future & (codes == ALLOWED), np.int8(fill), codes).astype(np.int8)
    if H is not None and codes is not None and (codes.shape[0] not in (1, B) or codes.shape[1] not in (1, H)):
        raise ValueError(f"attention_mask of shape {np.shape(attention_mask)} does not broadcast to "
                         f"(B, H, T_q, T_k) = ({B}, {H}, {Tq}, {Tk})")
    return codes


def scale_mask(s, scale, codes, lowest, fill):
    """s = where(allowed, s * scale, where(masked, lowest, fill)), in place on a scores array the
    caller owns (the forward's scores; with lowest = fill = 0, the backward's ds).    (B, H, Tq, Tk)
    The NumPy path's; the kernel path does it inside masked_softmax_kernel and its backward."""
    dt = s.dtype.type
    if codes is None:
        s *= dt(scale)
    else:
        s[...] = np.where(codes == ALLOWED, s * dt(scale), np.where(codes == FUTURE, dt(fill), dt(lowest)))
    return s


def mask_codes(codes, Tq, Tk):
    """the kernels' codes: every key allowed (1, 1, Tq, Tk) for None, else C-contiguous"""
    return np.ones((1, 1, Tq, Tk), np.int8) if codes is None else np.ascontiguousarray(codes)


def attention_forward(q, k, v, attention_mask=None, causal=False, scale=None, causal_fill=None,
                      dropout_p=0.0, rng=None, out=None):
    """out = dropout(softmax(q k^T * scale + M)) v,   M = 0 where allowed, finfo.min where masked
    q: (B, H, Tq, D)  k, v: (B, H, Tk, D)  attention_mask: (B, Tk) 0/1 or bool (B|1, H|1, Tq, Tk)
    -> out: (B, H, Tq, D); cache.probs (B, H, Tq, Tk) are the attention probabilities.
    out: an array of out's shape it is written into (a view of the merged (B, Tq, H, D)), returned; a
    decoding step returns its own.
    scale defaults to 1/sqrt(D); dropout on the probabilities when dropout_p > 0 (needs rng)."""
    float_array("q", q, 4)
    float_array("k", k, 4)
    float_array("v", v, 4, q=q, k=k)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if k.shape != (B, H, Tk, D) or v.shape != (B, H, Tk, D):
        raise ValueError(f"k and v must have shape (B, H, T_k, D) = ({B}, {H}, T_k, {D}) matching q "
                         f"{q.shape}, got k {k.shape} and v {v.shape}")
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs T_q <= T_k, got T_q={Tq}, T_k={Tk}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and rng is None:
        raise ValueError("attention dropout needs a numpy.random.Generator (rng)")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number (default 1/sqrt(D)), got {scale!r}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    codes = attention_allowed(attention_mask, B, Tq, Tk, causal, causal_fill, H=H)
    lowest = np.finfo(q.dtype).min
    fill = lowest if causal_fill is None else causal_fill
    if kernels.enabled and Tq == 1 and dropout_p == 0.0:  # a decoding step: one kernel, not six calls
        dt = q.dtype.type
        out, p = attention_rows_kernel(np.ascontiguousarray(q), rows_buffer(k), rows_buffer(v), Tk, dt(scale),
                                       mask_codes(codes, 1, Tk), dt(lowest), dt(fill))
        return out, AttentionCache(q, k, v, p, None, codes, scale)
    blocks = None
    if kernels.enabled and causal_fill is None:
        blocks = causal_blocks(Tq, Tk, codes) if causal else padding_blocks(codes, Tq, Tk)
    if blocks is not None:
        ends = (Tk - Tq + 1 + np.arange(Tq))[None] if causal else np.repeat([r[0][2:] for r in blocks], Tq, 1)
        return visible_forward(q, k, v, codes, scale, lowest, dropout_p, rng, blocks, ends, out)

    s = mm(q, k.swapaxes(-1, -2))  # (B, H, Tq, Tk)
    if kernels.enabled:  # the two lines below in one kernel, one pass over the scores, in place
        dt = q.dtype.type
        p = masked_softmax_kernel(s, dt(scale), mask_codes(codes, Tq, Tk), dt(lowest), dt(fill), all_keys(Tq, Tk))
    else:
        s = scale_mask(s, scale, codes, lowest, fill)
        p, _ = softmax_forward(s)  # (B, H, Tq, Tk)
    pd, keep = dropout_forward(p, dropout_p, rng)
    out = mm(pd, v, out=out)  # (B, H, Tq, D)
    return out, AttentionCache(q, k, v, p, None if keep is None else pd, codes, scale)


def rows_buffer(x):
    """The C-contiguous array whose first T rows along axis 2 x (B, H, T, D) is, when there is one (a KV
    cache Attention.after_past grows in place: a view of a larger buffer), else x in C order."""
    b = x.base
    if (b is not None and b.ndim == 4 and x.size and b.flags.c_contiguous and b.strides == x.strides
            and b.shape[:2] == x.shape[:2] and b.shape[3] == x.shape[3] and b.shape[2] >= x.shape[2]
            and np.may_share_memory(x[0, 0, 0], b[0, 0, 0])):  # x starts at b's first row (not .ctypes: 4 us)
        return b
    return np.ascontiguousarray(x)


def attention_backward(dout, cache, out=(None, None, None)):
    """dout: (B, H, Tq, D) -> dq (B, H, Tq, D), dk, dv (B, H, Tk, D)
    out: arrays (or None) of those shapes the three are written into (views of a joined [dq | dk | dv]:
    no copy into it after)"""
    if cache.blocks is not None:
        return visible_backward(dout, cache, out)
    q, k, v, p = cache.q, cache.k, cache.v, cache.probs
    pd = p if cache.dropped is None else cache.dropped
    # out = pd @ v
    dv, dpd = mm_pair(pd.swapaxes(-1, -2), dout, dout, v.swapaxes(-1, -2), out=(out[2], None))  # dv (B, H, Tk, D)
    if kernels.enabled:  # the two steps below in one kernel, one pass over the scores, in place on dpd (ours)
        codes = mask_codes(cache.codes, *p.shape[2:])
        dscores = masked_softmax_backward_kernel(dpd, p, pd, cache.dropped is not None, p.dtype.type(cache.scale),
                                                 codes, all_keys(*p.shape[2:]))
    else:
        # pd, keep = dropout_forward(p, dropout_p, rng), after p, _ = softmax_forward(s)
        ds = softmax_backward(dpd, p) if cache.dropped is None else dropout_softmax_backward(dpd, p, pd)
        # s = scale_mask(q @ k^T, scale, codes, lowest, fill): masked scores are constants, so 0
        dscores = scale_mask(ds, cache.scale, cache.codes, 0, 0)
    # q @ k^T
    dq, dk = mm_pair(dscores, k, dscores.swapaxes(-1, -2), q, out=out[:2])  # (B, H, Tq, D), (B, H, Tk, D)
    return dq, dk, dv


def dropout_softmax_backward(dpd, p, pd):
    """p = softmax(s), then pd = p * keep (dropout):  ds = p (keep dpd - sum(keep dpd p))
    = pd dpd - p sum(pd dpd), so the backward reads p and pd and no mask.
    dpd, p, pd: (B, H, Tq, Tk) -> ds (B, H, Tq, Tk), sums over the keys"""
    g = pd * dpd
    return g - p * g.sum(axis=-1, keepdims=True)


def causal_blocks(Tq, Tk, codes):
    """Query blocks [(i0, i1, j1)] of causal scores (Tq, Tk): rows i0..i1 see keys 0..j1 = Tk - Tq + i1,
    the keys after are their future. None when Tq makes one block, or when skipping the future would
    not be exact: a query with no key it may see spreads its probability over every key, the future too."""
    n = Tq // BLOCK_ROWS
    if n < 2 or not (codes == ALLOWED).any(axis=-1).all():
        return None
    return [(Tq * b // n, Tq * (b + 1) // n, Tk - Tq + Tq * (b + 1) // n) for b in range(n)]


def padding_blocks(codes, Tq, Tk):
    """Per batch row [(0, Tq, j1)]: its queries see no key after j1 (its last real key), when the rows
    end a tenth or more of the keys early in all (below that a BLAS call per row costs more than the
    products it saves), else None; None too where skipping would not be exact (a query with no
    allowed key)."""
    if codes is None or codes.shape[0] == 1 or Tq == 1:
        return None
    seen = (codes != MASKED).any(axis=(1, 2))  # (B, Tk)
    ends = Tk - np.argmax(seen[:, ::-1], axis=1)
    if 10 * ends.sum() > 9 * ends.size * Tk or not (codes == ALLOWED).any(axis=-1).all():
        return None
    return [[(0, Tq, int(j1))] for j1 in ends]


def all_keys(Tq, Tk):
    """the softmax kernels' ends when every query row reads all Tk keys"""
    return np.full((1, Tq), Tk)


def visible_forward(q, k, v, codes, scale, lowest, dropout_p, rng, blocks, ends, out=None):
    """attention_forward on the kernel path for causal or padding blocks: the same steps, each product
    over the keys its queries see, the softmax too (each row its ends): the skipped probabilities are
    exactly 0, as the full path's finfo.min scores give."""
    dt = q.dtype.type
    s = mm_visible(q, k.swapaxes(-1, -2), blocks)  # (B, H, Tq, Tk), the skipped unwritten
    # p = softmax(scale_mask(s, scale, codes, lowest, lowest)) over the keys each query sees, 0 after them
    p = masked_softmax_kernel(s, dt(scale), mask_codes(codes, *s.shape[2:]), dt(lowest), dt(lowest), ends)
    pd, keep = dropout_forward(p, dropout_p, rng)
    out = mm_from_visible(pd, v, blocks, out=out)  # (B, H, Tq, D)
    return out, AttentionCache(q, k, v, p, None if keep is None else pd, codes, scale, blocks, ends)


def visible_backward(dout, cache, out):
    """attention_backward for visible_forward's blocks, dq, dk, dv written into out's arrays where given"""
    q, k, v, p, blocks = cache.q, cache.k, cache.v, cache.probs, cache.blocks
    dq, dk, dv = out
    pd = p if cache.dropped is None else cache.dropped
    # out = pd @ v
    dv = mm_t_from_visible(pd, dout, blocks, out=dv)  # (B, H, Tk, D)
    dpd = mm_visible(dout, v.swapaxes(-1, -2), blocks)  # (B, H, Tq, Tk), the skipped unwritten
    # pd, keep = dropout_forward(p, dropout_p, rng), after p = softmax(scale_mask(s, ...)): masked and
    # future scores are constants, so 0; in place on dpd (ours)
    codes = mask_codes(cache.codes, *p.shape[2:])
    dscores = masked_softmax_backward_kernel(dpd, p, pd, cache.dropped is not None, p.dtype.type(cache.scale),
                                             codes, cache.ends)
    dq = mm_from_visible(dscores, k, blocks, out=dq)  # (B, H, Tq, D)
    dk = mm_t_from_visible(dscores, q, blocks, out=dk)  # (B, H, Tk, D)
    return dq, dk, dv
