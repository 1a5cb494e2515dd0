"""Softmax over the last axis, shifted by the row maximum so large inputs do not overflow, and the
losses: cross-entropy from logits (with softmax's log-sum-exp) with an ignore index, mean squared
error, binary cross-entropy with logits. numlm's one softmax: attention, cross-entropy and decoding
all call these functions."""
from typing import NamedTuple

import numpy as np

from ._check import float_array, ids_in_range
from .activations import sigmoid
from .. import kernels
from ..kernels.losses import cross_entropy_kernel
from ..kernels.softmax import softmax_rows, softmax_backward_rows


def _exp_normalize(x):
    """y = exp(x - m) / s,  m = max(x),  s = sum(exp(x - m))    x: (N, V) -> y (N, V), m (N), s (N)"""
    if kernels.enabled:
        return softmax_rows(x)
    m = x.max(axis=-1)
    e = np.exp(x - m[:, None])
    s = e.sum(axis=-1)
    return e / s[:, None], m, s


def softmax_forward(x):
    """y = exp(x - max(x)) / sum(exp(x - max(x)))   over the last axis
    x: (N, V) -> y: (N, V)   (caches y)"""
    float_array("x", x)
    y, _, _ = _exp_normalize(np.ascontiguousarray(x).reshape(-1, x.shape[-1]))  # (N, V)
    y = y.reshape(x.shape)
    return y, y


def softmax(x):
    """softmax_forward's y alone, for callers that do not differentiate (decoding, inference)."""
    return softmax_forward(np.ascontiguousarray(x))[0]


def softmax_backward(dy, cache):
    """forward: y = exp(x - max) / sum(exp(x - max));  so  dx_i = y_i (dy_i - sum_j dy_j y_j)"""
    y = cache
    V = y.shape[-1]
    if kernels.enabled:
        dy2 = np.ascontiguousarray(dy, dtype=y.dtype).reshape(-1, V)
        return softmax_backward_rows(dy2, y.reshape(-1, V)).reshape(y.shape)
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


def softmax_lse(x):
    """y = softmax(x) and lse = log(sum(exp(x))) = m + log(s) over the last axis (cross-entropy's pair)
    x: (N, V) -> y: (N, V), lse: (N)"""
    float_array("x", x)
    y, m, s = _exp_normalize(np.ascontiguousarray(x).reshape(-1, x.shape[-1]))  # (N, V), (N,), (N,)
    return y.reshape(x.shape), (m + np.log(s)).reshape(x.shape[:-1])


def log_softmax(x):
    """log y = (x - max(x)) - log(sum(exp(x - max(x))))   over the last axis (beam search's scores)
    x: (N, V) -> (N, V)"""
    float_array("x", x)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


IGNORE_INDEX = -100  # transformers' ignore_index: a target that adds nothing to the loss


class CrossEntropyCache(NamedTuple):
    probs: np.ndarray      # (N, V) softmax of the logits (NumPy path), or None
    grad: np.ndarray       # (N, V) d loss / d logits for dloss = 1 (Numba path, made with the loss), or None
    targets: np.ndarray    # (N,) int64
    valid: np.ndarray      # (N,) bool, targets != ignore_index
    count: int             # number of valid targets (the mean's denominator)
    shape: tuple           # the logits' shape


def cross_entropy_forward(logits, targets, ignore_index=IGNORE_INDEX):
    """loss = (1/M) sum over n with targets[n] != ignore_index of  logsumexp(logits[n]) - logits[n, targets[n]]
    logits: (N, V)  targets: (N) ints in [0, V) or ignore_index  ->  loss: () in logits' dtype
    M counts the non-ignored targets of the whole batch (one mean, as transformers). When every
    target is ignored the loss is 0 and its gradient is 0, so such a batch leaves training unchanged."""
    float_array("logits", logits)
    V = logits.shape[-1]
    targets = ids_in_range("targets", targets, V, allow=ignore_index)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {logits.shape[:-1]} to match logits {logits.shape}, "
                         f"got {targets.shape}")
    x = np.ascontiguousarray(logits).reshape(-1, V)  # (N, V)
    t = targets.reshape(-1).astype(np.int64)
    valid = t != ignore_index
    count = int(valid.sum())
    if kernels.enabled:  # the lines below and the backward's for dloss = 1, in one pass over the logits
        losses, grad = cross_entropy_kernel(x, t, valid, x.dtype.type(1.0 / max(count, 1)))
        cache = CrossEntropyCache(None, grad, t, valid, count, logits.shape)
    else:
        probs, m, s = _exp_normalize(x)  # (N, V), (N,), (N,)
        lse = m + np.log(s)  # log sum exp(x), softmax_lse's
        losses = np.where(valid, lse - x[np.arange(len(t)), np.where(valid, t, 0)], 0)  # (N,)
        cache = CrossEntropyCache(probs, None, t, valid, count, logits.shape)
    loss = logits.dtype.type(losses.sum() / count) if count else logits.dtype.type(0.0)
    return loss, cache


def cross_entropy_backward(dloss, cache):
    """forward: loss = (1/M) sum_n lse(logits[n]) - logits[n, t[n]];  so
    dlogits[n] = dloss * (softmax(logits[n]) - onehot(t[n])) / M   for non-ignored n, else 0"""
    if cache.grad is not None:  # the forward's, for dloss = 1 (nothing writes into a returned gradient)
        g = cache.grad if float(dloss) == 1.0 else cache.grad * cache.grad.dtype.type(dloss)
        return g.reshape(cache.shape)
    probs, t, valid, count, shape = cache.probs, cache.targets, cache.valid, cache.count, cache.shape
    if count == 0:
        return np.zeros(shape, dtype=probs.dtype)
    c = probs.dtype.type(float(dloss) / count)
    d = probs * c
    rows = np.nonzero(valid)[0]
    d[rows, t[rows]] -= c
    d[~valid] = 0
    return d.reshape(shape)


def mse_forward(pred, target):
    """loss = mean((pred - target)^2)      pred, target: (N) -> loss: ()"""
    float_array("pred", pred, 0)
    target = np.asarray(target, dtype=pred.dtype)
    if target.shape != pred.shape:
        raise ValueError(f"target must have shape {pred.shape} to match pred, got {target.shape}")
    diff = pred - target
    return pred.dtype.type(np.mean(diff * diff)), diff


def mse_backward(dloss, cache):
    """dpred = dloss * 2 (pred - target) / N"""
    diff = cache
    return diff * diff.dtype.type(2.0 * float(dloss) / diff.size)


def bce_with_logits_forward(logits, target):
    """loss = mean(max(x, 0) - x y + log(1 + exp(-|x|)))  = mean(-y log s(x) - (1 - y) log(1 - s(x))), s = sigmoid
    logits, target: (N) with target in [0, 1]  ->  loss: ()   (transformers' BCEWithLogitsLoss, mean)"""
    float_array("logits", logits, 0)
    y = np.asarray(target, dtype=logits.dtype)
    if y.shape != logits.shape:
        raise ValueError(f"target must have shape {logits.shape} to match logits, got {y.shape}")
    x = logits
    loss = np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
    return logits.dtype.type(loss), (x, y)


def bce_with_logits_backward(dloss, cache):
    """dx = dloss (sigmoid(x) - y) / N"""
    x, y = cache
    s = sigmoid(x)
    return (s - y) * x.dtype.type(float(dloss) / x.size)
