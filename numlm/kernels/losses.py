"""Numba cross-entropy: the loss and its gradient in one parallel pass over the logits, row by row
(a row of the vocabulary stays in cache from its max to its gradient): softmax_row, then scaled."""
import numpy as np
from numba import njit, prange

from . import adaptive
from .layernorm import FAST
from .softmax import softmax_row


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def cross_entropy_kernel(x, t, valid, c):
    """losses[n] = lse(x[n]) - x[n, t[n]],  d[n] = c (softmax(x[n]) - onehot(t[n]));  0 and 0 where not valid[n]
    x: (N, V), t: (N) -> losses (N), d (N, V)"""
    N, V = x.shape
    d = np.empty_like(x)
    losses = np.zeros(N, dtype=x.dtype)
    for n in prange(N):
        if valid[n]:
            losses[n] = cross_entropy_row(x[n], t[n], c, d[n])
        else:
            d[n, :] = 0
    return losses, d


@njit(cache=True, fastmath=FAST, error_model="numpy")
def cross_entropy_row(x, t, c, d):
    """d = c (softmax(x) - onehot(t));  -> lse(x) - x[t] = m + log(s) - x[t]   (the op's NumPy lines)"""
    m, s = softmax_row(x, d)
    for j in range(x.size):
        d[j] *= c
    d[t] -= c
    return m + np.log(s) - x[t]
