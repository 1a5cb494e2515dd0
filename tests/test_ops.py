"""Ops: float64 gradcheck of every forward/backward pair on both paths, known values, bad input.

Set NUMLM_GRADCHECK_REPORT=<file.json> to record the worst gradcheck error per op
(benchmarks/bench_ops.py --gradcheck does this).
"""
import json
import math
import os
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numlm import ops
from numlm.gradchecking import Uninformative, gradcheck
from numlm.kernels import set_numba

from stencil import stencil_errors

TOL = 1e-7
TOL_STENCIL = 1e-9  # float32 rounds by up to 6e-8: sixty times this
# Central-difference steps are powers of two, so x +- eps is exact (for |x| < 2**39). Truncation error
# grows as eps**2, rounding noise as ulp(f) / eps; these balance them (measured over thousands of
# draws, worst errors stay below 2e-8): EPS for O(1) values, EPS_LARGE for |x| ~ 1e3 logits, where
# ulp(1e3) = 1.1e-13 rounding in logsumexp needs the larger step.
EPS = 2.0 ** -16
EPS_LARGE = 2.0 ** -13
WORST = {}

seeds = st.integers(0, 2**32 - 1)
lead_dims = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


@contextmanager
def numba_path(flag):
    previous = set_numba(flag)
    try:
        yield
    finally:
        set_numba(previous)


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    path = os.environ.get("NUMLM_GRADCHECK_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(WORST, f, indent=1, sort_keys=True)


def check(op, forward, inputs, backward, kwargs=None, eps=1e-6, expect=None):
    """gradcheck on the Numba and on the NumPy path; every error must be < TOL; and the five-point
    stencil's, < TOL_STENCIL (float32 rounding of any gradient entry fails it)."""
    for flag in (True, False):
        with numba_path(flag):
            errs = gradcheck(forward, inputs, backward, kwargs=kwargs, eps=eps)
            # zero by the math (LayerNorm over C=1, one class, every target ignored, T=1 attention) is
            # uninformative for every dout; an unlucky dout is not, and another seed measures it
            for name in [k for k, e in errs.items() if isinstance(e, Uninformative)]:
                again = gradcheck(forward, inputs, backward, kwargs=kwargs, eps=eps, seed=1)[name]
                assert isinstance(again, Uninformative) or again < TOL, (op, name, again)
            fine = stencil_errors(forward, inputs, backward, kwargs=kwargs, h=2.0 ** (-7 if eps == EPS_LARGE else -10))
        if expect is not None:
            assert set(errs) == set(expect), errs
        assert errs and fine
        worst = max((e for e in errs.values() if not isinstance(e, Uninformative)), default=0.0)
        WORST[op] = max(WORST.get(op, 0.0), worst)
        WORST[op + " (stencil)"] = max(WORST.get(op + " (stencil)", 0.0), max(fine.values()))
        assert worst < TOL, (op, "numba" if flag else "numpy", errs)
        assert max(fine.values()) < TOL_STENCIL, (op, "numba" if flag else "numpy", fine)
    return errs


def large_logits(rng, shape):
    """|logits| ~ 1e3: levels 1e3 * {-1, 0, 1} plus N(0, 1). Entries below their row's top level sit
    ~1e3 lower, so their softmax underflows to exactly 0 (and so do both gradients); the top level
    keeps O(1) gaps, so its gradients are O(1) and the check stays meaningful."""
    return 1e3 * rng.integers(-1, 2, shape) + rng.standard_normal(shape)


# ---------------------------------------------------------------- gradcheck, every op

@settings(max_examples=25, deadline=None)
@given(seed=seeds, lead=lead_dims, c_in=st.integers(1, 5), c_out=st.integers(1, 5), bias=st.booleans())
def test_linear_gradcheck(seed, lead, c_in, c_out, bias):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (c_in,))
    w = rng.standard_normal((c_in, c_out))
    b = rng.standard_normal(c_out) if bias else None
    inputs = (x, w, b) if bias else (x, w)
    check("linear", ops.linear_forward, inputs, ops.linear_backward,
          expect={"x", "w", "b"} if bias else {"x", "w"})


@settings(max_examples=25, deadline=None)
@given(seed=seeds, lead=lead_dims, V=st.integers(1, 6), C=st.integers(1, 4), pad=st.booleans())
def test_embedding_gradcheck(seed, lead, V, C, pad):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, lead)
    weight = rng.standard_normal((V, C))
    if not pad:
        check("embedding", ops.embedding_forward, (ids, weight), ops.embedding_backward, expect={"weight"})
        return
    p = int(rng.integers(0, V))
    ids.reshape(-1)[:1] = p  # the padding id occurs at least once (when ids is not empty)
    for flag in (True, False):
        with numba_path(flag):
            _, cache = ops.embedding_forward(ids, weight, padding_idx=p)
            dw = ops.embedding_backward(rng.standard_normal(ids.shape + (C,)), cache)
        assert np.all(dw[p] == 0.0)  # exactly: transformers sends no gradient into the padding row
    # Its numerical gradient is nonzero by design, so check the other rows, the padding row held fixed.
    keep = np.arange(V) != p

    def forward(ids, rest):
        w = np.empty((V, C))
        w[p] = weight[p]
        w[keep] = rest
        return ops.embedding_forward(ids, w, padding_idx=p)

    def backward(dout, cache):
        return ops.embedding_backward(dout, cache)[keep]

    if V > 1 and np.any(ids != p):
        check("embedding", forward, (ids, weight[keep].copy()), backward, expect={"rest"})
    elif V > 1:  # only the padding id occurs: no other row is used, and the check says it shows nothing
        assert isinstance(gradcheck(forward, (ids, weight[keep].copy()), backward)["rest"], Uninformative)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, lead=lead_dims, C=st.integers(1, 6), eps=st.sampled_from([1e-5, 1e-12]),
       scale=st.sampled_from([1.0, 30.0]))
def test_layernorm_gradcheck(seed, lead, C, eps, scale):
    rng = np.random.default_rng(seed)
    if C == 2:
        # two channels normalise to about +-1 whatever x is: dx is O(eps / var) against O(1) outputs,
        # below what central differences resolve, unless eps is comparable to the variance
        eps, scale = 0.5, 1.0
    x = scale * (rng.standard_normal(lead + (C,)) + np.linspace(-1, 1, C))  # rows never constant
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    check("layernorm", ops.layernorm_forward, (x, gamma, beta), ops.layernorm_backward,
          kwargs={"eps": eps}, eps=EPS if scale == 1.0 else EPS_LARGE, expect={"x", "gamma", "beta"})


ACT = {"gelu": (ops.gelu_forward, ops.gelu_backward),
       "gelu_tanh": (ops.gelu_tanh_forward, ops.gelu_tanh_backward),
       "tanh": (ops.tanh_forward, ops.tanh_backward),
       "relu": (ops.relu_forward, ops.relu_backward)}


@settings(max_examples=40, deadline=None)
@given(seed=seeds, lead=lead_dims, name=st.sampled_from(sorted(ACT)), scale=st.sampled_from([1.0, 6.0]))
def test_activation_gradcheck(seed, lead, name, scale):
    # clipped to |x| <= 4: further out 1 + erf, 1 + tanh and 1 - y^2 cancel (computed as torch does),
    # and a gradient below the forward's own rounding cannot be checked by differences
    x = np.asarray(np.clip(scale * np.random.default_rng(seed).standard_normal(lead), -4, 4))  # () is 0-d
    if name == "relu":
        x = np.where(np.abs(x) < 1e-3, 0.5, x)  # away from the kink
    fwd, bwd = ACT[name]
    check(name, fwd, (x,), bwd, eps=EPS, expect={"x"})


@settings(max_examples=30, deadline=None)
@given(seed=seeds, lead=lead_dims, V=st.integers(1, 7), large=st.booleans())
def test_softmax_gradcheck(seed, lead, V, large):
    rng = np.random.default_rng(seed)
    shape = lead + (V,)
    x = large_logits(rng, shape) if large else rng.standard_normal(shape)
    check("softmax", ops.softmax_forward, (x,), ops.softmax_backward,
          eps=EPS_LARGE if large else 1e-6, expect={"x"})


@settings(max_examples=30, deadline=None)
@given(seed=seeds, lead=lead_dims, V=st.integers(1, 7), large=st.booleans(),
       ignore=st.sampled_from(["none", "some", "all"]))
def test_cross_entropy_gradcheck(seed, lead, V, large, ignore):
    rng = np.random.default_rng(seed)
    shape = lead + (V,)
    logits = large_logits(rng, shape) if large else rng.standard_normal(shape)
    targets = rng.integers(0, V, lead)
    if ignore == "some":
        targets = np.where(rng.random(lead) < 0.4, -100, targets)
    elif ignore == "all":
        targets = np.full(lead, -100)
    check("cross_entropy", ops.cross_entropy_forward, (logits, targets), ops.cross_entropy_backward,
          eps=EPS_LARGE if large else 1e-6, expect={"logits"})
    if ignore == "all":
        for flag in (True, False):
            with numba_path(flag):
                loss, cache = ops.cross_entropy_forward(logits, targets)
                d = ops.cross_entropy_backward(np.float64(1.0), cache)
            assert loss == 0.0 and d.shape == logits.shape and not d.any()


@settings(max_examples=15, deadline=None)
@given(seed=seeds, lead=lead_dims, C=st.integers(1, 4))
def test_mse_gradcheck(seed, lead, C):
    rng = np.random.default_rng(seed)
    pred, target = rng.standard_normal(lead + (C,)), rng.standard_normal(lead + (C,))
    check("mse", ops.mse_forward, (pred,), ops.mse_backward, kwargs={"target": target}, expect={"pred"})


@settings(max_examples=20, deadline=None)
@given(seed=seeds, lead=lead_dims, C=st.integers(1, 4), p=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
       training=st.booleans())
def test_dropout_gradcheck(seed, lead, C, p, training):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (C,))
    check("dropout", ops.dropout_forward, (x,), ops.dropout_backward,
          kwargs={"p": p, "rng": np.random.default_rng(seed + 1), "training": training}, expect={"x"})


MASKS = ["none", "causal", "right", "left", "full_row", "causal_right", "openai_left", "kv_cache",
         "scale", "dropout", "bool4d_heads"]


def padding_mask(rng, B, T, left):
    """(B, T) 0/1 with a random number of padded positions per row (possibly all of them)."""
    n_pad = rng.integers(0, T + 1, B)
    pos = np.arange(T)[None, :]
    return (pos >= n_pad[:, None]) if left else (pos < (T - n_pad)[:, None]).astype(np.int64)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 2), Tq=st.integers(1, 4), extra=st.integers(0, 3),
       D=st.integers(1, 3), kind=st.sampled_from(MASKS))
def test_attention_gradcheck(seed, B, H, Tq, extra, D, kind):
    rng = np.random.default_rng(seed)
    Tk = Tq + extra if kind == "kv_cache" else Tq
    q = rng.standard_normal((B, H, Tq, D))
    k = rng.standard_normal((B, H, Tk, D))
    v = rng.standard_normal((B, H, Tk, D))
    kw = {}
    if kind in ("causal", "kv_cache"):
        kw = {"causal": True}
    elif kind == "right":
        kw = {"attention_mask": padding_mask(rng, B, Tk, left=False).astype(np.int64)}
    elif kind == "left":
        kw = {"attention_mask": padding_mask(rng, B, Tk, left=True).astype(np.float64)}
    elif kind == "full_row":
        m = rng.random((B, 1, Tq, Tk)) < 0.6
        m[0, 0, int(rng.integers(Tq))] = False  # one query sees no key at all
        kw = {"attention_mask": m}
    elif kind == "bool4d_heads":
        kw = {"attention_mask": rng.random((1, H, Tq, Tk)) < 0.5}
    elif kind == "causal_right":
        kw = {"attention_mask": padding_mask(rng, B, Tk, left=False), "causal": True}
    elif kind == "openai_left":
        kw = {"attention_mask": padding_mask(rng, B, Tk, left=True), "causal": True, "causal_fill": -1e4}
    elif kind == "scale":
        kw = {"scale": float(rng.uniform(0.1, 2.0)), "causal": bool(rng.integers(2))}
    elif kind == "dropout":
        kw = {"dropout_p": 0.3, "rng": np.random.default_rng(seed + 1), "causal": bool(rng.integers(2))}
    check("attention", ops.attention_forward, (q, k, v), ops.attention_backward, kwargs=kw,
          expect={"q", "k", "v"})


# ---------------------------------------------------------------- known values

@pytest.fixture(params=[True, False], ids=["numba", "numpy"])
def path(request):
    with numba_path(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_known(path, dtype):
    y, _ = ops.softmax_forward(np.log(np.array([[1.0, 2.0, 3.0]])).astype(dtype))
    np.testing.assert_allclose(y, [[1 / 6, 2 / 6, 3 / 6]], rtol=1e-6 if dtype == np.float32 else 1e-15)
    assert y.dtype == dtype
    # a shift of 1e3 changes nothing (no overflow), in both dtypes
    y2, _ = ops.softmax_forward((np.log(np.array([1.0, 2.0, 3.0])) + 1e3).astype(dtype))
    np.testing.assert_allclose(y2, [1 / 6, 2 / 6, 3 / 6], rtol=2e-3 if dtype == np.float32 else 1e-12)


def test_layernorm_known(path):
    x = np.array([[1.0, 2.0, 3.0, 6.0]])  # mean 3, biased var (4 + 1 + 0 + 9) / 4 = 3.5
    gamma, beta = np.array([1.0, 2.0, 0.5, -1.0]), np.array([0.0, 1.0, 0.0, 2.0])
    eps = 1e-5
    y, _ = ops.layernorm_forward(x, gamma, beta, eps)
    expect = (x - 3.0) / math.sqrt(3.5 + eps) * gamma + beta
    np.testing.assert_allclose(y, expect, rtol=1e-14, atol=1e-15)


def test_gelu_known(path):
    zero, _ = ops.gelu_forward(np.array([0.0]))
    assert zero[0] == 0.0
    one, _ = ops.gelu_forward(np.array([1.0]))
    assert abs(one[0] - 0.5 * (1 + math.erf(1 / math.sqrt(2)))) < 1e-15
    big = np.array([10.0, 30.0])
    for f in (ops.gelu_forward, ops.gelu_tanh_forward):
        np.testing.assert_allclose(f(big)[0], big, rtol=1e-15)
        np.testing.assert_allclose(f(-big)[0], 0.0, atol=1e-20)
    t, _ = ops.gelu_tanh_forward(np.array([1.0]))
    u = math.sqrt(2 / math.pi) * (1 + 0.044715)
    assert abs(t[0] - 0.5 * (1 + math.tanh(u))) < 1e-15
    x = np.linspace(-8, 8, 2001)
    diff = np.abs(ops.gelu_forward(x)[0] - ops.gelu_tanh_forward(x)[0])
    assert diff.max() < 5e-4 and diff.max() > 1e-5  # close, but genuinely different functions


def test_tanh_relu_known(path):
    x = np.array([-2.0, 0.0, 0.5])
    np.testing.assert_array_equal(ops.tanh_forward(x)[0], [math.tanh(-2.0), 0.0, math.tanh(0.5)])
    np.testing.assert_array_equal(ops.relu_forward(x)[0], [0.0, 0.0, 0.5])


@pytest.mark.parametrize("V", [1, 5, 50000])
def test_cross_entropy_uniform_logits(path, V):
    logits = np.full((3, V), 2.5)
    loss, _ = ops.cross_entropy_forward(logits, np.array([0, V - 1, -100]))
    assert abs(loss - math.log(V)) < 1e-12


def test_cross_entropy_one_mean_over_batch(path):
    logits = np.array([[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 1.0]])
    loss, cache = ops.cross_entropy_forward(logits, np.array([0, 1, -100]))
    expect = (-math.log(1 / 4) - math.log(1 / 2)) / 2  # M = 2 non-ignored targets
    assert abs(loss - expect) < 1e-15
    d = ops.cross_entropy_backward(1.0, cache)
    np.testing.assert_allclose(d, [[(0.25 - 1) / 2, 0.75 / 2], [0.25, -0.25], [0, 0]], atol=1e-16)


def test_attention_one_key_returns_v(path):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 1, 5)), rng.standard_normal((2, 3, 1, 5))
    out, cache = ops.attention_forward(q, k, v)
    np.testing.assert_allclose(out, np.broadcast_to(v, out.shape), rtol=1e-15)
    assert np.all(cache.probs == 1.0)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "0.5", True])
def test_attention_refuses_a_scale_that_is_not_a_finite_number(scale):
    q = np.random.default_rng(0).standard_normal((1, 1, 2, 4))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ops.attention_forward(q, q, q, scale=scale)


def test_attention_matches_formula(path):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 3, 4)) for _ in range(3))
    out, cache = ops.attention_forward(q, k, v, causal=True)
    for h in range(2):
        for i in range(3):
            s = [float(q[0, h, i] @ k[0, h, j]) / 2.0 for j in range(i + 1)]  # 1/sqrt(D) = 1/2
            e = [math.exp(a - max(s)) for a in s]
            p = [a / sum(e) for a in e] + [0.0] * (2 - i)
            np.testing.assert_allclose(cache.probs[0, h, i], p, rtol=1e-13, atol=0)
            np.testing.assert_allclose(out[0, h, i], sum(p[j] * v[0, h, j] for j in range(3)), rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_masking_semantics(path, dtype):
    rng = np.random.default_rng(2)
    B, H, T, D = 2, 2, 4, 3
    q, k, v = (rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(3))
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])  # row 1: everything padded
    out, cache = ops.attention_forward(q, k, v, attention_mask=mask)
    p = cache.probs
    assert np.all(p[0, :, :, 2:] == 0.0)  # a masked key gets exactly zero probability
    assert np.all(p[1] == dtype(0.25))  # a fully masked row: uniform 1/T_k, as transformers
    np.testing.assert_allclose(out[1], np.broadcast_to(v[1].mean(axis=1, keepdims=True), (H, T, D)),
                               rtol=1e-6 if dtype == np.float32 else 1e-14)


def test_attention_openai_left_padding(path):
    """OpenAI GPT: future scores -> -1e4, padding -> finfo.min. A left-padded query has no allowed
    past key, so it spreads uniformly over the future *real* keys (CONVENTIONS item 7)."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 1, 5, 2)) for _ in range(3))
    mask = np.array([[0, 0, 1, 1, 1]])
    _, cache = ops.attention_forward(q, k, v, attention_mask=mask, causal=True, causal_fill=-1e4)
    p = cache.probs[0, 0]
    np.testing.assert_array_equal(p[0], [0, 0, 1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_array_equal(p[1], [0, 0, 1 / 3, 1 / 3, 1 / 3])
    assert p[2, 2] == 1.0 and np.all(p[3, 4:] == 0) and np.all(p[:, :2] == 0)
    # with finfo.min for the future too (BERT/GPT-2), the same row is uniform over all keys
    _, cache = ops.attention_forward(q, k, v, attention_mask=mask, causal=True)
    np.testing.assert_array_equal(cache.probs[0, 0, 0], np.full(5, 0.2))


def test_attention_kv_cache_positions(path):
    """Causal with T_q < T_k: query i sits at absolute position T_k - T_q + i."""
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((1, 1, 2, 3)), rng.standard_normal((1, 1, 5, 3)), rng.standard_normal((1, 1, 5, 3))
    _, full = ops.attention_forward(np.concatenate([np.zeros((1, 1, 3, 3)), q], axis=2), k, v, causal=True)
    _, step = ops.attention_forward(q, k, v, causal=True)
    np.testing.assert_allclose(step.probs[0, 0], full.probs[0, 0, 3:], rtol=1e-14)
    assert step.probs[0, 0, 0, 4] == 0.0


def test_dropout_semantics(path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 500))
    y, cache = ops.dropout_forward(x, 0.3, np.random.default_rng(1), training=False)
    assert y is x and cache is None
    y1, keep1 = ops.dropout_forward(x, 0.3, np.random.default_rng(7))
    y2, keep2 = ops.dropout_forward(x, 0.3, np.random.default_rng(7))
    np.testing.assert_array_equal(y1, y2)  # same seed, same mask
    dropped = keep1 == 0
    assert abs(dropped.mean() - 0.3) < 0.01  # 1e5 Bernoulli draws: sd 0.0014
    np.testing.assert_allclose(y1[~dropped], x[~dropped] / 0.7, rtol=1e-15)
    ones, _ = ops.dropout_forward(np.ones(100000), 0.3, np.random.default_rng(8))
    assert abs(ones.mean() - 1.0) < 0.02  # inverted dropout preserves the mean (sd ~0.005)
    _, c3 = ops.dropout_forward(x, 0.3, np.random.default_rng(9))
    assert not np.array_equal(keep1, c3)


def test_ops_do_not_modify_arguments(path):
    rng = np.random.default_rng(6)
    x, g, b = rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal(4)
    args = [a.copy() for a in (x, g, b)]
    y, cache = ops.layernorm_forward(x, g, b)
    dy = rng.standard_normal((3, 4))
    dy0 = dy.copy()
    ops.layernorm_backward(dy, cache)
    _, c = ops.softmax_forward(x)
    ops.softmax_backward(dy, c)
    _, c = ops.gelu_forward(x)
    ops.gelu_backward(dy, c)
    for a, a0 in zip((x, g, b, dy), args + [dy0]):
        np.testing.assert_array_equal(a, a0)


# ---------------------------------------------------------------- bad input

def _f64(*s):
    return np.zeros(s)


BAD = [
    ("linear rank", lambda: ops.linear_forward(_f64(2, 3), _f64(3)), "w"),
    ("linear shapes", lambda: ops.linear_forward(_f64(2, 3), _f64(4, 2)), r"x has 3 input channels"),
    ("linear bias", lambda: ops.linear_forward(_f64(2, 3), _f64(3, 2), _f64(3)), r"b must have shape \(2,\)"),
    ("linear dtype", lambda: ops.linear_forward(_f64(2, 3), _f64(3, 2).astype(np.float32)), r"x: float64, w: float32"),
    ("linear int x", lambda: ops.linear_forward(np.zeros((2, 3), int), _f64(3, 2)), r"x must be float32 or float64"),
    ("embedding negative", lambda: ops.embedding_forward(np.array([0, -1]), _f64(4, 2)), r"ids must lie in \[0, 4\); found -1"),
    ("embedding >= V", lambda: ops.embedding_forward(np.array([[0, 4]]), _f64(4, 2)), r"ids .*found 4 at index \(0, 1\)"),
    ("embedding float ids", lambda: ops.embedding_forward(np.array([0.0]), _f64(4, 2)), r"ids must hold integers"),
    ("embedding weight rank", lambda: ops.embedding_forward(np.array([0]), _f64(4)), r"weight must have at least 2"),
    ("embedding padding_idx", lambda: ops.embedding_forward(np.array([0]), _f64(4, 2), padding_idx=4), r"padding_idx"),
    ("layernorm gamma", lambda: ops.layernorm_forward(_f64(2, 3), _f64(4), _f64(3)), r"gamma and beta must have shape \(3,\)"),
    ("layernorm dtype", lambda: ops.layernorm_forward(_f64(2, 3), _f64(3).astype(np.float32), _f64(3)), r"gamma: float32"),
    ("layernorm rank", lambda: ops.layernorm_forward(np.float64(1.0), _f64(1), _f64(1)), r"x must be a numpy array"),
    ("softmax rank", lambda: ops.softmax_forward(np.array(1.0)), r"x must have at least 1"),
    ("gelu int", lambda: ops.gelu_forward(np.arange(3)), r"x must be float32 or float64, got dtype int"),
    ("ce target >= V", lambda: ops.cross_entropy_forward(_f64(2, 3), np.array([0, 3])), r"targets must lie in \[0, 3\) \(or -100\); found 3"),
    ("ce target -1", lambda: ops.cross_entropy_forward(_f64(2, 3), np.array([-1, 0])), r"targets .*found -1"),
    ("ce shapes", lambda: ops.cross_entropy_forward(_f64(2, 3), np.array([0, 1, 2])), r"targets must have shape \(2,\)"),
    ("ce float targets", lambda: ops.cross_entropy_forward(_f64(2, 3), np.array([0.0, 1.0])), r"targets must hold integers"),
    ("mse shapes", lambda: ops.mse_forward(_f64(2, 3), _f64(3, 2)), r"target must have shape \(2, 3\)"),
    ("dropout p=1", lambda: ops.dropout_forward(_f64(2), 1.0, np.random.default_rng(0)), r"p must lie in \[0, 1\), got 1.0"),
    ("dropout p<0", lambda: ops.dropout_forward(_f64(2), -0.1, np.random.default_rng(0)), r"p must lie in \[0, 1\), got -0.1"),
    ("dropout no rng", lambda: ops.dropout_forward(_f64(2), 0.5), r"rng"),
    ("attention rank", lambda: ops.attention_forward(_f64(2, 3, 4), _f64(2, 3, 4), _f64(2, 3, 4)), r"q must have at least 4"),
    ("attention k shape", lambda: ops.attention_forward(_f64(1, 2, 3, 4), _f64(1, 2, 3, 5), _f64(1, 2, 3, 4)), r"k and v must have shape"),
    ("attention dtype", lambda: ops.attention_forward(_f64(1, 1, 2, 2), _f64(1, 1, 2, 2).astype(np.float32), _f64(1, 1, 2, 2)), r"k: float32"),
    ("attention mask 2d", lambda: ops.attention_forward(_f64(2, 1, 3, 2), _f64(2, 1, 3, 2), _f64(2, 1, 3, 2), attention_mask=np.ones((2, 4))), r"attention_mask must have shape \(B, T_k\) = \(2, 3\), got \(2, 4\)"),
    ("attention mask values", lambda: ops.attention_forward(_f64(1, 1, 2, 2), _f64(1, 1, 2, 2), _f64(1, 1, 2, 2), attention_mask=np.array([[1, 2]])), r"attention_mask must hold only 0 and 1"),
    ("attention mask 4d", lambda: ops.attention_forward(_f64(2, 1, 3, 2), _f64(2, 1, 3, 2), _f64(2, 1, 3, 2), attention_mask=np.ones((3, 1, 3, 3), bool)), r"attention_mask of shape \(3, 1, 3, 3\) does not broadcast"),
    ("attention mask 4d Tq", lambda: ops.attention_forward(_f64(1, 1, 1, 2), _f64(1, 1, 3, 2), _f64(1, 1, 3, 2), attention_mask=np.ones((1, 1, 2, 3), bool)), r"attention_mask of shape \(1, 1, 2, 3\) does not broadcast"),
    ("attention mask heads", lambda: ops.attention_forward(_f64(1, 2, 3, 2), _f64(1, 2, 3, 2), _f64(1, 2, 3, 2), attention_mask=np.ones((1, 3, 3, 3), bool)), r"attention_mask of shape \(1, 3, 3, 3\)"),
    ("attention mask 4d int", lambda: ops.attention_forward(_f64(1, 1, 2, 2), _f64(1, 1, 2, 2), _f64(1, 1, 2, 2), attention_mask=np.ones((1, 1, 2, 2), int)), r"4-D attention_mask must be boolean"),
    ("attention mask 3d", lambda: ops.attention_forward(_f64(1, 1, 2, 2), _f64(1, 1, 2, 2), _f64(1, 1, 2, 2), attention_mask=np.ones((1, 2, 2), bool)), r"attention_mask must be \(B, T_k\) or 4-D"),
    ("attention causal Tq>Tk", lambda: ops.attention_forward(_f64(1, 1, 3, 2), _f64(1, 1, 2, 2), _f64(1, 1, 2, 2), causal=True), r"T_q=3, T_k=2"),
    ("attention dropout_p", lambda: ops.attention_forward(_f64(1, 1, 2, 2), _f64(1, 1, 2, 2), _f64(1, 1, 2, 2), dropout_p=1.0), r"dropout_p must lie in \[0, 1\)"),
    ("attention dropout rng", lambda: ops.attention_forward(_f64(1, 1, 2, 2), _f64(1, 1, 2, 2), _f64(1, 1, 2, 2), dropout_p=0.1), r"rng"),
    ("activation name", lambda: ops.activation("swish"), r"unknown activation 'swish'"),
]


@pytest.mark.parametrize("call, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(path, call, match):
    with pytest.raises(ValueError, match=match):
        call()
