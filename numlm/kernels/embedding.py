"""Numba scatter-add for the embedding backward; channels split across threads so no row races."""
import numpy as np
from numba import njit, prange

from . import adaptive


@adaptive
@njit(cache=True, parallel=True)
def embedding_scatter_add(ids, dout, V):
    N, C = dout.shape
    dweight = np.zeros((V, C), dtype=dout.dtype)
    nchunk = min(C, 8)
    step = (C + nchunk - 1) // nchunk
    for k in prange(nchunk):
        lo = k * step
        hi = min(C, lo + step)
        for n in range(N):
            v = ids[n]
            for c in range(lo, hi):
                dweight[v, c] += dout[n, c]
    return dweight
