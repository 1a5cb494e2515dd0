"""Numba softmax pieces, rows in parallel: shift by the row max, (numpy's SIMD exp, called by the op),
normalize; the attention variant scales and masks while shifting. A scalar libm exp per element
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
def masked_shift_kernel(scores, scale, codes, lowest, causal_fill):
    """s = where(code == 1, scores * scale, fill) minus its row max, per row of (B, H, Tq, Tk);
    codes (Bc, Hc, Tq, Tk) int8 with Bc in {1, B}, Hc in {1, H}: 1 allowed, 0 -> lowest, 2 -> causal_fill.
    The op then takes numpy's SIMD exp and normalize_rows."""
    B, H, Tq, Tk = scores.shape
    Bc, Hc = codes.shape[0], codes.shape[1]
    p = np.empty_like(scores)
    for r in prange(B * H * Tq):
        b = r // (H * Tq)
        h = (r // Tq) % H
        i = r % Tq
        cb = b if Bc > 1 else 0
        ch = h if Hc > 1 else 0
        m = lowest
        for j in range(Tk):
            c = codes[cb, ch, i, j]
            if c == 1:
                s = scores[b, h, i, j] * scale
            elif c == 0:
                s = lowest
            else:
                s = causal_fill
            p[b, h, i, j] = s
            m = max(m, s)
        for j in range(Tk):
            p[b, h, i, j] -= m
    return p


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def normalize_rows(e):
    """e[n] /= sum(e[n]), in place, rows of a 2-D array"""
    N, V = e.shape
    for n in prange(N):
        s = e[n, 0] * 0
        for j in range(V):
            s += e[n, j]
        for j in range(V):
            e[n, j] /= s


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def masked_softmax_backward_kernel(dp, p, scale, codes):
    """ds = where(code == 1, p (dp - sum(dp p)), 0) * scale"""
    B, H, Tq, Tk = p.shape
    Bc, Hc = codes.shape[0], codes.shape[1]
    ds = np.empty_like(p)
    for r in prange(B * H * Tq):
        b = r // (H * Tq)
        h = (r // Tq) % H
        i = r % Tq
        cb = b if Bc > 1 else 0
        ch = h if Hc > 1 else 0
        s = 0.0
        for j in range(Tk):
            s += dp[b, h, i, j] * p[b, h, i, j]
        for j in range(Tk):
            if codes[cb, ch, i, j] == 1:
                ds[b, h, i, j] = p[b, h, i, j] * (dp[b, h, i, j] - s) * scale
            else:
                ds[b, h, i, j] = 0.0
    return ds
