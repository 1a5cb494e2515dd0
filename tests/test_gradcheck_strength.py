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
