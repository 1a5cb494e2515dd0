"""Inverted dropout with an explicit, seeded numpy Generator."""
from ._check import float_array


def dropout_forward(x, p, rng=None, training=True):
    """y = x * m / (1 - p),  m ~ Bernoulli(1 - p) per element;  identity when not training or p == 0
    x: (N) -> y: (N)"""
    float_array("x", x, 0)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must lie in [0, 1), got {p}")
    if not training or p == 0.0:
        return x, None
    if rng is None:
        raise ValueError("dropout in training needs a numpy.random.Generator (rng)")
    keep = (rng.random(x.shape, dtype=x.dtype) >= p) * x.dtype.type(1.0 / (1.0 - p))  # draws in x's dtype
    return x * keep, keep


def dropout_backward(dy, cache):
    """forward: y = x * keep;  so  dx = dy * keep   (keep already holds 1/(1-p))"""
    keep = cache
    return dy if keep is None else dy * keep
