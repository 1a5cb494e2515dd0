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
