"""Numba softmax, rows in parallel: one pass per row (max, exp, sum, normalise) with an exp of its own
that vectorises (numba has no SVML; a scalar libm exp per element cost ~4x numpy's SIMD np.exp, which
runs on one core); its backward; attention's scale-and-mask of the scores (and of their gradient)."""
import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import adaptive

from .layernorm import FAST


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def softmax_backward_rows(dy, y):
    N, V = y.shape
    dx = np.empty_like(y)
    for n in prange(N):
        s = y.dtype.type(0)  # a float literal would make the row's arithmetic float64 (layernorm.py)
        for j in range(V):
            s += dy[n, j] * y[n, j]
        for j in range(V):
            dx[n, j] = y[n, j] * (dy[n, j] - s)
    return dx


@njit(inline="always")
def masked_score(x, code, scale, lowest, fill):
    """One score under its mask code (ops.attention_allowed): 1 allowed, scaled; 0 masked, the
    dtype's lowest; else OpenAI GPT's future key, fill"""
    return x * scale if code == 1 else lowest if code == 0 else fill


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def masked_softmax_kernel(s, scale, codes, lowest, fill, ends):
    """p = softmax(masked_score(s, code, scale, lowest, fill)) per row of the scores s (B, H, Tq, Tk), in
    place, one pass over memory; codes (Bc, Hc, Tq, Tk) int8 with Bc in {1, B}, Hc in {1, H}.
    ends (Be, Tq) with Be in {1, B}: row (b, h, i) reads keys 0..ends[b, i] only (causal: its own and
    before; padding: its batch row's last key; else Tk), the others left unwritten by visible_forward's
    products: they are not read, and their probabilities are exactly 0, as exp of their lowest gives
    (each such row has an allowed key). The running max is the row's max (a max is exact in any order)."""
    B, H, Tq, Tk = s.shape
    Bc, Hc, Be = codes.shape[0], codes.shape[1], ends.shape[0]
    for r in prange(B * H * Tq):
        b, h, i = r // (H * Tq), (r // Tq) % H, r % Tq
        c, x = codes[b if Bc > 1 else 0, h if Hc > 1 else 0, i], s[b, h, i]
        n = ends[b if Be > 1 else 0, i]
        m = lowest
        for j in range(n):
            y = masked_score(x[j], c[j], scale, lowest, fill)
            x[j] = y
            m = y if y > m else m
        t = x.dtype.type(0)
        for j in range(n):
            e = exp_nonpositive(x[j] - m)
            x[j] = e
            t += e
        for j in range(n):
            x[j] /= t
        x[n:] = 0
    return s


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def masked_softmax_backward_kernel(dp, p, pd, dropped, scale, codes, ends):
    """ds = p (dp - sum_j dp_j p_j) scale where allowed, else 0 (masked and future scores are constants),
    per row of (B, H, Tq, Tk), in place on dp; over masked_softmax_kernel's keys (ends), 0 after them.
    dropped: dp is the gradient of pd = dropout(p), and ds = pd dp - p sum_j pd_j dp_j (ops.attention's
    dropout_softmax_backward); else pd must be p."""
    B, H, Tq, Tk = dp.shape
    Bc, Hc, Be = codes.shape[0], codes.shape[1], ends.shape[0]
    for r in prange(B * H * Tq):
        b, h, i = r // (H * Tq), (r // Tq) % H, r % Tq
        c, d, y = codes[b if Bc > 1 else 0, h if Hc > 1 else 0, i], dp[b, h, i], p[b, h, i]
        yd = pd[b, h, i]  # apart: with four views in the tuple above numba's parfors dropped d[n:] = 0
        n = ends[b if Be > 1 else 0, i]
        t = dp.dtype.type(0)
        for j in range(n):
            t += d[j] * yd[j]
        for j in range(n):
            d[j] = yd[j] * d[j] - y[j] * t if dropped else y[j] * (d[j] - t)
            d[j] = d[j] * scale if c[j] == 1 else 0
        d[n:] = 0
    return dp


# exp in a kernel, vectorised: numba has no SVML, and a libm exp per element cost ~4x numpy's.
# For r <= 0: r = k ln2 + f with |f| <= ln2 / 2 (ln2 in two parts, Cody & Waite, so k ln2_hi is
# exact), exp(f) by its Taylor polynomial (degree 7 for float32, 13 for float64: truncation below
# 0.1 ulp; fused multiply-adds), times 2^k made from exponent bits as 2^(k // 2) 2^(k - k // 2), so
# that a subnormal result is rounded once. Within 0.9 ulp of exp (numpy's own float32 exp: 2.4 ulp,
# float64: 0.7); r below lo, where exp rounds to 0, counts as lo.
EXP_CONSTANTS = {  # lo, ln2_hi, ln2_lo, Taylor degree, integer of the same width, exponent bias, mantissa bits
    np.float32: (-104.0, 0.693359375, -2.12194440e-4, 7, np.int32, 127, 23),
    np.float64: (-746.0, 6.93147180369123816490e-01, 1.90821492927058770002e-10, 13, np.int64, 1023, 52),
}


def exp_nonpositive(r):
    """exp(r) for r <= 0 (or NaN) in r's float type, within ~1 ulp: see EXP_CONSTANTS"""


@overload(exp_nonpositive, jit_options={"error_model": "numpy", "fastmath": {"contract"}})
def _exp_nonpositive(r):
    ftype = np.float32 if r == types.float32 else np.float64
    lo, ln2_hi, ln2_lo, degree, itype, bias, bits = EXP_CONSTANTS[ftype]
    lo, ln2_hi, ln2_lo, log2e, half = (ftype(v) for v in (lo, ln2_hi, ln2_lo, 1 / math.log(2), 0.5))
    taylor = tuple(ftype(1 / math.factorial(i)) for i in range(degree, -1, -1))

    def impl(r):
        r = max(r, lo)
        k = np.floor(r * log2e + half)
        f = (r - k * ln2_hi) - k * ln2_lo
        p = taylor[0]
        for a in taylor[1:]:
            p = p * f + a
        k1 = np.floor(k * half)
        return (p * itype((itype(k1) + bias) << bits).view(ftype)
                * itype((itype(k - k1) + bias) << bits).view(ftype))
    return impl


ROW_MAX_LANES = 64


@njit(cache=True, fastmath=FAST, error_model="numpy")
def row_max(x, acc):
    """max_j x[j]; acc: ROW_MAX_LANES of scratch, running maxima that vectorise (one running max does not)"""
    W, V = ROW_MAX_LANES, x.size
    B = V - V % W
    m = x[0]
    if B:
        for i in range(W):
            acc[i] = x[i]
        for j in range(W, B, W):
            for i in range(W):
                acc[i] = x[j + i] if x[j + i] > acc[i] else acc[i]
        for i in range(W):
            m = acc[i] if acc[i] > m else m
    for j in range(B, V):
        m = x[j] if x[j] > m else m
    return m


@adaptive
@njit(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
def softmax_rows(x):
    """y[n] = exp(x[n] - m[n]) / s[n],  m[n] = max_j x[n, j],  s[n] = sum_j exp(x[n, j] - m[n])
    x: (N, V) -> y (N, V), m (N), s (N)"""
    N, V = x.shape
    y = np.empty_like(x)
    m = np.empty(N, dtype=x.dtype)
    s = np.empty(N, dtype=x.dtype)
    for n in prange(N):
        m[n], s[n] = softmax_row(x[n], y[n])
    return y, m, s


@njit(cache=True, fastmath=FAST, error_model="numpy")
def softmax_row(x, y):
    """y = exp(x - m) / s, written into y;  -> m = max(x), s = sum(exp(x - m))   (one row: softmax_rows'
    and cross-entropy's)"""
    m = row_max(x, y[:ROW_MAX_LANES])  # y is scratch until written
    for j in range(x.size):
        y[j] = exp_nonpositive(x[j] - m)
    # the sum in a loop of its own, one that stores nothing: summed in the loop above, LLVM ran its
    # vector form only when y did not start within 256 bytes after x (a runtime check), else a scalar
    # loop that adds in another order; so where malloc had put y (attention_rows_kernel's p, after its
    # s) moved the last bit, and a decoding step and the modules' forward differed by an ulp
    s = x.dtype.type(0)
    for j in range(x.size):
        s += y[j]
    for j in range(x.size):
        y[j] /= s
    return m, s


@njit(cache=True, fastmath=FAST, error_model="numpy")
def attention_rows_kernel(q, k, v, Tk, scale, codes, lowest, fill):
    """ops.attention_forward without dropout, one query row (b, h, i) at a time on one thread, for
    few rows (a decoding step's): s = masked_score(q k^T, code, ...), p = softmax(s), out = p v.
    q (B, H, Tq, D) C-contiguous; k, v (B, H, T', D) C-contiguous, the keys their first Tk rows (a KV
    cache's buffer: unit-stride rows vectorise); codes (Bc, Hc, Tq, Tk) int8 with Bc in {1, B},
    Hc in {1, H} -> out (B, H, Tq, D), p (B, H, Tq, Tk)"""
    B, H, Tq, D = q.shape
    Bc, Hc = codes.shape[0], codes.shape[1]
    out = np.zeros((B, H, Tq, D), dtype=q.dtype)
    p = np.empty((B, H, Tq, Tk), dtype=q.dtype)
    s = np.empty(Tk, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                c = codes[b if Bc > 1 else 0, h if Hc > 1 else 0, i]
                row_dots(q[b, h, i], k[b, h], s)
                for j in range(Tk):
                    s[j] = masked_score(s[j], c[j], scale, lowest, fill)
                softmax_row(s, p[b, h, i])
                add_rows(p[b, h, i], v[b, h], out[b, h, i])
    return out, p


@njit(cache=True, fastmath=FAST, error_model="numpy")
def row_dots(x, m, s):
    """s[j] = x . m[j] for j < s.size, four rows of m at a time (x loaded once for four sums)"""
    n, D = s.size, x.size
    J = n - n % 4
    for j in range(0, J, 4):
        a0 = a1 = a2 = a3 = x.dtype.type(0)
        for d in range(D):
            a0 += x[d] * m[j, d]
            a1 += x[d] * m[j + 1, d]
            a2 += x[d] * m[j + 2, d]
            a3 += x[d] * m[j + 3, d]
        s[j], s[j + 1], s[j + 2], s[j + 3] = a0, a1, a2, a3
    for j in range(J, n):
        a = x.dtype.type(0)
        for d in range(D):
            a += x[d] * m[j, d]
        s[j] = a


@njit(cache=True, fastmath=FAST, error_model="numpy")
def add_rows(w, m, o):
    """o += sum_j w[j] m[j] for j < w.size, four rows of m at a time (o loaded and stored once for four)"""
    n, D = w.size, o.size
    J = n - n % 4
    for j in range(0, J, 4):
        w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
        for d in range(D):
            o[d] += w0 * m[j, d] + w1 * m[j + 1, d] + w2 * m[j + 2, d] + w3 * m[j + 3, d]
    for j in range(J, n):
        for d in range(D):
            o[d] += w[j] * m[j, d]
