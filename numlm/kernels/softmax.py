"""Numba softmax pieces, rows in parallel: shift by the row max, (numpy's SIMD exp, called by the op),
normalize; attention's scale-and-mask of the scores (and of their gradient). A scalar libm exp per element
cost ~4x (no SVML here)."""
import numpy as np
from numba import njit, prange

from . import adaptive

from .layernorm import FAST


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def shift_rows(x):
    """m[n] = max_j x[n, j];  e[n, j] = x[n, j] - m[n]"""
    N, V = x.shape
    e = np.empty_like(x)
    m = np.empty(N, dtype=x.dtype)
    for n in prange(N):
        mx = x[n, 0]
        for j in range(1, V):
            mx = max(mx, x[n, j])
        m[n] = mx
        for j in range(V):
            e[n, j] = x[n, j] - mx
    return e, m


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def softmax_backward_rows(dy, y):
    N, V = y.shape
    dx = np.empty_like(y)
    for n in prange(N):
        s = 0.0
        for j in range(V):
            s += dy[n, j] * y[n, j]
        for j in range(V):
            dx[n, j] = y[n, j] * (dy[n, j] - s)
    return dx


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def scale_mask_kernel(s, scale, codes, lowest, causal_fill):
    """s = where(code == 1, s * scale, where(code == 0, lowest, causal_fill)), in place, per row of
    (B, H, Tq, Tk); codes (Bc, Hc, Tq, Tk) int8 with Bc in {1, B}, Hc in {1, H}."""
    B, H, Tq, Tk = s.shape
    Bc, Hc = codes.shape[0], codes.shape[1]
    for r in prange(B * H * Tq):
        b = r // (H * Tq)
        h = (r // Tq) % H
        i = r % Tq
        cb = b if Bc > 1 else 0
        ch = h if Hc > 1 else 0
        for j in range(Tk):
            c = codes[cb, ch, i, j]
            if c == 1:
                s[b, h, i, j] *= scale
            elif c == 0:
                s[b, h, i, j] = lowest
            else:
                s[b, h, i, j] = causal_fill


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def normalize_rows(e):
    """sums[n] = sum(e[n]);  e[n] /= sums[n], in place, rows of a 2-D array.  -> sums (N,)"""
    N, V = e.shape
    sums = np.empty(N, dtype=e.dtype)
    for n in prange(N):
        s = e[n, 0] * 0
        for j in range(V):
            s += e[n, j]
        for j in range(V):
            e[n, j] /= s
        sums[n] = s
    return sums
