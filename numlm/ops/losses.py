"""Losses: cross-entropy from logits with an ignore index, and mean squared error."""
from typing import NamedTuple

import numpy as np

from ._check import float_array, ids_in_range
from .. import kernels
from ..kernels.losses import cross_entropy_backward_kernel
from .softmax import softmax_lse


IGNORE_INDEX = -100  # transformers' ignore_index: a target that adds nothing to the loss


class CrossEntropyCache(NamedTuple):
    probs: np.ndarray      # (N, V) softmax of the logits
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
    probs, lse = softmax_lse(x)  # (N, V), (N,)
    losses = np.where(valid, lse - x[np.arange(len(t)), np.where(valid, t, 0)], 0)  # (N,)
    loss = logits.dtype.type(losses.sum() / count) if count else logits.dtype.type(0.0)
    return loss, CrossEntropyCache(probs, t, valid, count, logits.shape)


def cross_entropy_backward(dloss, cache):
    """forward: loss = (1/M) sum_n lse(logits[n]) - logits[n, t[n]];  so
    dlogits[n] = dloss * (softmax(logits[n]) - onehot(t[n])) / M   for non-ignored n, else 0"""
    probs, t, valid, count, shape = cache.probs, cache.targets, cache.valid, cache.count, cache.shape
    if count == 0:
        return np.zeros(shape, dtype=probs.dtype)
    c = probs.dtype.type(float(dloss) / count)
    if kernels.numba_enabled():
        return cross_entropy_backward_kernel(probs, t, valid, c).reshape(shape)
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
    s = 0.5 * (1.0 + np.tanh(0.5 * x))  # sigmoid, no overflow for large |x|
    return (s - y) * x.dtype.type(float(dloss) / x.size)
