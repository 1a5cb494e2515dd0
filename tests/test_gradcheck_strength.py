"""How strong the gradient checks are: what a wrong backward may not hide behind (a gradient left at
zero, an absurd entry, the model's last forward), the inputs they must not skip or mangle, and the
arguments that would make a check meaningless. Each test failed before its fix."""
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import numlm
from numlm.cli import main
from numlm.gradchecking import gradcheck
from numlm.inspect import broken_backward, check_checkpoint, check_model
from numlm.nn import OPS

from conftest import FIXTURES
from test_inspect import TEXT, word_tokenizer

IDS = np.array([[5, 9, 13, 7, 21, 3, 11, 2]])


def tiny_lm(cls=numlm.GPT2LMHeadModel):
    cfg = numlm.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=4, n_positions=20)
    return cls(cfg, seed=0, dtype="float64")


def square(x):
    return x * x, x


def square_backward_times(k):
    """d(x^2)/dx as k x: right for k = 2, off by |k - 2| / max(k, 2) on every entry otherwise."""
    return lambda dy, x: k * x * dy


# ---- 1. a gradient a backward left at zero -----------------------------------------------------
def test_check_model_probes_where_the_analytic_gradient_is_zero(monkeypatch):
    forward, backward = OPS["linear"]

    def drops_half(dy, cache, *more, **kw):
        dx, dw, db = backward(dy, cache, *more, **kw)
        if dw is not None:
            dw = dw.copy()
            dw[:, dw.shape[1] // 2:] = 0  # the second half of every weight's columns lost
        return dx, dw, db

    model = tiny_lm()
    assert check_model(model, IDS).passed
    monkeypatch.setitem(OPS, "linear", (forward, drops_half))
    res = check_model(model, IDS)
    assert not res.passed
    failed = {r.name for r in res.rows if r.error > res.tol}
    assert failed and all(n.endswith(".weight") and ("attn" in n or "mlp" in n) for n in failed), res.table()
    every = check_model(model, IDS, params=10 ** 6, tol=0.5)  # every entry: half of each weight is off by 100%
    assert {r.name: r.checked for r in every.rows}["transformer.h.0.attn.c_attn.weight"] == 16 * 48
    assert not every.passed


# ---- 2. an absurd entry does not shrink the others' errors --------------------------------------
@settings(max_examples=15, deadline=None)
@given(at=st.integers(0, 99), absurd=st.floats(1e3, 1e12), max_entries=st.integers(2, 30))
def test_an_absurd_entry_does_not_hide_a_wrong_gradient(at, absurd, max_entries):
    x = np.random.default_rng(0).standard_normal(100)
    wrong = square_backward_times(3.0)
    alone = gradcheck(square, (x,), wrong)["x"]  # every entry compared, no absurd one
    assert abs(alone - 1 / 3) < 1e-6

    def wrong_and_absurd(dy, x):
        g = wrong(dy, x)
        g[at] = absurd  # a row a backward never wrote
        return g

    assert gradcheck(square, (x,), wrong_and_absurd, max_entries=max_entries)["x"] >= alone


def test_an_absurd_unchecked_entry_does_not_pass_a_broken_model(monkeypatch):
    """Junk in a position row no token uses (its true gradient is 0) made every row's error negligible."""
    forward, backward = OPS["embedding"]

    def junk_in_the_last_position(dout, cache, *more, **kw):
        g = backward(dout, cache, *more, **kw)
        if g.shape[0] == 20:  # wpe, not wte (40 rows)
            g[-1, 0] += 1e8
        return g

    model = tiny_lm()
    with broken_backward("layernorm"):
        alone = check_model(model, IDS)
    monkeypatch.setitem(OPS, "embedding", (forward, junk_in_the_last_position))
    with broken_backward("layernorm"):
        res = check_model(model, IDS)
    rows = {r.name: r.error for r in res.rows}
    assert not res.passed and rows["transformer.wpe.weight"] > 0.5, res.table()
    broken = [r.name for r in alone.rows if r.error > alone.tol and "ln_" in r.name]
    assert broken and all(rows[n] > res.tol for n in broken), res.table()  # still caught beside the junk


# ---- 3. the caller's last forward survives a check ----------------------------------------------
def caller_gradients(model, batch):
    model.zero_grad()
    model(batch, labels=batch)
    model.backward()
    return {k: g.copy() for k, g in model.grad_arrays().items()}


@pytest.mark.parametrize("check", [lambda m, p: check_model(m, p, params=1),
                                   lambda m, p: gradcheck(m, {"input_ids": p, "labels": p}, max_entries=1)])
def test_a_check_leaves_the_callers_last_forward(check):
    model = tiny_lm().eval()
    batch, probe = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]), np.array([[30, 31, 32]])
    want = caller_gradients(model, batch)
    model(batch, labels=batch)
    check(model, probe)
    model.zero_grad()
    model.backward()  # the caller's forward's
    got = model.grad_arrays()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    fresh = tiny_lm()
    check(fresh, probe)
    with pytest.raises(ValueError, match="needs a forward pass first"):
        fresh.backward()


# ---- 4. a floating-point input of a model is checked, or refused by name -----------------------
@pytest.mark.parametrize("labels", [True, False])
def test_inputs_embeds_of_a_model_is_checked(labels):
    model = tiny_lm(numlm.GPT2LMHeadModel if labels else numlm.GPT2Model)
    embeds = np.random.default_rng(0).standard_normal((1, 6, 16))
    inputs = {"inputs_embeds": embeds, **({"labels": np.array([[1, 2, 3, 4, 5, 6]])} if labels else {})}
    errors = gradcheck(model, inputs, max_entries=4)
    assert errors["inputs_embeds"] < 1e-6, errors
    assert len(errors) == 1 + len(model.trainable_parameters())


def test_bert_inputs_embeds_and_float_targets():
    bert = numlm.from_pretrained(FIXTURES / "hf" / "bert-tiny-seqcls", dtype="float64")
    embeds = np.random.default_rng(1).standard_normal((2, 4, bert.config.hidden_size))
    labels = np.zeros(2, dtype=np.int64)
    errors = gradcheck(bert, {"inputs_embeds": embeds, "labels": labels}, max_entries=2, check_params=False)
    assert set(errors) == {"inputs_embeds"} and errors["inputs_embeds"] < 1e-6
    regression = numlm.BertForSequenceClassification(dict(bert.config.to_dict(), num_labels=1, problem_type="regression"), dtype="float64")
    errors = gradcheck(regression, {"input_ids": np.array([[2, 3, 4]]), "labels": np.array([0.5])}, max_entries=2)
    assert "labels" not in errors  # a float target passes through, like integer labels


def test_a_float_input_without_a_gradient_is_refused_by_name():
    model = tiny_lm()
    ids = np.array([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"no gradient for the floating-point input attention_mask"):
        gradcheck(model, {"input_ids": ids, "attention_mask": np.ones((1, 4)), "labels": ids}, max_entries=1)


# ---- 5. tol and eps within meaningful ranges -----------------------------------------------------
@pytest.mark.parametrize("tol", [1, 2.0, 1e9, 0.0, -1e-5])
def test_a_tolerance_that_passes_anything_is_refused(tol):
    with pytest.raises(ValueError, match=r"tol must be a number in \(0, 1\)"):
        check_model(tiny_lm(), IDS, tol=tol)


@pytest.mark.parametrize("eps", [1e-20, 1e-11, 2.0, 0.0])
def test_a_step_out_of_range_is_refused(eps):
    x = np.random.default_rng(0).standard_normal(4)
    with pytest.raises(ValueError, match=r"eps must be a number in \[1e-10, 1\]"):
        gradcheck(square, (x,), square_backward_times(2.0), eps=eps)
    with pytest.raises(ValueError, match=r"eps must be a number"):
        check_model(tiny_lm(), IDS, eps=eps)


@settings(max_examples=20, deadline=None)
@given(log_eps=st.floats(-10, -4))
def test_every_accepted_step_measures_a_correct_backward(log_eps):
    """sin's central difference is off by eps^2 / 6 (truncation) and ~1e-16 / eps (round-off)."""
    x = np.random.default_rng(2).standard_normal(8)
    err = gradcheck(lambda x: (np.sin(x), x), (x,), lambda dy, x: np.cos(x) * dy, eps=10.0 ** log_eps)["x"]
    assert err < 1e-4
    wrong = gradcheck(lambda x: (np.sin(x), x), (x,), lambda dy, x: 1.01 * np.cos(x) * dy, eps=10.0 ** log_eps)["x"]
    assert wrong > 100 * err


def test_the_cli_refuses_a_tolerance_that_passes_anything(capsys):
    assert main(["gradcheck", "--break", "linear", "--tol", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tol" in err
    assert main(["gradcheck", "--break", "linear", "--tol", "0.5"]) == 1  # a missing bias gradient: error 1


# ---- 6. inputs copied into writable arrays of their own shape -----------------------------------
def test_zero_dimensional_and_read_only_inputs():
    x = np.random.default_rng(0).standard_normal(5)
    scale = np.array(1.5)
    errors = gradcheck(lambda s, x: (s * x, (s, x)), (scale, x), lambda dy, c: (np.sum(dy * c[1]), dy * c[0]))
    assert max(errors.values()) < 1e-8, errors
    frozen = x.copy()
    frozen.setflags(write=False)
    assert gradcheck(square, (frozen,), square_backward_times(2.0))["x"] < 1e-8
    assert np.array_equal(frozen, x) and scale.shape == ()


# ---- 7. a causal LM needs two tokens ------------------------------------------------------------
def test_one_token_on_a_causal_lm_is_bad_input(tmp_path, capsys):
    d = tmp_path / "gpt2-tiny"
    shutil.copytree(FIXTURES / "hf" / "gpt2-tiny", d)
    word_tokenizer().save(d)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        check_checkpoint(d, text="the")
    capsys.readouterr()
    assert main(["gradcheck", str(d), "--text", "the"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 2 tokens" in err[0]
    assert check_checkpoint(d, text="the cat", params=1).passed


def test_a_check_keeps_the_input_gradients_it_computed():
    """the caller's forward comes back, the check's gradients stay: inputs_embeds_grad is the checked pass's,
    the one a backward of that pass alone leaves (in eval: no dropout draws to line up)"""
    model = tiny_lm(numlm.GPT2LMHeadModel).eval()
    embeds = np.random.default_rng(0).standard_normal((1, 6, 16))
    labels = np.array([[1, 2, 3, 4, 5, 6]])
    gradcheck(model, {"inputs_embeds": embeds, "labels": labels}, max_entries=2)
    kept = model.transformer.inputs_embeds_grad
    model.zero_grad()
    model(inputs_embeds=embeds, labels=labels)
    model.backward()
    assert kept is not None
    np.testing.assert_allclose(kept, model.transformer.inputs_embeds_grad, rtol=1e-12, atol=1e-15)


def test_check_model_refuses_a_peft_model_by_name():
    from numlm.peft import LoraConfig, get_peft_model
    peft = get_peft_model(tiny_lm(numlm.GPT2LMHeadModel), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="check_model takes a numlm model, not a PeftModel"):
        check_model(peft, np.array([[1, 2, 3]]))
