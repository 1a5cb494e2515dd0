"""Softmax over the last axis, shifted by the row maximum so large inputs do not overflow."""
import numpy as np

from ._check import float_array
from .. import kernels
from ..kernels.softmax import shift_rows, normalize_rows, softmax_backward_rows


def softmax_forward(x):
    """y = exp(x - max(x)) / sum(exp(x - max(x)))   over the last axis
    x: (N, V) -> y: (N, V)"""
    float_array("x", x)
    if kernels.numba_enabled():
        V = x.shape[-1]
        y, _ = shift_rows(np.ascontiguousarray(x).reshape(-1, V))  # (N, V) x - max
        np.exp(y, out=y)  # numpy's SIMD exp
        normalize_rows(y)
        return y.reshape(x.shape), y.reshape(x.shape)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)
    return y, y


def softmax_backward(dy, cache):
    """dx_i = y_i (dy_i - sum_j dy_j y_j)   (caches y)"""
    y = cache
    if kernels.numba_enabled():
        V = y.shape[-1]
        dy2 = np.ascontiguousarray(dy, dtype=y.dtype).reshape(-1, V)
        return softmax_backward_rows(dy2, y.reshape(-1, V)).reshape(y.shape)
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))
