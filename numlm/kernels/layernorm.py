"""Numba LayerNorm: one pass per row for the statistics, rows in parallel."""
import numpy as np
from numba import njit, prange

from . import adaptive

# reassociation only: lets LLVM vectorize the row sums (rounding moves by ulps, far inside the 1e-12
# parity); no nnan/ninf (masked scores are finite but inputs may not be), no FMA contraction
FAST = {"reassoc"}
# Sums, counts and constants are cast to the array's dtype, as the NumPy lines compute them: a float
# literal or an int count would turn float32 rows into float64 arithmetic (LayerNorm 3x slower).


@njit(cache=True, fastmath=FAST, error_model="numpy")
def layernorm_row(x, gamma, beta, eps, y, xhat):
    """One row (C,): y, xhat written; -> rstd"""
    dt = x.dtype.type
    C, m, v = x.size, dt(0), dt(0)
    for c in range(C):
        m += x[c]
    m /= dt(C)
    for c in range(C):
        d = x[c] - m
        v += d * d
    v /= dt(C)
    r = dt(1) / np.sqrt(v + dt(eps))
    for c in range(C):
        h = (x[c] - m) * r
        xhat[c] = h
        y[c] = h * gamma[c] + beta[c]
    return r


@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def _layernorm_forward_parallel(x, gamma, beta, eps):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta per row, xhat, rstd = 1 / sqrt(var + eps)
    x: (N, C) -> y, xhat (N, C), rstd (N)"""
    N, C = x.shape
    y, xhat, rstd = np.empty_like(x), np.empty_like(x), np.empty(N, dtype=x.dtype)
    for n in prange(N):
        rstd[n] = layernorm_row(x[n], gamma, beta, eps, y[n], xhat[n])
    return y, xhat, rstd


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _layernorm_forward_serial(x, gamma, beta, eps):
    """_layernorm_forward_parallel on the calling thread"""
    N, C = x.shape
    y, xhat, rstd = np.empty_like(x), np.empty_like(x), np.empty(N, dtype=x.dtype)
    for n in range(N):
        rstd[n] = layernorm_row(x[n], gamma, beta, eps, y[n], xhat[n])
    return y, xhat, rstd


# y, xhat, rstd = layernorm of the rows of x (N, C): rows in parallel, a few rows (a decoding step's one) serially
layernorm_forward_kernel = adaptive(_layernorm_forward_parallel, _layernorm_forward_serial)


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def layernorm_backward_kernel(dy, xhat, rstd, gamma):
    N, C = dy.shape
    dt = dy.dtype.type
    dx = np.empty_like(dy)
    # per-chunk partial sums of dgamma/dbeta, reduced after the loop (no races)
    nchunk = min(N, 64)
    pg = np.zeros((nchunk, C), dtype=dy.dtype)
    pb = np.zeros((nchunk, C), dtype=dy.dtype)
    for k in prange(nchunk):
        for n in range(k, N, nchunk):
            a, b = dt(0), dt(0)
            for c in range(C):
                g = dy[n, c] * gamma[c]
                a += g
                b += g * xhat[n, c]
            a /= dt(C)
            b /= dt(C)
            r = rstd[n]
            for c in range(C):
                dx[n, c] = r * (dy[n, c] * gamma[c] - a - xhat[n, c] * b)
                pg[k, c] += dy[n, c] * xhat[n, c]
                pb[k, c] += dy[n, c]
    return dx, pg.sum(axis=0), pb.sum(axis=0)
