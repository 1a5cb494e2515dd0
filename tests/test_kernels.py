"""Numba kernels give the NumPy path's numbers: every op's forward and backward on both paths.
(The Adam kernel is checked bit for bit in tests/test_optim.py.)"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numlm import kernels, ops
from numlm.ops import attention
from numlm.kernels import set_numba

TOL = {np.float64: 1e-12, np.float32: 2e-6}
seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([np.float32, np.float64])
lead_dims = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


def both_paths(run):
    """run() on the Numba path and on the NumPy path; returns the two results."""
    out = []
    for flag in (True, False):
        previous = set_numba(flag)
        try:
            out.append(run())
        finally:
            set_numba(previous)
    return out


def assert_close(a, b, dtype):
    """max |a - b| / max |b| within the dtype's tolerance, array by array; dtypes kept."""
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if y is None:
            assert x is None
            continue
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype == dtype, (x.shape, y.shape, x.dtype, y.dtype)
        scale = np.abs(y).max(initial=0.0)
        if dtype == np.float32:
            # float32 exp/erf rounding differs by an ulp between the paths; on an array that is all
            # tiny (a saturated softmax gradient) that ulp is no longer relative to anything O(1)
            scale = max(scale, 1.0)
        diff = np.abs(x.astype(np.float64) - y.astype(np.float64)).max(initial=0.0)
        assert diff <= TOL[dtype] * scale, (diff, scale)


def fwd_bwd(forward, backward, args, dout_seed, **kw):
    def run():
        out, cache = forward(*args, **kw)
        dout = np.random.default_rng(dout_seed).standard_normal(np.shape(out)).astype(out.dtype)
        grads = backward(dout, cache)
        return (out,) + (grads if isinstance(grads, tuple) else (grads,))
    return run


@settings(max_examples=30, deadline=None)
@given(seed=seeds, lead=lead_dims, C=st.integers(1, 40), dtype=dtypes, scale=st.sampled_from([1.0, 100.0]))
def test_layernorm_parity(seed, lead, C, dtype, scale):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal(lead + (C,)) + 3.0).astype(dtype)
    g, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    nb, npy = both_paths(fwd_bwd(ops.layernorm_forward, ops.layernorm_backward, (x, g, b), seed, eps=1e-5))
    assert_close(nb, npy, dtype)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, lead=lead_dims, V=st.integers(1, 50), dtype=dtypes, scale=st.sampled_from([1.0, 1e3]))
def test_softmax_parity(seed, lead, V, dtype, scale):
    x = (scale * np.random.default_rng(seed).standard_normal(lead + (V,))).astype(dtype)
    nb, npy = both_paths(fwd_bwd(ops.softmax_forward, ops.softmax_backward, (x,), seed))
    assert_close(nb, npy, dtype)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, lead=lead_dims, n=st.sampled_from([3, 70_000]), dtype=dtypes, tanh_form=st.booleans(),
       scale=st.sampled_from([4.0, 1e-3, 30.0]))
def test_gelu_parity(seed, lead, n, dtype, tanh_form, scale):
    """n = 70,000: the kernels run in parallel; scale 1e-3: tanh and erf near 0, 30: saturated"""
    x = np.asarray(scale * np.random.default_rng(seed).standard_normal(lead + (n,))).astype(dtype)
    fwd = ops.gelu_tanh_forward if tanh_form else ops.gelu_forward
    nb, npy = both_paths(fwd_bwd(fwd, ops.gelu_backward, (x,), seed))
    assert_close(nb, npy, dtype)

@settings(max_examples=20, deadline=None)
@given(seed=seeds, lead=lead_dims, n=st.sampled_from([3, 70_000]), dtype=dtypes, p=st.sampled_from([0.1, 0.5, 0.9]))
def test_dropout_parity(seed, lead, n, dtype, p):
    """The kernel's counter-based mask is the NumPy path's, bit for bit, from the same Generator state"""
    x = np.random.default_rng(seed).standard_normal(lead + (n,)).astype(dtype)
    nb, npy = both_paths(lambda: ops.dropout_forward(x, p, np.random.default_rng(seed)))
    for a, b in zip(nb, npy):
        assert a.dtype == b.dtype == dtype and np.array_equal(a, b)


def test_dropout_mask_statistics():
    """keep fraction 1 - p within 5 sigma, kept elements scaled by exactly 1/(1 - p), a fresh mask each
    call (two calls agree on about (1-p)^2 + p^2 of the elements, as independent masks do)"""
    rng, n, p = np.random.default_rng(0), 1_000_000, 0.1
    x = np.ones(n)
    y1, k1 = ops.dropout_forward(x, p, rng)
    y2, _ = ops.dropout_forward(x, p, rng)
    kept = y1 != 0
    assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
    assert np.all(y1[kept] == 1 / (1 - p)) and np.array_equal(y1, k1)
    agree = (kept == (y2 != 0)).mean()
    assert abs(agree - ((1 - p) ** 2 + p ** 2)) < 5 * np.sqrt(0.18 * 0.82 / n)


# vocabulary sizes on both sides of row_max's 64 lanes, with and without a remainder
vocab = st.integers(1, 30) | st.integers(60, 300)


def logits_and_targets(rng, shape, dtype, scale, ignore, neg_inf=0.0):
    """logits (shape) of the given scale, a fraction neg_inf of them -inf (never a target, nor column 0),
    and targets with a fraction `ignore` of -100"""
    logits = (scale * rng.standard_normal(shape)).astype(dtype)
    t = rng.integers(0, shape[-1], shape[:-1])
    cols = np.arange(shape[-1])
    logits[(rng.random(shape) < neg_inf) & (cols > 0) & (cols != t[..., None])] = -np.inf
    return logits, np.where(rng.random(shape[:-1]) < ignore, -100, t)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, lead=lead_dims, V=vocab, dtype=dtypes, scale=st.sampled_from([1.0, 1e3]),
       ignore=st.sampled_from([0.0, 0.3, 1.0]), neg_inf=st.sampled_from([0.0, 0.2]))
def test_cross_entropy_parity(seed, lead, V, dtype, scale, ignore, neg_inf):
    logits, t = logits_and_targets(np.random.default_rng(seed), lead + (V,), dtype, scale, ignore, neg_inf)
    nb, npy = both_paths(fwd_bwd(ops.cross_entropy_forward, ops.cross_entropy_backward, (logits, t), seed))
    assert_close(nb, npy, dtype)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, N=st.integers(1, 80), V=vocab | st.integers(1000, 3000), dtype=dtypes,
       scale=st.sampled_from([1.0, 30.0]), ignore=st.sampled_from([0.0, 0.3, 1.0]))
def test_cross_entropy_unit_gradient(seed, N, V, dtype, scale, ignore):
    """dloss = 1, what a model's backward() asks (the Numba path returns the forward's gradient as it
    is; large shapes run in parallel): equal on both paths, and the same on a second backward."""
    logits, t = logits_and_targets(np.random.default_rng(seed), (N, V), dtype, scale, ignore)

    def run():
        loss, cache = ops.cross_entropy_forward(logits, t)
        d = ops.cross_entropy_backward(1.0, cache)
        again = ops.cross_entropy_backward(np.float64(1.0), cache)
        np.testing.assert_array_equal(again, d)
        return loss, d, ops.cross_entropy_backward(0.5, cache)

    nb, npy = both_paths(run)
    assert_close(nb, npy, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_nonpositive_within_an_ulp(dtype):
    """The kernels' own exp (numba has no SVML) against exp in extended precision: within one ulp
    where the Horner steps fuse (FMA; 1.16 ulp measured without it, NUMBA_CPU_NAME=generic), down
    through the subnormals to 0; -inf gives 0 and NaN NaN."""
    import llvmlite.binding as llvm
    from numba import config, njit
    from numlm.kernels.softmax import exp_nonpositive

    @njit
    def apply(r, out):
        for i in range(r.size):
            out[i] = exp_nonpositive(r[i])

    rng = np.random.default_rng(0)
    lo = np.log(np.finfo(dtype).smallest_subnormal) - 2
    r = np.concatenate([-rng.random(50_000) * 0.7, -rng.exponential(20, 50_000), rng.random(50_000) * lo,
                        [0.0, -0.0, lo, 2 * lo, -np.inf]]).astype(dtype)
    out = np.empty_like(r)
    apply(r, out)
    exact = np.exp(r.astype(np.longdouble))
    ulp = np.spacing(np.maximum(exact, np.finfo(dtype).tiny).astype(dtype)).astype(np.longdouble)
    fused = config.CPU_NAME in (None, "host") and llvm.get_host_cpu_features().get("fma", False)
    assert (np.abs(out - exact) / ulp).max() <= (1.0 if fused else 1.25)
    assert out[-5] == out[-4] == 1 and out[-3] == out[-2] == out[-1] == 0
    apply(np.array([np.nan], dtype), out[:1])
    assert np.isnan(out[0])


@settings(max_examples=30, deadline=None)
@given(seed=seeds, lead=lead_dims, V=st.integers(1, 20), C=st.integers(1, 20), dtype=dtypes,
       pad=st.booleans())
def test_embedding_parity(seed, lead, V, C, dtype, pad):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, lead + (5,))  # repeated ids: the scatter-add must sum them
    w = rng.standard_normal((V, C)).astype(dtype)
    nb, npy = both_paths(fwd_bwd(ops.embedding_forward, ops.embedding_backward, (ids, w), seed,
                                 padding_idx=0 if pad else None))
    assert_close(nb, npy, dtype)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, lead=lead_dims, V=st.integers(1, 20), C=st.integers(1, 20), dtype=dtypes,
       pad=st.booleans())
def test_embedding_backward_into_a_gradient(seed, lead, V, C, dtype, pad):
    """out= adds the scatter into a gradient already holding a sum (a tied head's), on both paths: the
    same as adding the returned dweight, row padding_idx of out untouched"""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, lead + (5,))
    w = rng.standard_normal((V, C)).astype(dtype)
    prior = rng.standard_normal((V, C)).astype(dtype)
    _, cache = ops.embedding_forward(ids, w, 0 if pad else None)
    dout = rng.standard_normal(ids.shape + (C,)).astype(dtype)

    def run():
        g = prior.copy()
        assert ops.embedding_backward(dout, cache, out=g) is g
        return g
    nb, npy = both_paths(run)
    assert_close(nb, prior + ops.embedding_backward(dout, cache), dtype)
    assert_close(npy, prior + ops.embedding_backward(dout, cache), dtype)
    if pad:
        assert (nb[0] == prior[0]).all() and (npy[0] == prior[0]).all()


MASKS = ["none", "causal", "padding", "bool4d", "openai_left", "kv_cache", "dropout"]


@settings(max_examples=50, deadline=None)
@given(seed=seeds, B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 9), D=st.integers(1, 8),
       dtype=dtypes, kind=st.sampled_from(MASKS))
def test_attention_parity(seed, B, H, T, D, dtype, kind):
    rng = np.random.default_rng(seed)
    Tq = max(1, T // 2) if kind == "kv_cache" else T
    q = rng.standard_normal((B, H, Tq, D)).astype(dtype)
    k, v = (rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(2))
    n_pad = rng.integers(0, T + 1, B)[:, None]
    kw = {"none": {}, "causal": {"causal": True}, "kv_cache": {"causal": True},
          "padding": {"attention_mask": (np.arange(T) < T - n_pad).astype(np.int64)},
          "bool4d": {"attention_mask": rng.random((B, H, Tq, T)) < 0.5},
          "openai_left": {"attention_mask": (np.arange(T) >= n_pad).astype(np.int64), "causal": True,
                          "causal_fill": -1e4},
          "dropout": {"dropout_p": 0.2, "scale": 0.3}}[kind]

    def run():
        extra = {"rng": np.random.default_rng(seed)} if kind == "dropout" else {}
        return fwd_bwd(ops.attention_forward, ops.attention_backward, (q, k, v), seed, **kw, **extra)()

    nb, npy = both_paths(run)
    assert_close(nb, npy, dtype)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 9), D=st.integers(1, 8),
       dtype=dtypes, kind=st.sampled_from(["none", "padding", "causal", "one query"]))
def test_attention_forward_writes_into_the_merged_heads(seed, B, H, T, D, dtype, kind):
    """out=: the output written into the per-head view of a (B, T, H, D) array and returned, on both
    paths, the numbers without out (a decoding step's kernel may return its own); causal in query blocks
    of 2 rows (the kernel path's visible_forward) from T = 4 on"""
    rng = np.random.default_rng(seed)
    Tq = 1 if kind == "one query" else T
    q = rng.standard_normal((B, H, Tq, D)).astype(dtype)
    k, v = (rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(2))
    kw = {"none": {}, "one query": {}, "causal": {"causal": True},
          "padding": {"attention_mask": (np.arange(T) < T - rng.integers(0, T + 1, B)[:, None]).astype(np.int64)}}[kind]

    def run():
        plain, _ = ops.attention_forward(q, k, v, **kw)
        merged = np.full((B, Tq, H, D), np.nan, dtype)
        heads = merged.transpose(0, 2, 1, 3)
        got, _ = ops.attention_forward(q, k, v, **kw, out=heads)
        if got is not heads:
            assert Tq == 1  # a decoding step's kernel
            heads[...] = got
        return plain, heads.copy()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "BLOCK_ROWS", 2)
        for plain, into in both_paths(run):
            assert_close(into, plain, dtype)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, B=st.integers(1, 3), H=st.integers(1, 3), Tq=st.integers(1, 9), Tk=st.integers(1, 9),
       dtype=dtypes, per_head=st.booleans(), openai=st.booleans())
def test_masked_softmax_kernels_are_scale_mask_then_softmax(seed, B, H, Tq, Tk, dtype, per_head, openai):
    """attention's one-pass kernels give the numbers of scale_mask then softmax (forward) and of softmax's
    backward then scale_mask (backward), in place, on codes of every kind (masked rows whole, OpenAI's
    future fill)"""
    from numlm.kernels.softmax import (softmax_rows, softmax_backward_rows, masked_softmax_kernel,
                                       masked_softmax_backward_kernel)
    from numlm.ops.attention import scale_mask
    rng = np.random.default_rng(seed)
    s = (3 * rng.standard_normal((B, H, Tq, Tk))).astype(dtype)
    codes = rng.integers(0, 3 if openai else 2, (B, H if per_head else 1, Tq, Tk)).astype(np.int8)
    dt, lowest = dtype, np.finfo(dtype).min
    fill = dt(-1e4) if openai else lowest
    two = scale_mask(s.copy(), 0.3, codes, lowest, fill)
    p_two = softmax_rows(two.reshape(-1, Tk))[0].reshape(s.shape)
    one = s.copy()
    p_one = masked_softmax_kernel(one, dt(0.3), codes, dt(lowest), fill, np.full((1, Tq), Tk))
    assert p_one is one
    assert_close(p_one, p_two, dtype)
    dp = rng.standard_normal(s.shape).astype(dtype)
    ds_two = scale_mask(softmax_backward_rows(dp.reshape(-1, Tk), p_two.reshape(-1, Tk)).reshape(s.shape),
                        0.3, codes, 0, 0)
    # after dropout pd = p * keep: the kernel reads p and pd, the chain dp * keep then softmax's backward
    keep = (rng.random(s.shape) >= 0.3) / dt(0.7)
    ds_drop = scale_mask(softmax_backward_rows((dp * keep).astype(dtype).reshape(-1, Tk),
                                               p_two.reshape(-1, Tk)).reshape(s.shape), 0.3, codes, 0, 0)
    got = masked_softmax_backward_kernel(dp.copy(), p_two, (p_two * keep).astype(dtype), True, dt(0.3), codes,
                                         np.full((1, Tq), Tk))
    assert_close(got, ds_drop, dtype)
    assert_close(masked_softmax_backward_kernel(dp, p_two, p_two, False, dt(0.3), codes, np.full((1, Tq), Tk)),
                 ds_two, dtype)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 9), D=st.integers(1, 8),
       dtype=dtypes, kind=st.sampled_from(["none", "padding", "causal", "dropout"]), split=st.booleans())
def test_attention_backward_writes_into_the_joined_heads(seed, B, H, T, D, dtype, kind, split):
    """out=: dq, dk, dv written into per-head views of one (B, T, 3, H, D) array, on both paths, the
    products split or not, the numbers of the backward without out; causal in query blocks of 2 rows"""
    from numlm.kernels import matmul as mm
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(3))
    kw = {"none": {}, "causal": {"causal": True}, "dropout": {"dropout_p": 0.2},
          "padding": {"attention_mask": (np.arange(T) < T - rng.integers(0, T + 1, B)[:, None]).astype(np.int64)}}[kind]
    dout = rng.standard_normal((B, T, H, D)).astype(dtype).transpose(0, 2, 1, 3)  # a view, as Attention passes

    def run():
        _, cache = ops.attention_forward(q, k, v, **kw, rng=np.random.default_rng(seed))
        plain = ops.attention_backward(np.ascontiguousarray(dout), cache)
        joined = np.full((B, T, 3, H, D), np.nan, dtype)
        heads = [joined[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]
        got = ops.attention_backward(dout, cache, out=heads)
        assert all(g is h for g, h in zip(got, heads))
        return plain + tuple(h.copy() for h in heads)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm, "SPLIT_MIN_MACS", 0 if split else mm.SPLIT_MIN_MACS)
        mp.setattr(attention, "BLOCK_ROWS", 2)
        for res in both_paths(run):
            for a, b in zip(res[:3], res[3:]):
                assert_close(b, a, dtype)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, B=st.integers(1, 3), H=st.integers(1, 3), Tk=st.integers(1, 11), D=st.integers(1, 9),
       room=st.integers(0, 5), dtype=dtypes, kind=st.sampled_from(["none", "causal", "padding", "bool4d", "openai_left"]))
def test_one_query_row_kernel(seed, B, H, Tk, D, room, dtype, kind):
    """A decoding step's attention (T_q = 1, no dropout: kernels.softmax.attention_rows_kernel) gives the
    NumPy path's output, probabilities and gradients, with k, v contiguous or the first T_k rows of a
    longer buffer (a KV cache grown in place) and every mask kind."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, 1, D)).astype(dtype)
    k, v = (rng.standard_normal((B, H, Tk + room, D)).astype(dtype)[:, :, :Tk] for _ in range(2))
    n_pad = rng.integers(0, Tk + 1, B)[:, None]  # all keys padded too: a uniform row
    kw = {"none": {}, "causal": {"causal": True, "scale": 0.7},
          "padding": {"attention_mask": (np.arange(Tk) < Tk - n_pad).astype(np.int64), "causal": True},
          "bool4d": {"attention_mask": rng.random((B, 1, 1, Tk)) < 0.5},
          "openai_left": {"attention_mask": (np.arange(Tk) >= n_pad).astype(np.int64), "causal": True,
                          "causal_fill": -1e4}}[kind]

    def run():
        out, cache = ops.attention_forward(q, k, v, **kw)
        dout = np.random.default_rng(seed).standard_normal(out.shape).astype(dtype)
        return (out, cache.probs) + ops.attention_backward(dout, cache)

    nb, npy = both_paths(run)
    assert_close(nb, npy, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_row_same_bits_wherever_its_output_lies(dtype):
    """softmax_row gives the same bits wherever y lies after x (attention_rows_kernel's p and s lie where
    malloc put them). LLVM runs a loop that reads x and stores into y in its vector form only when y does
    not start within 256 bytes after x, else its scalar form: a sum in that loop added in another order
    there and moved the last bit (a decoding step 1-2 ulp off the modules' forward, on some calls only)"""
    from numlm.kernels.softmax import softmax_row
    rng = np.random.default_rng(0)
    for n in (5, 8, 12, 19, 26, 31, 40, 63):
        for _ in range(20):
            x0 = (3 * rng.standard_normal(n)).astype(dtype)
            buf = np.zeros(4 * n + 1024, dtype)
            far, near = buf[-n:], buf[n:2 * n]  # near: right after x, far: 1 KB or more after it
            for y in (far, near):
                buf[:n] = x0
                softmax_row(buf[:n], y)
            np.testing.assert_array_equal(near, far, err_msg=f"n={n}")


def test_rows_buffer_finds_the_cache_buffer():
    from numlm.ops.attention import rows_buffer
    buf = np.zeros((2, 3, 8, 4), np.float32)
    assert rows_buffer(buf[:, :, :5]) is buf
    for view in (buf[:, :, 1:5], buf[:, :2, :5], buf[..., :3], buf[:1, :, :5]):
        got = rows_buffer(view)
        assert got is not buf and got.flags.c_contiguous and np.array_equal(got, view)


CAUSAL = ["causal", "kv_cache", "right_pad", "mask4d", "no_allowed_key", "openai", "dropout"]


@pytest.mark.parametrize("kind", CAUSAL)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("split", [False, True])
def test_causal_blocks_skip_the_future_exactly(kind, dtype, split, monkeypatch):
    """The kernel path's causal query blocks (ops.attention.visible_forward) give the NumPy path's output,
    gradients and probabilities (zeros in the future), or fall back to the full products where skipping
    the future would not be exact (a query with no allowed key; OpenAI's -1e4 future). split: the
    products' stacks over 3 threads, however small."""
    from numlm.ops import attention
    from numlm.kernels import matmul as mm
    monkeypatch.setattr(attention, "BLOCK_ROWS", 3)  # blocks at a test's size (64 rows by default)
    if split:
        monkeypatch.setattr(mm, "SPLIT_MIN_MACS", 0)
        monkeypatch.setattr(mm, "workers", lambda: 3)
    rng = np.random.default_rng(0)
    B, H, T, D = 3, 2, 11, 4
    Tk = T + 4 if kind == "kv_cache" else T
    q = rng.standard_normal((B, H, T, D)).astype(dtype)
    k, v = (rng.standard_normal((B, H, Tk, D)).astype(dtype) for _ in range(2))
    first_real = {"no_allowed_key": [0, 4, 2], "openai": [0, 4, 2]}.get(kind)  # left padding
    kw = {"causal": True, "causal_fill": -1e4 if kind == "openai" else None,
          "dropout_p": 0.3 if kind == "dropout" else 0.0}
    if kind == "right_pad":
        kw["attention_mask"] = (np.arange(Tk) < np.array([[Tk], [6], [1]])).astype(np.int64)
    if first_real is not None:
        kw["attention_mask"] = (np.arange(Tk) >= np.array(first_real)[:, None]).astype(np.int64)
    if kind == "mask4d":  # any pattern in which every query keeps its own key
        kw["attention_mask"] = (rng.random((B, 1, T, Tk)) < 0.5) | np.eye(T, Tk, dtype=bool)

    def run():
        out, cache = ops.attention_forward(q, k, v, rng=np.random.default_rng(1), **kw)
        dout = np.random.default_rng(2).standard_normal(out.shape).astype(dtype)
        return (out, cache.probs) + ops.attention_backward(dout, cache), cache.blocks

    (nb, blocks), (npy, _) = both_paths(run)
    assert (blocks is None) == (kind in ("no_allowed_key", "openai"))
    assert_close(nb, npy, dtype)


PADDING = {"right_pad": [10, 3, 7, 1], "dropout": [10, 3, 7, 1], "mask4d": [10, 3, 7, 1], "out": [9, 3, 7, 1],
           "no_allowed_key": [10, 3, 7, 0], "few_padded": [10, 10, 10, 9], "left_pad": None}


@pytest.mark.parametrize("kind", list(PADDING))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("split", [False, True])
def test_padding_blocks_skip_padded_keys_exactly(kind, dtype, split, monkeypatch):
    """The kernel path skips each batch row's keys after its last real one (ops.attention.padding_blocks):
    output, gradients and probabilities (zeros there) are the NumPy path's, written into a strided out
    too (merged heads); it runs the full products where that would gain little (left padding, one key
    of forty) or not be exact (a row with no allowed key). split: the products over 3 threads, however
    small (parts of a batch of about equal work)."""
    from numlm.kernels import matmul as mm
    if split:
        monkeypatch.setattr(mm, "SPLIT_MIN_MACS", 0)
        monkeypatch.setattr(mm, "workers", lambda: 3)
    rng = np.random.default_rng(0)
    B, H, T, D = 4, 2, 10, 3
    q, k, v = (rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(3))
    lengths = PADDING[kind]
    mask = np.arange(T) < np.array(lengths)[:, None] if lengths else np.arange(T) >= np.array([[0], [3], [7], [9]])
    if kind == "mask4d":  # any pattern before each row's end that keeps key 0
        mask = mask[:, None, None, :] & ((rng.random((B, 1, T, T)) < 0.5) | (np.arange(T) == 0))
    kw = {"attention_mask": mask if kind == "mask4d" else mask.astype(np.int64),
          "dropout_p": 0.3 if kind == "dropout" else 0.0}

    def run():
        merged = np.full((B, T, H, D), np.nan, dtype) if kind == "out" else None
        out, cache = ops.attention_forward(q, k, v, rng=np.random.default_rng(1), **kw,
                                           out=None if merged is None else merged.transpose(0, 2, 1, 3))
        assert merged is None or np.shares_memory(out, merged)
        dout = np.random.default_rng(2).standard_normal(out.shape).astype(dtype)
        return (out, cache.probs) + ops.attention_backward(dout, cache), cache.blocks

    (nb, blocks), (npy, _) = both_paths(run)
    if kind in ("no_allowed_key", "few_padded", "left_pad"):
        assert blocks is None
    else:
        assert [row for row in blocks] == [[(0, T, n)] for n in lengths]
        assert (nb[1][1, :, :, 3:] == 0).all() and (nb[3][1, :, 3:] == 0).all()  # probabilities, dk
    assert_close(nb, npy, dtype)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, B=st.integers(1, 3), H=st.integers(1, 3), Tq=st.integers(1, 9), past=st.integers(0, 4),
       dtype=dtypes, pad=st.booleans(), heads=st.booleans())
def test_causal_masked_softmax_kernels_give_the_full_rows_numbers(seed, B, H, Tq, past, dtype, pad, heads):
    """masked_softmax_kernel, causal: scale_mask then softmax over each row's visible keys only (the
    future never read: NaN there), in place, 0 after them; its backward: softmax's, then scale_mask's with
    0, in place. The same numbers as the full rows' (float64 to rounding; the backward's sums run over the
    same terms)."""
    from numlm.kernels.softmax import (masked_softmax_kernel, masked_softmax_backward_kernel, softmax_rows,
                                       softmax_backward_rows)
    from numlm.ops.attention import scale_mask
    rng = np.random.default_rng(seed)
    Tk = Tq + past
    mask = (np.arange(Tk) >= rng.integers(0, past + 1, B)[:, None]).astype(np.int64) if pad else None
    codes = ops.attention_allowed(mask, B, Tq, Tk, True)
    if codes is None:  # Tq = 1: one query sees every key
        codes = np.ones((1, 1, Tq, Tk), np.int8)
    if heads:  # per-head codes: one more key masked in head 0, the query's own kept
        codes = np.repeat(codes, H, axis=1)
        codes[:, 0, :, 0] = np.where(np.arange(Tq) + past > 0, 0, codes[:, 0, :, 0])
    dt, lowest = dtype, np.finfo(dtype).min
    s = (rng.standard_normal((B, H, Tq, Tk)) * 3).astype(dt)
    full = scale_mask(s.copy(), 0.7, codes, lowest, lowest)
    want = softmax_rows(full.reshape(-1, Tk))[0].reshape(s.shape)
    future = np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + past
    s[..., future] = np.nan  # unwritten by visible_forward's products
    ends = (past + 1 + np.arange(Tq))[None]  # each query's own key and the ones before
    got = masked_softmax_kernel(s.copy(), dt(0.7), codes, dt(lowest), dt(lowest), ends)
    assert_close(got, want, dtype)
    assert (got[..., future] == 0).all()
    dp = rng.standard_normal(s.shape).astype(dt)
    ds = scale_mask(softmax_backward_rows(dp.reshape(-1, Tk), want.reshape(-1, Tk)).reshape(s.shape), 0.7, codes, 0, 0)
    dp[..., future] = np.nan
    assert_close(masked_softmax_backward_kernel(dp.copy(), want, want, False, dt(0.7), codes, ends), ds, dtype)
    keep = (rng.random(s.shape) >= 0.25) / dt(0.75)  # after dropout: dp * keep, then softmax's backward
    dp_kept = np.where(future, 0, dp * keep).astype(dt)
    ds = scale_mask(softmax_backward_rows(dp_kept.reshape(-1, Tk), want.reshape(-1, Tk)).reshape(s.shape), 0.7,
                    codes, 0, 0)
    got = masked_softmax_backward_kernel(dp.copy(), want, (want * keep).astype(dt), True, dt(0.7), codes, ends)
    assert_close(got, ds, dtype)
    assert (got[..., future] == 0).all()


@pytest.mark.parametrize("kind", ["causal", "kv_cache", "right_pad", "padding"])
def test_causal_blocks_gradcheck(kind, monkeypatch):
    """Central differences of the kernel path's causal blocks (masked_softmax_kernel and its backward
    inside), float64, blocks of 2 queries; and of padding's blocks (the keys after a row's last skipped)."""
    from numlm.gradchecking import gradcheck
    from numlm.ops import attention
    monkeypatch.setattr(attention, "BLOCK_ROWS", 2)
    rng = np.random.default_rng(3)
    B, H, T, D = 2, 2, 6, 3
    Tk = T + 3 if kind == "kv_cache" else T
    q = rng.standard_normal((B, H, T, D))
    k, v = (rng.standard_normal((B, H, Tk, D)) for _ in range(2))
    kw = {"causal": kind != "padding", "scale": 0.6}
    if kind in ("right_pad", "padding"):
        kw["attention_mask"] = (np.arange(Tk) < np.array([[Tk], [4 if kind == "right_pad" else 2]])).astype(np.int64)
    previous = set_numba(True)
    try:
        assert ops.attention_forward(q, k, v, **kw)[1].blocks is not None
        errs = gradcheck(ops.attention_forward, (q, k, v), ops.attention_backward, kwargs=kw, eps=2.0 ** -16)
    finally:
        set_numba(previous)
    assert set(errs) == {"q", "k", "v"} and max(errs.values()) < 1e-7, errs


@pytest.mark.parametrize("case", ["plain", "prefix", "broken", "split"])
def test_causal_blocks_inside_gpt2(case, monkeypatch):
    """A GPT-2 step with causal blocks on the kernel path (their heads split and merged in place: views of
    c_attn's output, out and d[q | k | v] written merged) gives the NumPy path's logits and gradients, with
    a prefix past (dk, dv longer than T), under inspect's broken attention backward (its dq, dk, dv are
    new arrays), and with the stacks split over 3 threads."""
    import numlm
    from numlm.inspect import broken_backward
    from numlm.ops import attention
    from numlm.kernels import matmul as mm
    monkeypatch.setattr(attention, "BLOCK_ROWS", 2)
    if case == "split":
        monkeypatch.setattr(mm, "SPLIT_MIN_MACS", 0)
        monkeypatch.setattr(mm, "workers", lambda: 3)
    cfg = numlm.GPT2Config(vocab_size=11, n_positions=16, n_embd=12, n_layer=2, n_head=3,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = numlm.GPT2LMHeadModel(cfg, seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, (3, 7))
    past = tuple((rng.standard_normal((3, 3, 2, 4)), rng.standard_normal((3, 3, 2, 4))) for _ in range(2))
    kw = {"past_key_values": past} if case == "prefix" else {}

    def run():
        model.zero_grad()
        out = model(ids, labels=ids, **kw)
        if case == "broken":
            with broken_backward("attention"):
                model.backward()
        else:
            model.backward()
        blocks = model.transformer.h[0].attn.core.cache.blocks
        return (out.logits,) + tuple(g.copy() for g in model.grad_arrays().values()), blocks

    (nb, blocks), (npy, _) = both_paths(run)
    assert blocks is not None  # the kernel path ran the causal blocks
    assert_close(nb, npy, np.float64)


def test_switch_and_env():
    previous = set_numba(False)
    assert not kernels.numba_enabled()
    assert set_numba(True) is False and kernels.numba_enabled()
    set_numba(previous)
    code = "from numlm import kernels; print(kernels.numba_enabled())"
    env = dict(os.environ, NUMLM_NUMBA="0", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_small_inputs_run_one_thread_and_restore_the_count():
    """adaptive: below PARALLEL_MIN_ELEMENTS a parallel kernel runs on one Numba thread, and the
    calling thread's count is what it was after the call, large inputs and small alike."""
    import numba
    from numlm.kernels.softmax import softmax_rows
    before = numba.get_num_threads()
    count = kernels.adaptive(numba.njit(lambda x: numba.get_num_threads()))  # the count inside the kernel
    assert count(np.zeros(3)) == 1 and numba.get_num_threads() == before
    large = np.zeros(kernels.PARALLEL_MIN_ELEMENTS)
    assert count(large) == before and numba.get_num_threads() == before
    x = np.random.default_rng(0).standard_normal((3, 5))
    for got, want in zip(softmax_rows(x), softmax_rows.kernel(x)):
        np.testing.assert_array_equal(got, want)
    assert numba.get_num_threads() == before


@settings(max_examples=30, deadline=None)
@given(seed=seeds, N=st.integers(1, 4), C=st.integers(1, 300), dtype=dtypes)
def test_serial_twins_give_the_parallel_kernels_numbers(seed, N, C, dtype):
    """adaptive(kernel, serial): small inputs run the serial twin (no parallel region), which gives
    the parallel kernel's numbers: LayerNorm and tanh GELU, a decoding step's kernels."""
    from numlm.kernels.activations import gelu_tanh_kernel
    from numlm.kernels.layernorm import layernorm_forward_kernel
    rng = np.random.default_rng(seed)
    x, g, b = rng.standard_normal((N, C)).astype(dtype), *rng.standard_normal((2, C)).astype(dtype)
    assert_close(layernorm_forward_kernel(x, g, b, 1e-5), layernorm_forward_kernel.kernel(x, g, b, 1e-5), dtype)
    f = x.dtype.type
    consts = (f(0.5), f(1.0), f(0.7978845608028654), f(0.044715))
    assert_close(gelu_tanh_kernel(x.reshape(-1), *consts), gelu_tanh_kernel.kernel(x.reshape(-1), *consts), dtype)


@pytest.mark.parametrize("numba", [True, False], ids=["numba", "numpy"])
def test_float32_stays_float32(numba):
    previous = set_numba(numba)
    try:
        x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
        g = np.ones(4, np.float32)
        for out, cache in (ops.layernorm_forward(x, g, g), ops.softmax_forward(x), ops.gelu_forward(x),
                           ops.gelu_tanh_forward(x)):
            assert out.dtype == np.float32
        loss, cache = ops.cross_entropy_forward(x, np.zeros((2, 3), int))
        assert loss.dtype == np.float32 and ops.cross_entropy_backward(1.0, cache).dtype == np.float32
    finally:
        set_numba(previous)


@pytest.fixture(scope="module")
def always_split():
    """Split every product into 3 row blocks, however small (the default splits only large ones)."""
    from numlm.kernels import matmul as mm
    if mm._blas is None:
        pytest.skip("numpy's BLAS is not OpenBLAS: products are never split")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm, "SPLIT_MIN_MACS", 0)
        mp.setattr(mm, "workers", lambda: 3)
        mp.setattr(mm, "BLAS_SPINS_FOR", 0.0)  # few-row products are split even right after a GEMV
        mp.setattr(mm, "_blas_spins_until", [0.0])
        yield mm


@settings(max_examples=25, deadline=None)
@given(seed=seeds, M=st.integers(1, 20), K=st.integers(1, 9), N=st.integers(1, 9), S=st.integers(1, 6),
       dtype=dtypes, transpose=st.booleans(), by_columns=st.booleans())
def test_split_matmul_is_the_product_plus_bias(always_split, seed, M, K, N, S, dtype, transpose, by_columns):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((K, M) if transpose else (M, K)).astype(dtype)
    a = a.T if transpose else a  # a strided view, as dW = x^T dy passes
    b = rng.standard_normal((K, N)).astype(dtype)
    bias = rng.standard_normal(N).astype(dtype)  # added by the thread of each row or column block
    with pytest.MonkeyPatch.context() as mp:  # 2-D products of few rows split by columns
        mp.setattr(always_split, "COLUMN_SPLIT_ROWS", 1000 if by_columns else 0)
        assert_close(always_split.matmul(a, b), a @ b, dtype)
        assert_close(always_split.matmul(a, b, bias=bias), a @ b + bias, dtype)
    a3 = rng.standard_normal((S, M, K)).astype(dtype)
    b3 = rng.standard_normal((S, N, K)).astype(dtype).swapaxes(-1, -2)
    assert_close(always_split.matmul(a3, b3), a3 @ b3, dtype)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, M=st.integers(1, 12), K=st.integers(1, 9), N=st.integers(1, 9), lead=st.sampled_from([(), (2, 3)]),
       dtype=dtypes, work_ratio=st.sampled_from([1, 3]))
def test_mm_pair_is_both_products(always_split, seed, M, K, N, lead, dtype, work_ratio):
    """(a @ b, c @ d) as a layer's dx = dy W^T and dW = x^T dy pass them (transposed views; stacked
    (B, H, ..) for attention); products of unequal work go one after the other through matmul."""
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal(lead + (M, N)).astype(dtype)
    w = rng.standard_normal((K, N)).astype(dtype)
    x = rng.standard_normal(lead + (M * work_ratio, K)).astype(dtype)
    w = np.broadcast_to(w, lead + w.shape).copy()
    ab, cd = always_split.mm_pair(dy, w.swapaxes(-1, -2), x.swapaxes(-1, -2), dy if work_ratio == 1 else x)
    assert_close(ab, dy @ w.swapaxes(-1, -2), dtype)
    assert_close(cd, x.swapaxes(-1, -2) @ (dy if work_ratio == 1 else x), dtype)
    assert ab.dtype == cd.dtype == dtype
    g = rng.standard_normal(cd.shape).astype(dtype)  # into=: c @ d added into a gradient, on both paths
    for flag in (True, False):
        previous = set_numba(flag)
        try:
            into = g.copy()
            ab2, cd2 = always_split.mm_pair(dy, w.swapaxes(-1, -2), x.swapaxes(-1, -2),
                                            dy if work_ratio == 1 else x, into=into)
        finally:
            set_numba(previous)
        assert cd2 is into
        assert_close(ab2, ab, dtype)
        assert_close(cd2, g + cd, dtype)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, B=st.integers(1, 5), H=st.integers(1, 3), T=st.integers(1, 7), D=st.integers(1, 5), dtype=dtypes)
def test_mm_takes_heads_as_strided_views(always_split, seed, B, H, T, D, dtype):
    """mm over (B, H, T, D) views of a joined (B, T, 3, H, D) [q | k | v] (split over B, or over B*H when
    B is smaller than the cores): the products of the contiguous copies"""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3, H, D)).astype(dtype)
    q, k = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(2))
    assert not q.flags.c_contiguous or H * T == 1
    assert_close(always_split.mm(q, k.swapaxes(-1, -2)), np.ascontiguousarray(q) @ np.ascontiguousarray(k).swapaxes(-1, -2), dtype)


def test_products_run_blas_on_one_thread_and_restore_its_count():
    """Every product of matmul() (split or not) calls BLAS at one thread, but a one-row product (a
    GEMV of a weight under COLS_GEMV_BYTES) at the process's count; each leaves the count it found."""
    from numlm.kernels import matmul as mm
    if mm._blas is None:
        pytest.skip("numpy's BLAS is not OpenBLAS: products are never split")
    seen = []
    rng = np.random.default_rng(0)
    with pytest.MonkeyPatch.context() as mp:
        real = np.matmul
        mp.setattr(mm.np, "matmul", lambda *a, **k: (seen.append(mm._blas[1]()), real(*a, **k))[1])
        mp.setattr(mm, "_gemv_alone_until", [0.0])
        mp.setattr(mm, "_blas_spins_until", [0.0])
        before = mm._blas[1]()
        for shape_a, shape_b in [((3, 4), (4, 5)), ((512, 64), (64, 64)), ((1, 4, 9), (1, 9, 2)),
                                 ((1, 256), (256, 256))]:
            a, b = rng.standard_normal(shape_a), rng.standard_normal(shape_b)
            np.testing.assert_allclose(mm.matmul(a, b), real(a, b), rtol=1e-12, atol=1e-12)
            assert mm._blas[1]() == before
    assert seen and set(seen[:-1]) == {1} and seen[-1] == before


@settings(max_examples=40, deadline=None)
@given(seed=seeds, M=st.integers(1, 9), K=st.integers(1, 9), N=st.integers(1, 9), dtype=dtypes,
       layout=st.sampled_from(["C", "a^T", "b^T", "columns of out", "strided a"]))
def test_gemm_add_adds_the_product_in_place_or_declines(seed, M, K, N, dtype, layout):
    """gemm_add(a, b, out): out += a @ b in one BLAS call for the layouts the products pass (transposed
    views, a column block of out); False and out untouched for a layout BLAS cannot read in place"""
    from numlm.kernels import matmul as mm
    if not mm._gemm:
        pytest.skip("numpy's BLAS is not OpenBLAS")
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
    a = np.asfortranarray(a) if layout == "a^T" else a[:, ::-1].copy()[:, ::-1] if layout == "strided a" else a
    b = np.asfortranarray(b) if layout == "b^T" else b
    wide = rng.standard_normal((M, 2 * N)).astype(dtype)
    out = wide[:, N:] if layout == "columns of out" else wide[:, :N].copy()
    before, kept = out.copy(), wide[:, :N].copy()
    assert mm.gemm_add(a, b, out) == (layout != "strided a")
    assert_close(out, before + (a @ b if layout != "strided a" else 0), dtype)
    assert (wide[:, :N] == kept).all() or layout != "columns of out"
    assert not mm.gemm_add(a.astype(np.float64 if dtype == np.float32 else np.float32), b, out)


def test_a_stalled_gemv_sends_the_next_ones_to_one_thread_for_a_while():
    """A GEMV on BLAS's threads that streams slower than GEMV_STALLED (a thread waited for a core
    another process held) makes the GEMVs of the next GEMV_ALONE_FOR seconds run on one thread;
    then BLAS's threads again. Small weights (< 1 MB) never count as stalled."""
    import time
    from numlm.kernels import matmul as mm
    if mm._blas is None:
        pytest.skip("numpy's BLAS is not OpenBLAS")
    seen, slow = [], [True]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 512))  # 2 MB
    x = rng.standard_normal((1, 512))

    def stalling(*a, **k):
        seen.append(mm._blas[1]())
        if slow[0]:
            time.sleep(0.02)  # 2 MB in 20 ms: 0.1 GB/s
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        real = np.matmul
        mp.setattr(mm.np, "matmul", stalling)
        mp.setattr(mm, "_gemv_alone_until", [0.0])
        mp.setattr(mm, "COLS_GEMV_BYTES", np.inf)  # BLAS's GEMV, not the Numba loop
        mp.setattr(mm, "_gemv_alone_for", [0.2])
        mp.setattr(mm, "GEMV_ALONE_FOR", 0.2)
        before = mm._blas[1]()
        np.testing.assert_allclose(mm.matmul(x[:, :8], w[:8, :8]), x[:, :8] @ w[:8, :8])  # small: no stall
        np.testing.assert_allclose(mm.matmul(x, w), x @ w)  # stalls
        slow[0] = False
        np.testing.assert_allclose(mm.matmul(x, w), x @ w)  # alone
        assert mm._blas[1]() == before
        time.sleep(0.25)
        np.testing.assert_allclose(mm.matmul(x, w), x @ w)  # threads again
    assert seen == [before, before, 1, before]


def test_stalls_that_recur_keep_gemvs_on_one_thread_longer():
    """A stall within the last one-thread while's length of its end doubles the next while (up to
    GEMV_ALONE_MAX); a stall after a longer quiet starts again from GEMV_ALONE_FOR."""
    import time
    from numlm.kernels import matmul as mm
    if mm._blas is None:
        pytest.skip("numpy's BLAS is not OpenBLAS")
    w, x = np.ones((512, 512)), np.ones((1, 512))  # 2 MB
    real = np.matmul
    stall = lambda *a, **k: (time.sleep(0.01), real(*a, **k))[1]  # noqa: E731  2 MB in 10 ms
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm, "_gemv_alone_until", [0.0])
        mp.setattr(mm, "_gemv_alone_for", [0.05])
        mp.setattr(mm, "COLS_GEMV_BYTES", np.inf)
        mp.setattr(mm, "GEMV_ALONE_FOR", 0.05)
        mp.setattr(mm, "GEMV_ALONE_MAX", 0.08)
        lengths = []
        for pause in (0.0, 0.06, 0.3):  # the first stall; one soon after its while; one long after
            time.sleep(pause)
            mp.setattr(mm.np, "matmul", stall)
            mm.matmul(x, w)
            mp.setattr(mm.np, "matmul", real)
            lengths.append(mm._gemv_alone_for[0])
    assert lengths == [0.05, 0.08, 0.05]


def test_few_rows_run_on_blas_threads_while_they_spin():
    """After a GEMV on BLAS's threads, a 2-D product of fewer than COLUMN_SPLIT_ROWS rows runs on them
    too, bias included, until BLAS_SPINS_FOR has passed since the last GEMV; stacked products and many
    rows stay split at one thread. A few-row product that stalls (slower than STALLED_MACS) ends the
    window and sends the GEMVs to one thread."""
    import time
    from numlm.kernels import matmul as mm
    if mm._blas is None:
        pytest.skip("numpy's BLAS is not OpenBLAS")
    seen, slow = [], [False]
    rng = np.random.default_rng(0)
    w, bias = rng.standard_normal((512, 512)), rng.standard_normal(512)  # 2 MB
    x, few, many = (rng.standard_normal((n, 512)) for n in (1, 4, 300))
    a3, b3 = rng.standard_normal((2, 4, 64)), rng.standard_normal((2, 64, 64))

    def recording(*a, **k):
        seen.append(mm._blas[1]())
        if slow[0]:
            time.sleep(0.05)  # 4 * 512 * 512 multiply-adds in 50 ms: 2e7 a second
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        real, real_gemm_add = np.matmul, mm.gemm_add
        mp.setattr(mm.np, "matmul", recording)
        mp.setattr(mm, "gemm_add", lambda *a: (seen.append(mm._blas[1]()), real_gemm_add(*a))[1])  # bias: beta = 1
        mp.setattr(mm, "SPLIT_MIN_MACS", 0)
        mp.setattr(mm, "_gemv_alone_until", [0.0])
        mp.setattr(mm, "COLS_GEMV_BYTES", np.inf)
        mp.setattr(mm, "_gemv_alone_for", [10.0])
        mp.setattr(mm, "GEMV_ALONE_FOR", 10.0)
        mp.setattr(mm, "_blas_spins_until", [0.0])
        mp.setattr(mm, "BLAS_SPINS_FOR", 0.2)
        before = mm._blas[1]()
        np.testing.assert_allclose(mm.matmul(few, w, bias=bias), few @ w + bias)  # split: at one thread
        assert seen and set(seen) == {1}
        for a, b in [(x, w), (few, w), (many, w), (a3, b3)]:  # a GEMV opens the window
            seen.clear()
            np.testing.assert_allclose(mm.matmul(a, b, bias=bias[:b.shape[-1]]), a @ b + bias[:b.shape[-1]])
            assert set(seen) == ({before} if a is x or a is few else {1}), a.shape
        mm._blas_spins_until[0] = time.perf_counter() + 0.01
        mm.matmul(few, w)  # a few-row product does not keep the window open
        time.sleep(0.02)
        seen.clear()
        mm.matmul(few, w)
        assert set(seen) == {1}
        mm.matmul(x, w)
        slow[0] = True
        mm.matmul(few, w)  # stalls on BLAS's threads
        slow[0] = False
        seen.clear()
        mm.matmul(few, w)
        assert set(seen) == {1} and mm._gemv_alone_until[0] > time.perf_counter()
        assert mm._blas[1]() == before


@settings(max_examples=25, deadline=None)
@given(seed=seeds, M=st.integers(1, 20), K=st.integers(1, 9), N=st.integers(1, 9), dtype=dtypes)
def test_few_row_products_on_blas_threads_are_the_product_plus_bias(seed, M, K, N, dtype):
    from numlm.kernels import matmul as mm
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
    bias = rng.standard_normal(N).astype(dtype)
    with pytest.MonkeyPatch.context() as mp:  # the window always open
        mp.setattr(mm, "_blas_spins_until", [np.inf])
        mp.setattr(mm, "BLAS_SPINS_FOR", np.inf)
        assert_close(mm.matmul(a, b), a @ b, dtype)
        assert_close(mm.matmul(a, b, bias=bias), a @ b + bias, dtype)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 9), dtype=dtypes)
def test_linear_parity_with_split_products(always_split, seed, B, T, dtype):
    rng = np.random.default_rng(seed)
    x, w, bias = rng.standard_normal((B, T, 5)).astype(dtype), rng.standard_normal((5, 7)).astype(dtype), \
        rng.standard_normal(7).astype(dtype)
    nb, npy = both_paths(fwd_bwd(ops.linear_forward, ops.linear_backward, (x, w, bias), seed))
    assert_close(nb, npy, dtype)



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel", ["rows_gemv", "cols_gemv"])
def test_a_gemv_over_a_large_weight_runs_a_numba_loop_and_equals_the_product(kernel, dtype):
    """h @ W^T with W (V, C) row-major (the tied LM head) of ROWS_GEMV_BYTES or more takes rows_gemv;
    x @ W with W (K, N) row-major (every linear's weight) of COLS_GEMV_BYTES or more takes cols_gemv;
    neither calls BLAS or opens BLAS's spin window (BLAS's GEMV opening it: the tests above). The
    numbers within the dtype's rounding of a sum in another order, the same on one thread (the stall
    fallback) as on all. A smaller weight, or a large one in another layout (reversed), keeps BLAS's GEMV."""
    from numlm.kernels import matmul as mm
    if mm._blas is None:
        pytest.skip("numpy's BLAS is not OpenBLAS: no GEMV path")
    rng = np.random.default_rng(0)
    C = 96
    big = (mm.ROWS_GEMV_BYTES if kernel == "rows_gemv" else mm.COLS_GEMV_BYTES) // (C * np.dtype(dtype).itemsize)
    stored = rng.standard_normal((big + 7, C)).astype(dtype)  # just over the threshold, odd
    W = stored.T if kernel == "rows_gemv" else stored  # the product's (K, N)
    x = rng.standard_normal((1, W.shape[0])).astype(dtype)
    blas, real, called = [], np.matmul, []
    tol = 1e-5 if dtype == np.float32 else 1e-12
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm.np, "matmul", lambda *a, **k: (blas.append(a[1].shape), real(*a, **k))[1])
        loop = getattr(mm, kernel)
        counted = lambda *a: (called.append(kernel), loop(*a))[1]  # noqa: E731
        counted.signatures = loop.signatures
        mp.setattr(mm, kernel, counted)
        mp.setattr(mm, "_gemv_alone_until", [0.0])
        mp.setattr(mm, "_blas_spins_until", [0.0])
        got = mm.matmul(x, W)
        assert blas == [] and called == [kernel] and mm._blas_spins_until[0] == 0.0
        for small in (W[:64, :64], W[::-1]):  # small; as large, but reversed: not the loop's layout
            np.testing.assert_allclose(mm.matmul(x[:, :small.shape[0]], small), real(x[:, :small.shape[0]], small),
                                       rtol=tol, atol=tol * 100)
        assert len(blas) == 2 and called == [kernel]
        mp.setattr(mm, "_gemv_alone_until", [float("inf")])
        np.testing.assert_array_equal(mm.matmul(x, W), got)  # one thread: the same sums
    want = x.astype(np.float64) @ W.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    assert got.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel", ["rows_gemv", "cols_gemv"])
def test_a_few_rows_over_a_large_weight_run_the_loop_more_rows_do_not(kernel, dtype):
    """2..GEMV_ROWS rows (beams, a batch) over a weight that takes a GEMV loop take it too, each row's
    numbers those it gets alone; one row more goes back to BLAS"""
    from numlm.kernels import matmul as mm
    if mm._blas is None:
        pytest.skip("numpy's BLAS is not OpenBLAS: no GEMV path")
    rng = np.random.default_rng(1)
    C = 64
    big = (mm.ROWS_GEMV_BYTES if kernel == "rows_gemv" else mm.COLS_GEMV_BYTES) // (C * np.dtype(dtype).itemsize)
    stored = rng.standard_normal((big + 5, C)).astype(dtype)
    W = stored.T if kernel == "rows_gemv" else stored  # the product's (K, N)
    called, loop = [], getattr(mm, kernel)
    counted = lambda *a: (called.append(a[1 if kernel == "rows_gemv" else 0].shape[0]), loop(*a))[1]  # noqa: E731
    counted.signatures = loop.signatures
    tol = 1e-5 if dtype == np.float32 else 1e-12
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm, kernel, counted)
        mp.setattr(mm, "_gemv_alone_until", [0.0])
        for M in range(2, mm.GEMV_ROWS + 2):
            x = rng.standard_normal((M, W.shape[0])).astype(dtype)
            got = mm.matmul(x, W)
            want = x.astype(np.float64) @ W.astype(np.float64)
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
            if M <= mm.GEMV_ROWS:
                np.testing.assert_array_equal(got[1:2], mm.matmul(x[1:2], W))
    assert called == [m for M in range(2, mm.GEMV_ROWS + 1) for m in (M, 1)]  # M rows, then row 1 alone


@pytest.mark.parametrize("kernel", ["rows_gemv", "cols_gemv"])
def test_a_gemv_of_mismatched_shapes_raises_and_an_aliased_out_gets_the_product(kernel):
    """The GEMV loops check no bounds: a (M, K) @ b (K', N) with K' != K, or an out of another shape, is
    numpy's ValueError (not numbers read past the arrays); an out that is a itself gets a @ b"""
    from numlm.kernels import matmul as mm
    rng = np.random.default_rng(2)
    K = 2048 if kernel == "rows_gemv" else 512  # square, at the loop's size threshold or above
    stored = rng.standard_normal((K, K)).astype(np.float32)
    W = stored.T if kernel == "rows_gemv" else stored
    assert mm._gemv_kernel(np.ones((1, K), np.float32), W, np.empty((1, K), np.float32)) is getattr(mm, kernel)
    for M in (1, 3):
        with pytest.raises(ValueError):
            mm.matmul(rng.standard_normal((M, K - 1)).astype(np.float32), W)
        with pytest.raises(ValueError):
            mm.matmul(rng.standard_normal((M, K)).astype(np.float32), W, out=np.empty((M, K + 1), np.float32))
        a = rng.standard_normal((M, K)).astype(np.float32)
        want = a.astype(np.float64) @ W.astype(np.float64)
        np.testing.assert_allclose(mm.matmul(a, W, out=a), want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


@settings(max_examples=30, deadline=None)
@given(seed=seeds, M=st.integers(1, 4), K=st.integers(1, 40), N=st.integers(1, 9), P=st.integers(1, 5),
       dtype=dtypes)
def test_cols_gemv_is_the_product_for_any_slicing_of_k(seed, M, K, N, P, dtype):
    """parts slices K in P (some empty when K < P; each slice eight rows a pass, then the rest); out is
    x @ W whatever the slicing, and each of x's rows gets the very sums it gets alone"""
    from numlm.kernels.matmul import cols_gemv
    rng = np.random.default_rng(seed)
    x, W = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
    parts, out = np.full((P, M, N), np.nan, dtype), np.full((M, N), np.nan, dtype)
    assert cols_gemv(x, W, parts, out) is out
    assert_close(out, x @ W, dtype)
    for m in range(M):
        np.testing.assert_array_equal(cols_gemv(x[m:m + 1], W, parts[:, :1], out[m:m + 1].copy()), out[m:m + 1])


def test_a_gemv_that_loads_the_rows_kernel_is_not_a_stall():
    """The first call of rows_gemv for a signature loads or compiles it (0.2-0.6 s): slow, but not a
    core held by another process, so GEMVs stay on all threads; a slow call that loads nothing is one."""
    import time
    from numlm.kernels import matmul as mm
    if mm._blas is None:
        pytest.skip("numpy's BLAS is not OpenBLAS: no GEMV path")

    class SlowKernel:  # stands in for the Numba dispatcher: a call that loads a signature takes 0.2 s
        def __init__(self):
            self.signatures, self.loads = [], True

        def __call__(self, W, x, out):
            time.sleep(0.2)
            if self.loads:
                self.signatures.append(W.dtype)
            out[:] = x @ W.T
            return out

    rng = np.random.default_rng(0)
    W = rng.standard_normal((mm.ROWS_GEMV_BYTES // (64 * 4) + 1, 64)).astype(np.float32)
    h = rng.standard_normal((1, 64)).astype(np.float32)
    kernel = SlowKernel()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm, "rows_gemv", kernel)
        mp.setattr(mm, "_gemv_alone_until", [0.0])
        mp.setattr(mm, "_signatures_seen", {mm.cols_gemv: len(mm.cols_gemv.signatures)})  # no GEMV loaded since
        np.testing.assert_allclose(mm.matmul(h, W.T), h @ W.T, rtol=1e-5, atol=1e-4)
        assert mm._gemv_alone_until == [0.0]  # loading: not a stall
        kernel.loads = False
        mm.matmul(h, W.T)
        assert mm._gemv_alone_until[0] > time.perf_counter()  # slow without a load: a stall


def test_on_cores_waits_for_every_block_when_one_raises():
    """_on_cores returns (or raises) only once every block has ended, a pool block's exception included:
    the lock and BLAS's thread count guard the blocks still running"""
    import time
    from numlm.kernels import matmul as mm
    done = []

    def boom():
        raise RuntimeError("block")

    def slow():
        time.sleep(0.3)
        done.append(1)
    with pytest.raises(RuntimeError):
        mm._on_cores([(lambda: None, ()), (boom, ()), (slow, ())])
    assert done == [1]


@pytest.mark.parametrize("env, want", [({}, "3000"), ({"GOMP_SPINCOUNT": "10"}, "10"),
                                       ({"OMP_WAIT_POLICY": "ACTIVE"}, None)])
def test_numba_spin_is_set_unless_the_user_chose_a_spin_or_wait_policy(env, want):
    """numlm sets GOMP_SPINCOUNT=3000 for Numba's OpenMP threads, but not over a user's GOMP_SPINCOUNT,
    nor beside a user's OMP_WAIT_POLICY (libgomp lets GOMP_SPINCOUNT override the policy)"""
    import os
    import subprocess
    import sys
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os, numlm.kernels; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(want)
