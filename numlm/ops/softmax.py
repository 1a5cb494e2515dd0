"""Softmax over the last axis, shifted by the row maximum so large inputs do not overflow.
numlm's one softmax: attention, cross-entropy and decoding all call these functions."""
import numpy as np

from ._check import float_array
from .. import kernels
from ..kernels.softmax import shift_rows, normalize_rows, softmax_backward_rows


def _exp_normalize(x):
    """y = exp(x - m) / s,  m = max(x),  s = sum(exp(x - m))    x: (N, V) -> y (N, V), m (N), s (N)"""
    if kernels.numba_enabled():
        y, m = shift_rows(x)  # (N, V) x - m
        np.exp(y, out=y)  # numpy's SIMD exp
        s = normalize_rows(y)  # y /= s in place
        return y, m, s
    m = x.max(axis=-1)
    e = np.exp(x - m[:, None])
    s = e.sum(axis=-1)
    return e / s[:, None], m, s


def softmax_forward(x):
    """y = exp(x - max(x)) / sum(exp(x - max(x)))   over the last axis
    x: (N, V) -> y: (N, V)   (caches y)"""
    float_array("x", x)
    y, _, _ = _exp_normalize(np.ascontiguousarray(x).reshape(-1, x.shape[-1]))  # (N, V)
    y = y.reshape(x.shape)
    return y, y


def softmax(x):
    """softmax_forward's y alone, for callers that do not differentiate (decoding, inference)."""
    return softmax_forward(np.ascontiguousarray(x))[0]


def softmax_backward(dy, cache):
    """forward: y = exp(x - max) / sum(exp(x - max));  so  dx_i = y_i (dy_i - sum_j dy_j y_j)"""
    y = cache
    V = y.shape[-1]
    if kernels.numba_enabled():
        dy2 = np.ascontiguousarray(dy, dtype=y.dtype).reshape(-1, V)
        return softmax_backward_rows(dy2, y.reshape(-1, V)).reshape(y.shape)
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


def softmax_lse(x):
    """y = softmax(x) and lse = log(sum(exp(x))) = m + log(s) over the last axis (cross-entropy's pair)
    x: (N, V) -> y: (N, V), lse: (N)"""
    float_array("x", x)
    y, m, s = _exp_normalize(np.ascontiguousarray(x).reshape(-1, x.shape[-1]))  # (N, V), (N,), (N,)
    return y.reshape(x.shape), (m + np.log(s)).reshape(x.shape[:-1])


def log_softmax(x):
    """log y = (x - max(x)) - log(sum(exp(x - max(x))))   over the last axis (beam search's scores)
    x: (N, V) -> (N, V)"""
    float_array("x", x)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
