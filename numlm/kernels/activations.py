"""Numba GELU, erf and tanh forms, forward and backward, elementwise in parallel.

The constants come in as arguments of the array's dtype so float32 stays float32 (Python float
literals would promote every element to float64). tanh, and the float32 erf's exp, come from
exp_nonpositive (kernels/softmax.py), vectorised in the loop: numpy's SIMD np.tanh / np.exp run on
one core, and a scalar libm tanh per element cost ~20x more. The backward recomputes them from x.
"""
import math

import numpy as np
from numba import njit, prange

from . import adaptive
from .softmax import exp_nonpositive


@njit(cache=True, inline="always", error_model="numpy")
def tanh_abs(u, one):
    """tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|): within ~2e-16 (float64) / 1.2e-7 (float32)
    of tanh(u) in absolute terms (not relative near 0), all that 0.5 x (1 + tanh(u)) and its
    derivative need"""
    a = abs(u)
    e = exp_nonpositive(-(a + a))
    t = (one - e) / (one + e)
    return t if u >= 0 else -t


@njit(inline="always", error_model="numpy")
def gelu_tanh_at(v, half, one, k, c):
    """0.5 v (1 + tanh(u)),  u = k (v + c v^3): one element, for the parallel and serial loops"""
    return half * v * (one + tanh_abs(k * (v + c * v * v * v), one))


@njit(cache=True, parallel=True, error_model="numpy")
def _gelu_tanh_parallel(x, half, one, k, c):
    """y = 0.5 x (1 + tanh(u)),  u = k (x + c x^3), elementwise"""
    y = np.empty_like(x)
    for i in prange(x.size):
        y[i] = gelu_tanh_at(x[i], half, one, k, c)
    return y


@njit(cache=True, error_model="numpy")
def _gelu_tanh_serial(x, half, one, k, c):
    """_gelu_tanh_parallel on the calling thread"""
    y = np.empty_like(x)
    for i in range(x.size):
        y[i] = gelu_tanh_at(x[i], half, one, k, c)
    return y


# y = tanh GELU of x (N): in parallel, or serially for a decoding step's few elements
gelu_tanh_kernel = adaptive(_gelu_tanh_parallel, _gelu_tanh_serial)


@adaptive
@njit(cache=True, parallel=True, error_model="numpy")
def gelu_tanh_backward_kernel(dy, x, half, one, k, c, c3):
    """dx = dy (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3c x^2)),  t = tanh(k (x + c x^3))"""
    dx = np.empty_like(x)
    for i in prange(x.size):
        v = x[i]
        ti = tanh_abs(k * (v + c * v * v * v), one)
        dx[i] = dy[i] * (half * (one + ti) + half * v * (one - ti * ti) * k * (one + c3 * v * v))
    return dx


@adaptive
@njit(cache=True, parallel=True)
def gelu_erf_kernel(x, half, one, inv_sqrt2):
    """y = 0.5 x (1 + erf(x / sqrt 2))"""
    y = np.empty_like(x)
    for i in prange(x.size):
        v = x[i]
        y[i] = half * v * (one + math.erf(v * inv_sqrt2))
    return y


@adaptive
@njit(cache=True, parallel=True)
def gelu_erf_backward_kernel(dy, x, half, one, inv_sqrt2, inv_sqrt2pi):
    """dx = dy (0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi))"""
    dx = np.empty_like(x)
    for i in prange(x.size):
        v = x[i]
        dx[i] = dy[i] * (half * (one + math.erf(v * inv_sqrt2)) + v * math.exp(-half * v * v) * inv_sqrt2pi)
    return dx


# float32 erf GELU. Abramowitz & Stegun 7.1.26: for z >= 0,
#   erfc(z) = (a1 t + a2 t^2 + a3 t^3 + a4 t^4 + a5 t^5) exp(-z^2),  t = 1 / (1 + p z),  |error| <= 1.5e-7,
# about one float32 ulp; 1 + erf(z) = 2 - erfc(z) for z >= 0 and erfc(-z) for z < 0 (no cancellation).
# exp(-z^2) = exp(-x^2 / 2) <= 1 is exp_nonpositive's, shared with the backward's x phi(x) term.
AS_P, AS_A = 0.3275911, (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


@njit(cache=True, inline="always")
def _one_plus_erf(v, e, inv_sqrt2, p, a1, a2, a3, a4, a5, one, two):
    z = abs(v) * inv_sqrt2
    t = one / (one + p * z)
    erfc = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5)))) * e
    return two - erfc if v >= 0 else erfc


@adaptive
@njit(cache=True, parallel=True, error_model="numpy")
def gelu_erf_f32_kernel(x, half, one, two, inv_sqrt2, p, a1, a2, a3, a4, a5):
    """y = 0.5 x (1 + erf(x / sqrt 2))"""
    y = np.empty_like(x)
    for i in prange(x.size):
        v = x[i]
        e = exp_nonpositive(-half * v * v)  # exp(-x^2 / 2)
        y[i] = half * v * _one_plus_erf(v, e, inv_sqrt2, p, a1, a2, a3, a4, a5, one, two)
    return y


@adaptive
@njit(cache=True, parallel=True, error_model="numpy")
def gelu_erf_f32_backward_kernel(dy, x, half, one, two, inv_sqrt2, inv_sqrt2pi, p, a1, a2, a3, a4, a5):
    """dx = dy (0.5 (1 + erf(x / sqrt 2)) + x e / sqrt(2 pi)),  e = exp(-x^2 / 2)"""
    dx = np.empty_like(x)
    for i in prange(x.size):
        v = x[i]
        e = exp_nonpositive(-half * v * v)
        dx[i] = dy[i] * (half * _one_plus_erf(v, e, inv_sqrt2, p, a1, a2, a3, a4, a5, one, two)
                         + v * e * inv_sqrt2pi)
    return dx


@njit(cache=True, inline="always")
def splitmix64_at(seed, i):
    """splitmix64's output for counter i from seed (uint64, wrapping): the i-th draw of a dropout mask"""
    z = seed + (i + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, parallel=True)
def _dropout_parallel(x, seed, threshold, scale):
    """keep[i] = scale if splitmix64(seed, i) >> 11 >= threshold else 0;  y = x * keep  (one pass)"""
    y = np.empty_like(x)
    keep = np.empty_like(x)
    zero = scale - scale
    for i in prange(x.size):
        k = scale if (splitmix64_at(seed, np.uint64(i)) >> np.uint64(11)) >= threshold else zero
        keep[i] = k
        y[i] = x[i] * k
    return y, keep


dropout_kernel = adaptive(_dropout_parallel)
