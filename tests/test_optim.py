import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numlm.kernels import set_numba
from numlm.optim import (Adam, AdamW, clip_grad_norm, constant_schedule, constant_with_warmup,
                         cosine_schedule, default_no_decay, get_schedule, linear_schedule)

FIXTURE = Path(__file__).parent / "fixtures" / "optim" / "adamw-linear-warmup"


@pytest.fixture(params=[True, False], ids=["numba", "numpy"])
def numba_mode(request):
    previous = set_numba(request.param)
    yield request.param
    set_numba(previous)


def rand_params(seed, shapes, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}


SHAPES = {"w": (4, 3), "bias": (3,), "ln_f.weight": (5,)}


# ---------------------------------------------------------------- torch fixture

def test_fixture_trajectory(numba_mode):
    spec = json.loads((FIXTURE / "spec.json").read_text())
    ref = np.load(FIXTURE / "reference.npz", allow_pickle=False)
    names = [k[len("init/"):] for k in ref.files if k.startswith("init/")]
    params = {n: ref[f"init/{n}"].copy() for n in names}
    held = dict(params)
    # torch applied weight decay to every parameter of the fixture (one param group)
    opt = AdamW(params, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"],
                weight_decay=spec["weight_decay"], no_decay=lambda n, a: False)
    sched = get_schedule(spec["sched"], spec["warmup"], spec["total"])
    for t in range(len(ref["lr"])):
        grads = {n: ref[f"grad/{n}"][t].copy() for n in names}
        norm = clip_grad_norm(grads, spec["clip"])
        np.testing.assert_allclose(norm, ref["grad_norm"][t], rtol=1e-12, atol=0)
        lr = spec["lr"] * sched(t)
        np.testing.assert_allclose(lr, ref["lr"][t], rtol=1e-12, atol=0)
        opt.step(grads, lr=lr)
        for n in names:
            np.testing.assert_allclose(params[n], ref[f"param/{n}"][t], rtol=1e-12, atol=0,
                                       err_msg=f"{n} at step {t}")
    assert all(params[n] is held[n] for n in names)   # updated in place


# ---------------------------------------------------------------- Numba kernel vs NumPy path

def run(cls, params, grads_seq, numba, **kw):
    previous = set_numba(numba)
    try:
        opt = cls(params, **kw)
        for lr, grads in grads_seq:
            opt.step({n: g.copy() for n, g in grads.items()}, lr=lr)
    finally:
        set_numba(previous)
    return params


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), decoupled=st.booleans(),
       beta1=st.sampled_from([0.0, 0.3, 0.9]), wd=st.sampled_from([0.0, 0.1]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_numba_matches_numpy(seed, n, decoupled, beta1, wd, dtype):
    rng = np.random.default_rng(seed)
    shapes = {"a.weight": (n, 3), "a.bias": (n,)}
    init = rand_params(seed, shapes, dtype)
    grads_seq = [(float(rng.uniform(0, 0.1)), rand_params(seed + 1 + k, shapes, dtype))
                 for k in range(3)]
    cls = AdamW if decoupled else Adam
    kw = dict(lr=1e-2, betas=(beta1, 0.99), weight_decay=wd)
    a = run(cls, {k: v.copy() for k, v in init.items()}, grads_seq, True, **kw)
    b = run(cls, {k: v.copy() for k, v in init.items()}, grads_seq, False, **kw)
    for k in shapes:
        assert a[k].dtype == dtype
        # same operation order, no FMA contraction: identical, stronger than the 1e-12 asked
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_updates_on_two_cores_are_the_serial_ones(dtype, monkeypatch):
    """Above ADAM_TWO_CORES_MIN elements the fused updates run in two halves on two cores: the same bits
    as on one (and as the NumPy path); every parameter updated once."""
    from numlm import optim
    rng = np.random.default_rng(0)
    shapes = {"emb.weight": (700, 100), "l.weight": (300, 100), "l.bias": (300,), "ln.weight": (7,)}
    init = rand_params(3, shapes, dtype)
    grads_seq = [(0.01, rand_params(10 + k, shapes, dtype)) for k in range(3)]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    calls = []
    real = optim._adam_update_numba
    monkeypatch.setattr(optim, "_adam_update_numba", lambda *a: (calls.append(a[0].size), real(*a))[1])
    monkeypatch.setattr(optim, "ADAM_TWO_CORES_MIN", 1)
    two = run(AdamW, {k: v.copy() for k, v in init.items()}, grads_seq, True, **kw)
    assert sorted(calls) == sorted(3 * [int(np.prod(s)) for s in shapes.values()])
    monkeypatch.setattr(optim, "ADAM_TWO_CORES_MIN", 1 << 62)
    one = run(AdamW, {k: v.copy() for k, v in init.items()}, grads_seq, True, **kw)
    npy = run(AdamW, {k: v.copy() for k, v in init.items()}, grads_seq, False, **kw)
    for k in shapes:
        assert np.array_equal(two[k], one[k]) and np.array_equal(two[k], npy[k]), k


def test_non_contiguous_param_uses_numpy_path(numba_mode):
    base = np.random.default_rng(0).standard_normal((6, 4))
    params = {"w": base[:, ::2]}              # a strided view, updated in place
    grads = {"w": np.ones((6, 2))}
    AdamW(params, lr=0.1, weight_decay=0.0).step(grads)
    # first step: m = 0.1 g, v = 0.001 g^2, so the update is lr * g / (|g| + eps') = 0.1
    np.testing.assert_allclose(base[:, ::2], np.random.default_rng(0).standard_normal((6, 4))[:, ::2]
                               - 0.1, rtol=1e-6)


# ---------------------------------------------------------------- textbook reference

def reference_adam(params, grads_seq, lr, betas, eps, wd, decoupled, decay_names):
    """Kingma & Ba with bias-corrected m_hat, v_hat; AdamW per Loshchilov & Hutter."""
    b1, b2 = betas
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    s = {k: np.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        for k, g in grads.items():
            lam = wd if k in decay_names else 0.0
            if not decoupled:
                g = g + lam * p[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            s[k] = b2 * s[k] + (1 - b2) * g * g
            m_hat = m[k] / (1 - b1 ** t)
            s_hat = s[k] / (1 - b2 ** t)
            decay = lr * lam * p[k] if decoupled else 0.0
            p[k] = p[k] - decay - lr * m_hat / (np.sqrt(s_hat) + eps)
    return p


@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_against_textbook_reference(cls, numba_mode):
    init = rand_params(1, SHAPES)
    grads_seq = [rand_params(10 + k, SHAPES) for k in range(5)]
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3)
    params = {k: v.copy() for k, v in init.items()}
    opt = cls(params, **kw)
    for grads in grads_seq:
        opt.step({k: g.copy() for k, g in grads.items()})
    expect = reference_adam(init, grads_seq, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"],
                            cls is AdamW, decay_names={"w"})
    for k in SHAPES:
        np.testing.assert_allclose(params[k], expect[k], rtol=1e-10, atol=1e-14)


def test_adam_and_adamw_differ_only_with_weight_decay():
    init = rand_params(2, SHAPES)
    grads_seq = [(None, rand_params(20 + k, SHAPES)) for k in range(3)]
    a = run(Adam, {k: v.copy() for k, v in init.items()}, grads_seq, False, weight_decay=0.0)
    b = run(AdamW, {k: v.copy() for k, v in init.items()}, grads_seq, False, weight_decay=0.0)
    for k in SHAPES:
        assert np.array_equal(a[k], b[k])


# ---------------------------------------------------------------- weight decay selection, frozen

BERT_GPT_NAMES = {
    "bert.encoder.layer.0.attention.self.query.weight": True,
    "bert.encoder.layer.0.attention.self.query.bias": False,
    "bert.embeddings.LayerNorm.weight": False,
    "bert.embeddings.word_embeddings.weight": True,
    "transformer.h.0.ln_1.weight": False,
    "transformer.h.0.ln_2.bias": False,
    "transformer.ln_f.weight": False,
    "transformer.h.0.attn.c_attn.weight": True,
    "model.decoder.layers.0.self_attn_layer_norm.weight": False,
}


def test_default_no_decay_names():
    for name, decays in BERT_GPT_NAMES.items():
        assert default_no_decay(name, np.zeros(2)) == (not decays), name


def test_weight_decay_excluded_for_bias_and_layernorm(numba_mode):
    # with zero gradients the Adam step is 0/(0 + eps) = 0, so only the decay p *= 1 - lr*wd acts
    params = {n: np.full((3,), 2.0) for n in BERT_GPT_NAMES}
    opt = AdamW(params, lr=0.1, weight_decay=0.5)
    opt.step({n: np.zeros(3) for n in params})
    for name, decays in BERT_GPT_NAMES.items():
        np.testing.assert_allclose(params[name], 2.0 * (1 - 0.1 * 0.5) if decays else 2.0,
                                   rtol=1e-15, err_msg=name)


def test_frozen_parameters_are_skipped(numba_mode):
    params = rand_params(3, SHAPES)
    frozen = params["w"].copy()
    opt = AdamW(params, lr=0.1, weight_decay=0.5)
    opt.step({"bias": np.ones(3)})
    assert np.array_equal(params["w"], frozen)
    assert "w" not in opt.state_dict()["exp_avg"]


# ---------------------------------------------------------------- state dict round trip

@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_state_dict_resume_is_bit_identical(cls, numba_mode):
    init = rand_params(4, SHAPES)
    # "w" frozen in step 1: per-parameter step counts must survive the round trip
    grads_seq = [rand_params(40 + k, SHAPES) for k in range(6)]
    del grads_seq[0]["w"]
    lrs = [1e-2 * linear_schedule(t, 2, 6) for t in range(1, 7)]
    kw = dict(lr=5e-3, betas=(0.9, 0.99), weight_decay=0.1)

    whole = {k: v.copy() for k, v in init.items()}
    opt = cls(whole, **kw)
    for lr, g in zip(lrs, grads_seq):
        opt.step({k: v.copy() for k, v in g.items()}, lr=lr)

    first = {k: v.copy() for k, v in init.items()}
    opt = cls(first, **kw)
    for lr, g in zip(lrs[:3], grads_seq[:3]):
        opt.step({k: v.copy() for k, v in g.items()}, lr=lr)
    sd = opt.state_dict()
    params_at_3 = {k: v.copy() for k, v in first.items()}   # what a checkpoint saves
    opt.step({k: v * 7 for k, v in grads_seq[1].items()})   # the saved state must be a copy

    resumed = cls(params_at_3, lr=1.0, betas=(0.5, 0.5), weight_decay=0.0)
    resumed.load_state_dict(sd)
    assert resumed.lr == kw["lr"] and resumed.betas == kw["betas"]
    for lr, g in zip(lrs[3:], grads_seq[3:]):
        resumed.step({k: v.copy() for k, v in g.items()}, lr=lr)
    for k in SHAPES:
        assert np.array_equal(params_at_3[k], whole[k]), k
    assert resumed.state_dict()["step"] == 6
    assert resumed.state_dict()["param_step"] == {"w": 5, "bias": 6, "ln_f.weight": 6}


def test_state_dict_is_plain_data():
    params = rand_params(5, SHAPES)
    opt = AdamW(params)
    opt.step(rand_params(6, SHAPES))
    sd = opt.state_dict()
    scalars = {k: v for k, v in sd.items() if k not in ("exp_avg", "exp_avg_sq")}
    json.dumps(scalars)
    for key in ("exp_avg", "exp_avg_sq"):
        assert set(sd[key]) == set(SHAPES)
        assert all(isinstance(a, np.ndarray) for a in sd[key].values())


def test_load_state_dict_rejects_mismatch():
    params = rand_params(7, SHAPES)
    opt = AdamW(params)
    opt.step(rand_params(8, SHAPES))
    sd = opt.state_dict()

    bad = dict(sd, exp_avg=dict(sd["exp_avg"], w=np.zeros((3, 4))))
    with pytest.raises(ValueError, match=r"exp_avg\['w'\].*\(3, 4\)"):
        AdamW(rand_params(7, SHAPES)).load_state_dict(bad)
    bad = dict(sd, exp_avg_sq={**sd["exp_avg_sq"], "nope": np.zeros(3)})
    with pytest.raises(ValueError, match="nope"):
        AdamW(rand_params(7, SHAPES)).load_state_dict(bad)
    other = rand_params(7, {"w": (4, 3), "other.bias": (3,)})
    with pytest.raises(ValueError, match="ln_f.weight"):
        AdamW(other).load_state_dict(sd)
    with pytest.raises(ValueError, match="kind"):
        Adam(rand_params(7, SHAPES)).load_state_dict(sd)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        AdamW(rand_params(7, SHAPES)).load_state_dict({k: v for k, v in sd.items()
                                                       if k != "exp_avg_sq"})


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1e-3), "lr"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        AdamW(rand_params(0, SHAPES), **kw)


def test_bad_grads():
    opt = AdamW(rand_params(0, SHAPES))
    with pytest.raises(ValueError, match="'w'.*\\(3, 4\\)"):
        opt.step({"w": np.zeros((3, 4))})
    with pytest.raises(ValueError, match="'w'.*float32"):
        opt.step({"w": np.zeros((4, 3), np.float32)})
    with pytest.raises(ValueError, match="'missing.weight'"):
        opt.step({"missing.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="lr"):
        opt.step({"w": np.zeros((4, 3))}, lr=-1.0)
    with pytest.raises(ValueError, match="'w'"):
        AdamW({"w": np.zeros(3, np.int64)})
    assert opt.state_dict()["step"] == 0


# ---------------------------------------------------------------- schedules

def test_schedules_at_hand_picked_steps():
    # linear, warmup 4, total 10: ramp 0, 1/4, 2/4, 3/4, then 1 - (t - 4) / 6
    assert linear_schedule(0, 4, 10) == 0.0
    assert linear_schedule(2, 4, 10) == 0.5
    assert linear_schedule(4, 4, 10) == 1.0
    assert linear_schedule(7, 4, 10) == 0.5
    assert linear_schedule(10, 4, 10) == 0.0
    assert linear_schedule(13, 4, 10) == 0.0
    assert linear_schedule(0, 0, 10) == 1.0
    # cosine, warmup 2, total 10: after warmup 0.5 (1 + cos(pi (t - 2) / 8))
    assert cosine_schedule(1, 2, 10) == 0.5
    assert cosine_schedule(2, 2, 10) == 1.0
    assert cosine_schedule(6, 2, 10) == pytest.approx(0.5, abs=1e-15)
    assert cosine_schedule(4, 2, 10) == pytest.approx(0.5 + math.sqrt(2) / 4, rel=1e-15)
    assert cosine_schedule(10, 2, 10) == pytest.approx(0.0, abs=1e-15)
    assert cosine_schedule(10, 2, 10, num_cycles=1.0) == pytest.approx(1.0, rel=1e-15)
    assert constant_with_warmup(1, 4) == 0.25
    assert constant_with_warmup(4, 4) == 1.0
    assert constant_with_warmup(100, 4) == 1.0
    assert constant_schedule(0) == constant_schedule(10**6) == 1.0
    assert get_schedule("linear", 4, 10)(7) == 0.5
    assert get_schedule("cosine", 2, 10)(2) == 1.0
    assert get_schedule("constant_with_warmup", 4, 10)(2) == 0.5
    assert get_schedule("constant", 4, 10)(0) == 1.0


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="constant, constant_with_warmup, linear, cosine"):
        get_schedule("exponential", 1, 10)
    with pytest.raises(ValueError, match="warmup"):
        linear_schedule(1, -1, 10)


@settings(max_examples=60, deadline=None)
@given(warmup=st.integers(0, 200), extra=st.integers(0, 500),
       name=st.sampled_from(["constant_with_warmup", "linear", "cosine"]))
def test_schedule_properties(warmup, extra, name):
    total = warmup + extra
    f = get_schedule(name, warmup, total)
    ramp = [f(t) for t in range(warmup)]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))           # warmup strictly increasing
    assert all(0.0 <= x < 1.0 for x in ramp)
    assert all(0.0 <= f(t) <= 1.0 for t in range(total + 50))    # cosine too (past total)
    if extra > 0:
        assert f(warmup) == 1.0
        if name != "constant_with_warmup":
            decay = [f(t) for t in range(warmup, total + 1)]
            assert all(a >= b for a, b in zip(decay, decay[1:]))  # then non-increasing
            assert f(total) == pytest.approx(0.0, abs=1e-15)     # ending at 0
    if name == "linear":
        assert f(total) == f(total + 7) == 0.0
    if name == "constant_with_warmup":
        assert f(total + 7) == 1.0


# ---------------------------------------------------------------- gradient clipping

@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3), max_norm=st.floats(0.1, 10.0),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_clip_grad_norm_properties(seed, scale, max_norm, dtype):
    grads = {k: v * scale for k, v in rand_params(seed, SHAPES, dtype).items()}
    before = {k: v.copy() for k, v in grads.items()}
    flat = np.concatenate([g.astype(np.float64).ravel() for g in before.values()])
    norm = clip_grad_norm(grads, max_norm)
    assert norm == pytest.approx(math.sqrt(float(np.sum(flat * flat))), rel=1e-12)
    after = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    rtol = 1e-6 if dtype == np.float64 else 1e-5
    if max_norm / (norm + 1e-6) < 1:
        # the 1e-6 in the denominator makes the clipped norm max_norm * norm / (norm + 1e-6),
        # within 1e-6 relative of max_norm once norm >= 1
        assert after == pytest.approx(max_norm * norm / (norm + 1e-6), rel=rtol / 100)
        if norm >= 1:
            assert after == pytest.approx(max_norm, rel=1e-6 if dtype == np.float64 else 1e-5)
        for k in grads:    # one common factor for all grads: direction kept
            np.testing.assert_allclose(grads[k], before[k] * (max_norm / (norm + 1e-6)),
                                       rtol=rtol)
    else:
        for k in grads:
            assert np.array_equal(grads[k], before[k])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 1000), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       strided=st.booleans())
def test_sum_squares_numba_and_numpy_paths(n, seed, dtype, strided):
    from numlm.kernels import set_numba
    from numlm.optim import sum_squares
    g = np.random.default_rng(seed).standard_normal(2 * n if strided else n).astype(dtype)
    g = g[::2] if strided else g  # a strided array takes the NumPy path under Numba too
    exact = math.fsum(float(v) ** 2 for v in g.astype(np.float64))
    for numba in (True, False):
        prev = set_numba(numba)
        try:
            assert sum_squares(g) == pytest.approx(exact, rel=1e-13, abs=0.0)
        finally:
            set_numba(prev)


def test_clip_grad_norm_non_finite():
    grads = {"a": np.array([1.0, np.inf]), "b": np.array([3.0])}
    assert clip_grad_norm(grads, 1.0) == math.inf
    assert np.array_equal(grads["b"], [3.0])
    grads = {"a": np.array([np.nan, 1.0])}
    assert math.isnan(clip_grad_norm(grads, 1.0))
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm({"a": np.ones(2)}, 0.0)
    with pytest.raises(ValueError, match="'a'"):
        clip_grad_norm({"a": np.ones(2, np.int32)}, 1.0)



@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.0", None, True])
def test_clipping_and_schedules_refuse_what_is_not_a_finite_number(bad):
    """A string was a TypeError from a comparison, NaN and infinity passed as if they were numbers."""
    g = {"w": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=r"max_norm must be a finite number, got"):
        clip_grad_norm(g, bad)
    np.testing.assert_array_equal(g["w"], np.ones(3, np.float32))
    for name, args in (("warmup", (bad, 10)), ("total", (2, bad))):
        with pytest.raises(ValueError, match=f"{name} must be a finite number, got"):
            get_schedule("linear", *args)
