"""Numba scatter-add for the embedding backward; channels split across threads so no row races."""
import numpy as np
from numba import njit, prange

from . import adaptive


def embedding_scatter_add(ids, dout, V):
    """dweight (V, C): dweight[ids[n]] += dout[n] from zeros"""
    return embedding_scatter_add_into(ids, dout, np.zeros((V, dout.shape[1]), dtype=dout.dtype), -1)


@adaptive
@njit(cache=True, parallel=True)
def embedding_scatter_add_into(ids, dout, dweight, skip):
    """dweight[ids[n]] += dout[n] in place, rows n with ids[n] == skip (a padding row) left out"""
    N, C = dout.shape
    nchunk = min(C, 8)
    step = (C + nchunk - 1) // nchunk
    for k in prange(nchunk):
        lo = k * step
        hi = min(C, lo + step)
        for n in range(N):
            v = ids[n]
            if v == skip:
                continue
            for c in range(lo, hi):
                dweight[v, c] += dout[n, c]
    return dweight
