"""Elementwise maps: the activations (each caches its input and recomputes what backward needs) and
inverted dropout with an explicit, seeded numpy Generator."""
import math

import numpy as np

from ._check import float_array
from .. import kernels
from ..kernels.activations import (gelu_tanh_kernel, gelu_tanh_backward_kernel, gelu_erf_kernel,
                                  gelu_erf_backward_kernel, gelu_erf_f32_kernel, gelu_erf_f32_backward_kernel,
                                  dropout_kernel, AS_P, AS_A)

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_erf = np.frompyfunc(math.erf, 1, 1)  # NumPy has no erf; libm's, elementwise (the definition)


def erf(x):
    """erf elementwise in x's dtype (the NumPy path is exact but slow; the Numba path is the fast one)."""
    return _erf(x).astype(x.dtype) if x.ndim else x.dtype.type(math.erf(x))


def _as_consts(f):
    return (f(AS_P),) + tuple(f(a) for a in AS_A)


def gelu_forward(x):
    """y = 0.5 x (1 + erf(x / sqrt(2)))            exact GELU (BERT's "gelu")
    x: (N) -> y: (N)"""
    float_array("x", x, 0)
    if kernels.enabled:
        f = x.dtype.type
        x1 = np.ascontiguousarray(x).reshape(-1)
        if x.dtype == np.float32:  # a vectorised erf to float32 accuracy
            y = gelu_erf_f32_kernel(x1, f(0.5), f(1.0), f(2.0), f(INV_SQRT_2), *_as_consts(f))
        else:
            y = gelu_erf_kernel(x1, f(0.5), f(1.0), f(INV_SQRT_2))
        return y.reshape(x.shape), (x, False)
    return 0.5 * x * (1.0 + np.asarray(_erf(x * INV_SQRT_2), dtype=x.dtype)), (x, False)  # erf(x / sqrt 2)


def gelu_tanh_constants(f):
    """the tanh GELU kernel's (0.5, 1, sqrt(2/pi), 0.044715) in the array's dtype f"""
    return f(0.5), f(1.0), f(SQRT_2_OVER_PI), f(0.044715)


def gelu_tanh_forward(x):
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))     tanh GELU (GPT's, transformers' gelu_new)
    x: (N) -> y: (N)"""
    float_array("x", x, 0)
    if kernels.enabled:
        y = gelu_tanh_kernel(np.ascontiguousarray(x).reshape(-1), *gelu_tanh_constants(x.dtype.type))
        return y.reshape(x.shape), (x, True)
    return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))), (x, True)


def gelu_backward(dy, cache):
    """erf form:  dy/dx = Phi(x) + x phi(x) = 0.5 (1 + erf(x/sqrt 2)) + x exp(-x^2/2) / sqrt(2 pi)
    tanh form: u = sqrt(2/pi)(x + 0.044715 x^3), t = tanh(u):
               dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)"""
    x, approximate = cache
    if kernels.enabled:
        f = x.dtype.type
        dy1 = np.ascontiguousarray(dy, dtype=x.dtype).reshape(-1)
        x1 = np.ascontiguousarray(x).reshape(-1)
        if approximate:
            dx = gelu_tanh_backward_kernel(dy1, x1, *gelu_tanh_constants(f), f(3 * 0.044715))
        elif x.dtype == np.float32:
            dx = gelu_erf_f32_backward_kernel(dy1, x1, f(0.5), f(1.0), f(2.0), f(INV_SQRT_2), f(INV_SQRT_2PI),
                                              *_as_consts(f))
        else:
            dx = gelu_erf_backward_kernel(dy1, x1, f(0.5), f(1.0), f(INV_SQRT_2), f(INV_SQRT_2PI))
        return dx.reshape(x.shape)
    if approximate:
        t = np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        dydx = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    else:
        dydx = 0.5 * (1.0 + np.asarray(_erf(x * INV_SQRT_2), dtype=x.dtype)) + x * np.exp(-0.5 * x * x) * INV_SQRT_2PI
    return dy * dydx


gelu_tanh_backward = gelu_backward


def sigmoid(x):
    """s = 1 / (1 + exp(-x)) = (1 + tanh(x / 2)) / 2, the tanh form: no overflow for large |x|"""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def tanh_forward(x):
    """y = tanh(x)      x: (N) -> y: (N)"""
    float_array("x", x, 0)
    y = np.tanh(x)
    return y, y


def tanh_backward(dy, cache):
    """dy/dx = 1 - tanh(x)^2 = 1 - y^2   (caches y)"""
    y = cache
    return dy * (1.0 - y * y)


def relu_forward(x):
    """y = max(x, 0)    x: (N) -> y: (N)"""
    float_array("x", x, 0)
    return np.maximum(x, 0), x > 0


def relu_backward(dy, cache):
    """dy/dx = 1 where x > 0 else 0"""
    return dy * cache


# transformers' activation names -> (forward, backward). "gelu" is the erf form in BERT and GPT-2;
# OpenAI GPT maps its own "gelu" to the tanh form (its model code translates before lookup).
ACTIVATIONS = {
    "gelu": (gelu_forward, gelu_backward),
    "gelu_new": (gelu_tanh_forward, gelu_backward),
    "gelu_pytorch_tanh": (gelu_tanh_forward, gelu_backward),
    "gelu_fast": (gelu_tanh_forward, gelu_backward),
    "relu": (relu_forward, relu_backward),
    "tanh": (tanh_forward, tanh_backward),
}


def activation(name):
    """(forward, backward) for a transformers activation name; unknown names are refused."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; numlm supports {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dropout_forward(x, p, rng=None, training=True):
    """y = x * m / (1 - p),  m = [u >= p] per element, u uniform from a counter-based generator seeded by
    one draw from rng;  identity when not training or p == 0.   x: (N) -> y: (N)"""
    float_array("x", x, 0)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must lie in [0, 1), got {p}")
    if not training or p == 0.0:
        return x, None
    if rng is None:
        raise ValueError("dropout in training needs a numpy.random.Generator (rng)")
    seed = rng.integers(2**64, dtype=np.uint64)  # one draw a call: the mask is a function of (seed, index)
    threshold, scale = np.uint64(math.ceil(p * 2**53)), x.dtype.type(1.0 / (1.0 - p))
    if kernels.enabled:
        y, keep = dropout_kernel(np.ascontiguousarray(x).reshape(-1), seed, threshold, scale)
        return y.reshape(x.shape), keep.reshape(x.shape)
    with np.errstate(over="ignore"):  # splitmix64 of counters 1..N from seed, uint64 wrapping (the definition
        # kernels.activations.splitmix64_at computes element by element)
        z = seed + np.arange(1, x.size + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    keep = ((z >> np.uint64(11)) >= threshold).reshape(x.shape) * scale  # u >= p,  u = (z >> 11) * 2^-53
    return x * keep, keep


def dropout_backward(dy, cache):
    """forward: y = x * keep;  so  dx = dy * keep   (keep already holds 1/(1-p))"""
    keep = cache
    return dy if keep is None else dy * keep
