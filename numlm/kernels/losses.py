"""Numba cross-entropy: softmax, log-sum-exp and the picked logit in one pass per row."""
import numpy as np
from numba import njit, prange

from . import adaptive


@adaptive
@njit(cache=True, parallel=True)
def cross_entropy_kernel(x, t, valid):
    N, V = x.shape
    probs = np.empty_like(x)
    losses = np.zeros(N, dtype=x.dtype)
    for n in prange(N):
        m = x[n, 0]
        for j in range(1, V):
            if x[n, j] > m:
                m = x[n, j]
        s = 0.0
        for j in range(V):
            e = np.exp(x[n, j] - m)
            probs[n, j] = e
            s += e
        for j in range(V):
            probs[n, j] /= s
        if valid[n]:
            losses[n] = m + np.log(s) - x[n, t[n]]
    return losses, probs


@adaptive
@njit(cache=True, parallel=True)
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
                d[n, j] = 0.0
    return d
