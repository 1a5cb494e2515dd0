"""A five-point-stencil gradient check for op pairs, precise enough (errors ~1e-11) that an analytic
gradient rounded through float32 anywhere (relative error up to 6e-8) fails it by orders of magnitude.

    g_i ~ (8 (f(x + h e_i) - f(x - h e_i)) - (f(x + 2h e_i) - f(x - 2h e_i))) / 12h,  error O(h^4)
with f = sum(forward(x) * dout) for a random dout, h a power of two so x +- h is exact."""
import numpy as np


def stencil_errors(forward, inputs, backward, kwargs=None, h=2.0 ** -10, seed=0, max_entries=64):
    """{input index: max |analytic - numeric| / max(|analytic|, |numeric|)} over the float inputs
    (at most max_entries random entries of each)."""
    kwargs = kwargs or {}
    rng = np.random.default_rng(seed)
    gens = [g for g in list(inputs) + list(kwargs.values()) if isinstance(g, np.random.Generator)]
    states = [g.bit_generator.state for g in gens]  # dropout: the same mask on every call

    def call():
        for g, st in zip(gens, states):
            g.bit_generator.state = st
        return forward(*inputs, **kwargs)

    out, cache = call()
    dout = rng.standard_normal(np.shape(out))
    grads = backward(dout, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    floating = [x for x in inputs if isinstance(x, np.ndarray) and x.dtype == np.float64]

    def f():
        return float(np.sum(np.asarray(call()[0], np.float64) * dout))

    errors = {}
    for j, (x, g) in enumerate(zip(floating, grads)):
        if g is None:
            continue
        flat, g = x.reshape(-1), np.asarray(g, np.float64).reshape(-1)
        assert np.shares_memory(flat, x)
        idx = rng.permutation(flat.size)[:max_entries]
        num = np.empty(len(idx))
        for n, i in enumerate(idx):
            old, v = flat[i], []
            for step in (h, -h, 2 * h, -2 * h):
                flat[i] = old + step
                v.append(f())
            flat[i] = old
            num[n] = (8 * (v[0] - v[1]) - (v[2] - v[3])) / (12 * h)
        scale = max(np.abs(g).max(initial=0.0), np.abs(num).max(initial=0.0))
        errors[j] = 0.0 if scale == 0 else float(np.abs(g[idx] - num).max() / scale)
    return errors
