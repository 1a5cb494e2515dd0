"""Numba cross-entropy gradient: softmax(logits) - onehot(target), scaled, per row. (The forward's
softmax and log-sum-exp are numlm.ops.softmax's.)"""
import numpy as np
from numba import njit, prange

from . import adaptive
from .layernorm import FAST


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
