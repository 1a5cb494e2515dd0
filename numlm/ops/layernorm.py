"""LayerNorm over the last axis, biased variance (as the BERT and GPT papers and transformers)."""
import numpy as np

from ._check import float_array
from .. import kernels
from ..kernels.layernorm import layernorm_forward_kernel, layernorm_backward_kernel


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta   over the last axis
    x: (N, C)  gamma, beta: (C,)  ->  y: (N, C)"""
    float_array("x", x, 1, gamma=gamma, beta=beta)
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not 0 < eps < np.inf:
        raise ValueError(f"eps must be a finite number > 0 (it keeps 1/sqrt(var + eps) finite), got {eps!r}")
    C = x.shape[-1]
    if gamma.shape != (C,) or beta.shape != (C,):
        raise ValueError(f"gamma and beta must have shape ({C},) for x of shape {x.shape}, "
                         f"got {gamma.shape} and {beta.shape}")
    if kernels.enabled:
        x2 = np.ascontiguousarray(x).reshape(-1, C)
        y, xhat, rstd = layernorm_forward_kernel(x2, gamma, beta, eps)
        return y.reshape(x.shape), (xhat.reshape(x.shape), rstd.reshape(x.shape[:-1]), gamma)
    mean = x.mean(axis=-1, keepdims=True)  # (N, 1)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # biased
    rstd = 1.0 / np.sqrt(var + eps)  # (N, 1)
    xhat = xc * rstd
    y = xhat * gamma + beta
    return y, (xhat, rstd[..., 0], gamma)


def layernorm_backward(dy, cache):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dy * gamma
    dgamma = sum_N dy * xhat,  dbeta = sum_N dy.   dy: (N, C) -> dx: (N, C), dgamma, dbeta: (C,)
    Caches xhat rather than x: backward needs it directly, at the same memory."""
    xhat, rstd, gamma = cache
    C = xhat.shape[-1]
    if kernels.enabled:
        dy2 = np.ascontiguousarray(dy, dtype=xhat.dtype).reshape(-1, C)
        dx, dgamma, dbeta = layernorm_backward_kernel(dy2, xhat.reshape(-1, C), rstd.reshape(-1), gamma)
        return dx.reshape(xhat.shape), dgamma, dbeta
    dxhat = dy * gamma
    dx = rstd[..., None] * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                            - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    dy2, xhat2 = dy.reshape(-1, C), xhat.reshape(-1, C)
    dgamma = (dy2 * xhat2).sum(axis=0)
    dbeta = dy2.sum(axis=0)
    return dx, dgamma, dbeta
