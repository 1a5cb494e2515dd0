"""Numba GELU, erf and tanh forms, forward and backward, elementwise in parallel."""
import math

import numpy as np
from numba import njit, prange

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit(cache=True, parallel=True)
def gelu_kernel(x, approximate):
    y = np.empty_like(x)
    for i in prange(x.size):
        v = x[i]
        if approximate:
            y[i] = 0.5 * v * (1.0 + math.tanh(SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))
        else:
            y[i] = 0.5 * v * (1.0 + math.erf(v * INV_SQRT_2))
    return y


@njit(cache=True, parallel=True)
def gelu_backward_kernel(dy, x, approximate):
    dx = np.empty_like(x)
    for i in prange(x.size):
        v = x[i]
        if approximate:
            t = math.tanh(SQRT_2_OVER_PI * (v + 0.044715 * v * v * v))
            d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * v * v)
        else:
            d = 0.5 * (1.0 + math.erf(v * INV_SQRT_2)) + v * math.exp(-0.5 * v * v) * INV_SQRT_2PI
        dx[i] = dy[i] * d
    return dx
