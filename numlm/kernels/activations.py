"""Numba GELU, erf and tanh forms, forward and backward, elementwise in parallel.

The constants come in as arguments of the array's dtype so float32 stays float32 (Python float
literals would promote every element to float64). The tanh form's tanh itself is numpy's SIMD
np.tanh, called by the op between the two kernels here; a scalar libm tanh per element costs ~20x more.
"""
import math

import numpy as np
from numba import njit, prange

from . import adaptive


@adaptive
@njit(cache=True, parallel=True)
def gelu_tanh_inner(x, k, c):
    """u = k (x + c x^3)"""
    u = np.empty_like(x)
    for i in prange(x.size):
        v = x[i]
        u[i] = k * (v + c * v * v * v)
    return u


@adaptive
@njit(cache=True, parallel=True)
def gelu_tanh_outer(x, t, half, one):
    """y = 0.5 x (1 + t)"""
    y = np.empty_like(x)
    for i in prange(x.size):
        y[i] = half * x[i] * (one + t[i])
    return y


@adaptive
@njit(cache=True, parallel=True)
def gelu_tanh_backward_kernel(dy, x, t, half, one, k, c3):
    """dx = dy (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3c x^2))"""
    dx = np.empty_like(x)
    for i in prange(x.size):
        v = x[i]
        ti = t[i]
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
# exp(-z^2) = exp(-x^2 / 2) comes from numpy's SIMD exp (the op calls it), and the backward reuses it.
AS_P, AS_A = 0.3275911, (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


@adaptive
@njit(cache=True, parallel=True, error_model="numpy")
def neg_half_square(x, neg_half):
    """u = -x^2 / 2"""
    u = np.empty_like(x)
    for i in prange(x.size):
        u[i] = neg_half * x[i] * x[i]
    return u


@njit(cache=True, inline="always")
def _one_plus_erf(v, e, inv_sqrt2, p, a1, a2, a3, a4, a5, one, two):
    z = abs(v) * inv_sqrt2
    t = one / (one + p * z)
    erfc = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5)))) * e
    return two - erfc if v >= 0 else erfc


@adaptive
@njit(cache=True, parallel=True, error_model="numpy")
def gelu_erf_f32_kernel(x, e, half, one, two, inv_sqrt2, p, a1, a2, a3, a4, a5):
    """y = 0.5 x (1 + erf(x / sqrt 2)),  e = exp(-x^2 / 2)"""
    y = np.empty_like(x)
    for i in prange(x.size):
        y[i] = half * x[i] * _one_plus_erf(x[i], e[i], inv_sqrt2, p, a1, a2, a3, a4, a5, one, two)
    return y


@adaptive
@njit(cache=True, parallel=True, error_model="numpy")
def gelu_erf_f32_backward_kernel(dy, x, e, half, one, two, inv_sqrt2, inv_sqrt2pi, p, a1, a2, a3, a4, a5):
    """dx = dy (0.5 (1 + erf(x / sqrt 2)) + x e / sqrt(2 pi)),  e = exp(-x^2 / 2)"""
    dx = np.empty_like(x)
    for i in prange(x.size):
        v = x[i]
        dx[i] = dy[i] * (half * _one_plus_erf(v, e[i], inv_sqrt2, p, a1, a2, a3, a4, a5, one, two)
                         + v * e[i] * inv_sqrt2pi)
    return dx
