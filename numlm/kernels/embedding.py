"""Numba scatter-add for the embedding backward; channels split across threads so no row races."""
from numba import njit, prange

from . import adaptive


@adaptive
@njit(cache=True, parallel=True)
def embedding_scatter_add(ids, dout, dweight, skip):
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
