"""Multi-head scaled dot-product attention with transformers' masking semantics.

A masked score is set to the dtype's most negative finite value (transformers adds
finfo.min, which absorbs any finite score), so a query row with no allowed key gets a uniform
distribution over all keys rather than NaN. OpenAI GPT instead replaces future scores by -1e4
(`causal_fill=-1e4`), so its left-padded queries attend uniformly to the future real tokens.
"""
import math
from typing import NamedTuple

import numpy as np

from ._check import float_array, same_dtype
from .. import kernels
from ..kernels.softmax import masked_shift_kernel, normalize_rows, masked_softmax_backward_kernel

# mask codes per (query, key): 1 allowed, 0 masked (finfo.min), 2 future key in OpenAI style (-1e4)
MASKED, ALLOWED, FUTURE = 0, 1, 2


class AttentionCache(NamedTuple):
    q: np.ndarray          # (B, H, Tq, D)
    k: np.ndarray          # (B, H, Tk, D)
    v: np.ndarray          # (B, H, Tk, D)
    probs: np.ndarray      # (B, H, Tq, Tk) softmax probabilities, before dropout
    keep: np.ndarray       # (B, H, Tq, Tk) dropout keep mask scaled by 1/(1-p), or None
    codes: np.ndarray      # (B|1, H|1, Tq, Tk) int8 mask codes, or None
    scale: float


def attention_allowed(attention_mask, B, Tq, Tk, causal, causal_fill=None):
    """Mask codes (Bc, Hc, Tq, Tk) int8 from a padding mask and/or causality, or None if all allowed.
    attention_mask: (B, Tk) with 1 = real token, 0 = padding; or a boolean array broadcastable to
    (B, H, Tq, Tk) saying which keys each query may see. Causal with Tq < Tk (a KV cache) puts query i
    at absolute position Tk - Tq + i."""
    codes = None
    if attention_mask is not None:
        m = np.asarray(attention_mask)
        if m.ndim == 2:
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
        Bc, Hc = codes.shape[0], codes.shape[1]
        codes = np.broadcast_to(codes, (Bc, Hc, Tq, Tk)).astype(np.int8)
    if causal:
        future = np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + (Tk - Tq)  # (Tq, Tk)
        if codes is None:
            codes = np.ones((1, 1, Tq, Tk), dtype=np.int8)
        fill = FUTURE if causal_fill is not None else MASKED
        codes = np.where(future & (codes == ALLOWED), np.int8(fill), codes).astype(np.int8)
    return codes


def attention_forward(q, k, v, attention_mask=None, causal=False, scale=None, causal_fill=None,
                      dropout_p=0.0, rng=None):
    """out = softmax(q k^T * scale + M) v,   M = 0 where allowed, finfo.min where masked
    q: (B, H, Tq, D)  k, v: (B, H, Tk, D)  attention_mask: (B, Tk) 0/1 or bool (B|1, H|1, Tq, Tk)
    -> out: (B, H, Tq, D); cache.probs (B, H, Tq, Tk) are the attention probabilities.
    scale defaults to 1/sqrt(D); dropout on the probabilities when dropout_p > 0 (needs rng)."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        float_array(name, a, 4)
    same_dtype(q=q, k=k, v=v)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if k.shape != (B, H, Tk, D) or v.shape != (B, H, Tk, D):
        raise ValueError(f"k and v must have shape (B, H, T_k, D) = ({B}, {H}, T_k, {D}) matching q "
                         f"{q.shape}, got k {k.shape} and v {v.shape}")
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs T_q <= T_k, got T_q={Tq}, T_k={Tk}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    codes = attention_allowed(attention_mask, B, Tq, Tk, causal, causal_fill)
    if codes is not None and codes.shape[1] not in (1, H):
        raise ValueError(f"attention_mask of shape {np.shape(attention_mask)} does not broadcast to "
                         f"(B, H, T_q, T_k) = ({B}, {H}, {Tq}, {Tk})")
    lowest = np.finfo(q.dtype).min
    fill = np.finfo(q.dtype).min if causal_fill is None else causal_fill

    scores = q @ k.swapaxes(-1, -2)  # (B, H, Tq, Tk)
    if kernels.numba_enabled():
        c = codes if codes is not None else np.ones((1, 1, Tq, Tk), dtype=np.int8)
        probs = masked_shift_kernel(scores, q.dtype.type(scale), np.ascontiguousarray(c),
                                    q.dtype.type(lowest), q.dtype.type(fill))  # (B, H, Tq, Tk) s - max
        np.exp(probs, out=probs)  # numpy's SIMD exp
        normalize_rows(probs.reshape(-1, Tk))
    else:
        s = scores * q.dtype.type(scale)
        if codes is not None:
            s = np.where(codes == ALLOWED, s, np.where(codes == FUTURE, q.dtype.type(fill), lowest))
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        probs = e / e.sum(axis=-1, keepdims=True)  # (B, H, Tq, Tk)
    keep = None
    if dropout_p > 0.0:
        if rng is None:
            raise ValueError("attention dropout needs a numpy.random.Generator (rng)")
        keep = (rng.random(probs.shape, dtype=q.dtype) >= dropout_p) * q.dtype.type(1.0 / (1.0 - dropout_p))
        out = (probs * keep) @ v  # (B, H, Tq, D)
    else:
        out = probs @ v
    return out, AttentionCache(q, k, v, probs, keep, codes, scale)


def attention_backward(dout, cache):
    """forward: p = softmax(s), s = q k^T * scale (masked), out = p v;  so
    dv = p^T dout,  dp = dout v^T,  ds = p (dp - sum(dp p)) where allowed else 0,
    dq = ds k * scale,  dk = ds^T q * scale.    dout: (B, H, Tq, D) -> dq, dk, dv"""
    q, k, v, probs, keep, codes, scale = cache
    dt = q.dtype.type
    pd = probs if keep is None else probs * keep
    dv = pd.swapaxes(-1, -2) @ dout  # (B, H, Tk, D)
    dp = dout @ v.swapaxes(-1, -2)  # (B, H, Tq, Tk)
    if keep is not None:
        dp = dp * keep
    if kernels.numba_enabled():
        c = codes if codes is not None else np.ones((1, 1) + probs.shape[2:], dtype=np.int8)
        ds = masked_softmax_backward_kernel(dp, probs, dt(scale), np.ascontiguousarray(c))
    else:
        ds = probs * (dp - (dp * probs).sum(axis=-1, keepdims=True))
        if codes is not None:
            ds = np.where(codes == ALLOWED, ds, dt(0))
        ds = ds * dt(scale)
    dq = ds @ k  # (B, H, Tq, D)
    dk = ds.swapaxes(-1, -2) @ q  # (B, H, Tk, D)
    return dq, dk, dv
