"""Numba cross-entropy: per row the max and the shifted logits, then (numpy's SIMD exp, called by
the op in between) the sum, the probabilities and the loss. A scalar libm exp per element cost ~4x."""
import numpy as np
from numba import njit, prange

from . import adaptive
from .layernorm import FAST


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def cross_entropy_finish(e, x, m, t, valid):
    """e = exp(x - m) in place -> probabilities;  loss[n] = m + log(sum e) - x[n, t[n]]"""
    N, V = e.shape
    losses = np.zeros(N, dtype=x.dtype)
    for n in prange(N):
        s = e[n, 0] * 0
        for j in range(V):
            s += e[n, j]
        r = 1 / s
        for j in range(V):
            e[n, j] *= r
        if valid[n]:
            losses[n] = m[n] + np.log(s) - x[n, t[n]]
    return losses


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def cross_entropy_backward_kernel(probs, t, valid, c):
    N, V = probs.shape
    d = np.empty_like(probs)
    for n in prange(N):
        if valid[n]:
            for j in range(V):
                d[n, j] = probs[n, j] * c
            d[n, t[n]] -= c
        else:
            for j in range(V):
                d[n, j] = 0
    return d
