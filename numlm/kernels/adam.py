"""Numba twins of numlm.optim's loops over a parameter array (NumPy definitions there): the fused
Adam/AdamW update, and the float64 sum of squares behind gradient norms.

One pass over memory instead of the six of the NumPy path. Every scalar arrives already cast to the
array's dtype and every line keeps torch's order of operations, so float32 stays float32 and the
update is identical to ``numlm.optim.adam_update`` (numba does not contract a*b+c into an FMA unless
fastmath is on, so it stays off).
"""
import numba
import numpy as np


# error_model="numpy": IEEE division without numba's zero check, which blocks SIMD (4.5x here)
@numba.njit(cache=True, error_model="numpy", nogil=True)  # nogil: two threads update two halves of a model
def adam_update_kernel(p, g, m, v, one, decay, l2, w1, small, beta2, c2, neg_step_size, bc2_sqrt,
                       eps, has_decay, has_l2):
    """p, g, m, v: 1-D contiguous arrays of one dtype, p, m, v updated in place.
    one = 1 in the arrays' dtype (an int literal would promote float32 to float64),
    decay = 1 - lr*wd (AdamW), l2 = wd (Adam), w1 = 1 - beta1, c2 = 1 - beta2,
    neg_step_size = -lr / (1 - beta1**t), bc2_sqrt = (1 - beta2**t)**0.5."""
    for i in range(p.shape[0]):
        pi = p[i]
        if has_decay:
            pi = pi * decay                                  # param.mul_(1 - lr*wd)
        gi = g[i]
        if has_l2:
            gi = gi + l2 * pi                                # grad.add(param, alpha=wd)
        mi = m[i]
        if small:                                            # exp_avg.lerp_(grad, 1 - beta1)
            mi = mi + w1 * (gi - mi)
        else:
            mi = gi - (gi - mi) * (one - w1)
        vi = v[i] * beta2                                    # exp_avg_sq.mul_(beta2)
        vi = vi + c2 * gi * gi                               #   .addcmul_(grad, grad, 1 - beta2)
        denom = np.sqrt(vi) / bc2_sqrt + eps                 # (sqrt(v) / sqrt(bc2)) + eps
        m[i] = mi
        v[i] = vi
        p[i] = pi + neg_step_size * mi / denom               # param.addcdiv_(m, denom, -step)


@numba.njit(cache=True, error_model="numpy")
def sum_squares_kernel(x):
    """sum_i x_i^2 accumulated in float64 over a 1-D array (float32 read without a float64 copy);
    eight independent sums in a fixed order, so it vectorizes and is deterministic."""
    acc = np.zeros(8)
    n = x.shape[0]
    m = n - n % 8
    for i in range(0, m, 8):
        for j in range(8):
            v = np.float64(x[i + j])
            acc[j] += v * v
    tail = 0.0
    for i in range(m, n):
        v = np.float64(x[i])
        tail += v * v
    return acc.sum() + tail
