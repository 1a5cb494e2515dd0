"""Check a hand-written backward with numlm.gradcheck: RMSNorm, an op numlm does not ship.

    y = x / rms(x) * g,   rms(x) = sqrt(mean(x^2) + eps)   over the last axis

Run: python examples/gradcheck_rmsnorm.py
"""
import numpy as np

import numlm


def rmsnorm_forward(x, g, eps=1e-6):
    """y = x * r * g,  r = 1 / sqrt(mean(x^2) + eps)
    x: (N, C)  g: (C,)  ->  y: (N, C)"""
    r = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)  # (N, 1)
    return x * r * g, (x, r, g)


def rmsnorm_backward(dy, cache):
    """dx = r (dxh - xh mean(dxh xh)),  xh = x r,  dxh = dy g;   dg = sum_N dy xh"""
    x, r, g = cache
    xh = x * r
    dxh = dy * g
    dx = r * (dxh - xh * (dxh * xh).mean(axis=-1, keepdims=True))
    dg = (dy * xh).reshape(-1, x.shape[-1]).sum(axis=0)
    return dx, dg


def wrong_backward(dy, cache):
    """The same, forgetting that r depends on x."""
    x, r, g = cache
    return dy * g * r, (dy * x * r).reshape(-1, x.shape[-1]).sum(axis=0)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((4, 7, 16)), rng.standard_normal(16)
    for name, backward in (("correct backward", rmsnorm_backward), ("wrong backward", wrong_backward)):
        errors = numlm.gradcheck(rmsnorm_forward, (x, g), backward)
        print(f"{name:17s} " + "  ".join(f"{k}: {v:.1e}" for k, v in errors.items()))
    # a whole model: every parameter of a tiny GPT-2, spot-checked at 5 entries each
    model = numlm.GPT2LMHeadModel(numlm.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2),
                                  seed=0, dtype="float64")
    ids = rng.integers(0, 50, (2, 9))
    errors = numlm.gradcheck(model, {"input_ids": ids, "labels": ids}, max_entries=5, eps=1e-5)
    print(f"tiny GPT-2         worst of {len(errors)} parameters: {max(errors.values()):.1e}")
