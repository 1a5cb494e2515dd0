"""The public gradcheck: it passes correct gradients, catches wrong ones, and works on user ops."""
import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numlm import ops
from numlm.gradchecking import UPSTREAM, NonFinite, Uninformative, Verdict, gradcheck, stream


def square_forward(x, w):
    """y = (x * w)^2    a user-defined op pair"""
    y = (x * w) ** 2
    return y, (x, w)


def square_backward(dy, cache):
    x, w = cache
    return dy * 2 * x * w * w, dy * 2 * x * x * w


def square_backward_missing_2(dy, cache):
    x, w = cache
    return dy * x * w * w, dy * 2 * x * x * w


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6))
def test_user_op_passes_and_wrong_factor_is_caught(seed, n):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(n) + 0.1, rng.standard_normal(n) + 0.1
    good = gradcheck(square_forward, (x, w), square_backward)
    assert set(good) == {"x", "w"} and max(good.values()) < 1e-8
    bad = gradcheck(square_forward, (x, w), square_backward_missing_2)
    # the analytic x-gradient is half the true one: relative error 1/2 at the largest entry
    assert abs(bad["x"] - 0.5) < 1e-6 and bad["w"] < 1e-8


def test_inputs_are_restored():
    x = np.random.default_rng(0).standard_normal((3, 4))
    x0 = x.copy()
    gradcheck(ops.softmax_forward, (x,), ops.softmax_backward)
    np.testing.assert_array_equal(x, x0)


def test_random_dout_catches_what_all_ones_would_not():
    """With dout = 1 softmax's input gradient is 0 whatever backward returns; gradcheck's random
    dout exposes a backward that forgot the - sum(dy y) term."""
    def wrong(dy, y):
        return y * dy

    x = np.random.default_rng(1).standard_normal((2, 5))
    assert gradcheck(ops.softmax_forward, (x,), wrong)["x"] > 0.01


def test_non_contiguous_inputs():
    x = np.random.default_rng(8).standard_normal((5, 4)).T  # a transposed view
    assert gradcheck(ops.softmax_forward, (x,), ops.softmax_backward)["x"] < 1e-7
    assert gradcheck(ops.softmax_forward, {"x": x}, ops.softmax_backward)["x"] < 1e-7


def test_max_entries_samples():
    calls = []

    def forward(x):
        calls.append(1)
        return x * 3.0, None

    def backward(dy, cache):
        return dy * 3.0

    x = np.random.default_rng(2).standard_normal(1000)
    err = gradcheck(forward, (x,), backward, max_entries=7)
    assert err["x"] < 1e-8
    assert len(calls) == 2 + 2 * 7  # the analytic and the reference pass, two forwards per checked entry


def test_max_entries_still_catches_a_wrong_entry():
    def backward(dy, cache):
        g = dy * 3.0
        return g * np.where(np.arange(g.size) % 2 == 0, 1.0, 0.5)  # every other entry wrong

    x = np.random.default_rng(3).standard_normal(100)
    assert gradcheck(lambda x: (x * 3.0, None), (x,), backward, max_entries=10)["x"] > 0.1


def test_dict_inputs_and_kwargs():
    rng = np.random.default_rng(4)
    inputs = {"x": rng.standard_normal((2, 3)), "gamma": rng.standard_normal(3), "beta": rng.standard_normal(3)}
    err = gradcheck(ops.layernorm_forward, inputs, ops.layernorm_backward, kwargs={"eps": 1e-3})
    assert set(err) == {"x", "gamma", "beta"} and max(err.values()) < 1e-7


def test_scalar_output_and_integer_inputs_pass_through():
    rng = np.random.default_rng(5)
    logits, targets = rng.standard_normal((4, 3)), np.array([0, 2, -100, 1])
    err = gradcheck(ops.cross_entropy_forward, (logits, targets), ops.cross_entropy_backward)
    assert set(err) == {"logits"} and err["logits"] < 1e-7


def test_error_is_relative_to_largest_entry():
    """A gradient off by delta at one entry reports delta / max |gradient|."""
    def forward(x):
        return x * np.array([1.0, 10.0]), None

    def backward(dy, cache):
        return dy * np.array([1.0, 10.0]) + np.array([1e-3, 0.0])

    x = np.array([0.3, -0.2])
    dout = stream(0, UPSTREAM).standard_normal(2)  # gradcheck's own dout for seed=0
    g = np.abs(dout * np.array([1.0, 10.0]))
    err = gradcheck(forward, (x,), backward, seed=0)["x"]
    expect = 1e-3 / max(g.max(), abs(dout[0] + 1e-3), g[1])
    assert math.isclose(err, expect, rel_tol=1e-5)


def test_float32_inputs_refused():
    with pytest.raises(ValueError, match=r"float64 inputs; x is float32"):
        gradcheck(ops.softmax_forward, (np.zeros((2, 3), np.float32),), ops.softmax_backward)


def test_missing_backward_refused():
    with pytest.raises(ValueError, match="backward"):
        gradcheck(ops.softmax_forward, (np.zeros((2, 3)),))


def test_wrong_gradient_shape_refused():
    with pytest.raises(ValueError, match=r"analytic gradient for x has shape \(3,\), expected \(2, 3\)"):
        gradcheck(ops.softmax_forward, (np.zeros((2, 3)),), lambda dy, c: np.zeros(3))


def test_dropout_generator_rewound():
    """A Generator among the kwargs is rewound before every forward, so the mask is fixed."""
    x = np.random.default_rng(6).standard_normal((4, 5))
    err = gradcheck(ops.dropout_forward, (x,), ops.dropout_backward,
                    kwargs={"p": 0.5, "rng": np.random.default_rng(7)})
    assert err["x"] < 1e-9


def test_examples_run_and_report_what_they_claim():
    """examples/gradcheck_rmsnorm.py: the correct backward passes, the wrong one is caught."""
    import subprocess
    import sys
    from pathlib import Path
    import os
    root = Path(__file__).parent.parent
    script = root / "examples" / "gradcheck_rmsnorm.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True,
                         env=env).stdout
    lines = {l.split()[0] + " " + l.split()[1]: l for l in out.splitlines()}
    correct = [float(v) for v in lines["correct backward"].split()[3::2]]
    wrong_x = float(lines["wrong backward"].split()[3])
    model = float(lines["tiny GPT-2"].split()[-1])
    assert max(correct) < 1e-7 and wrong_x > 0.1 and model < 1e-7


# ---- inputs drawn with gradcheck's own seeds, degenerate checks, non-finite gradients -------------
def layernorm_without_mean_term(dy, cache):
    """LayerNorm's backward forgetting that the mean depends on x (the - mean(dxhat) term)."""
    xhat, rstd, gamma = cache
    dxhat = dy * gamma
    dx = rstd[..., None] * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return (dx,) + ops.layernorm_backward(dy, cache)[1:]


def softmax_without_sum_term(dy, y):
    return y * dy


def attention_without_scale(dout, cache):
    """dq and dk as if the scores were q k^T, not q k^T * scale."""
    dq, dk, dv = ops.attention_backward(dout, cache)
    return dq / cache.scale, dk / cache.scale, dv


def op_cases(s):
    """(forward, correct backward, broken backward, inputs, kwargs, the input the break changes),
    every value drawn from default_rng(s) as a user seeding with s would."""
    x4 = np.random.default_rng(s).standard_normal((3, 4))
    x64 = np.random.default_rng(s).standard_normal((3, 64))
    q, k, v = (np.random.default_rng(s).standard_normal((2, 2, 5, 4)) for _ in range(3))
    return {
        "layernorm (README)": (ops.layernorm_forward, ops.layernorm_backward, layernorm_without_mean_term,
                               (x4, np.ones(4), np.zeros(4)), {}, "x"),
        "layernorm C=64": (ops.layernorm_forward, ops.layernorm_backward, layernorm_without_mean_term,
                           (x64, np.ones(64), np.zeros(64)), {}, "x"),
        "softmax": (ops.softmax_forward, ops.softmax_backward, softmax_without_sum_term, (x64,), {}, "x"),
        "attention": (ops.attention_forward, ops.attention_backward, attention_without_scale, (q, k, v),
                      {"causal": True}, "q"),
    }


@pytest.mark.parametrize("s", [0, 1, 2])  # 0: gradcheck's default seed; check_model drew from seed + 1 too
def test_inputs_drawn_with_gradchecks_seeds_check_at_rounding_level(s):
    """gradcheck's dout came from default_rng(seed): with x from default_rng(0) it was x itself, and
    LayerNorm's input gradient of sum(LN(x) * x) is almost zero (LN is scale-invariant), so a correct
    backward read as off by 1e-3 at C=64."""
    for name, (f, good, bad, inputs, kw, broken) in op_cases(s).items():
        errors = gradcheck(f, inputs, good, kwargs=kw, seed=0)
        assert max(errors.values()) < 1e-8, (name, errors)
        errors = gradcheck(f, inputs, bad, kwargs=kw, seed=0)
        assert not isinstance(errors[broken], Verdict) and errors[broken] > 1e-2, (name, errors)


def test_a_degenerate_dout_is_reported_uninformative():
    """The old trap made on purpose: the input equals gradcheck's own dout for seed 0."""
    x = stream(0, UPSTREAM).standard_normal((3, 64))
    errors = gradcheck(ops.layernorm_forward, (x, np.ones(64), np.zeros(64)), ops.layernorm_backward, seed=0)
    assert isinstance(errors["x"], Uninformative) and repr(errors["x"]) == "uninformative"
    assert errors["gamma"] < 1e-8 and errors["beta"] < 1e-8
    assert not errors["x"] < 1 and max(errors.values()) is errors["x"]  # never passes a tolerance
    assert f"{errors['x']:.2e}" == "uninformative" and f"{errors['x']:>15.2e}" == "  uninformative"
    again = pickle.loads(pickle.dumps(errors))["x"]  # results cross processes (numlm.compare) intact
    assert isinstance(again, Uninformative) and again == math.inf
    other = gradcheck(ops.layernorm_forward, (x, np.ones(64), np.zeros(64)), ops.layernorm_backward, seed=1)
    assert max(other.values()) < 1e-8  # the op is fine: another dout checks it


def test_an_input_the_output_ignores_is_uninformative():
    """softmax ignores a constant added to a row (b), and this output ignores y: their gradients are
    zero under every dout, and a relative error of rounding noise against rounding noise says nothing."""
    def forward(x, b, y):
        return ops.softmax_forward(x + b[:, None])

    def backward(dout, cache):
        dx = ops.softmax_backward(dout, cache)
        return dx, dx.sum(axis=-1), np.zeros(3)

    rng = np.random.default_rng(10)
    errors = gradcheck(forward, (rng.standard_normal((3, 5)), rng.standard_normal(3), rng.standard_normal(3)), backward)
    assert errors["x"] < 1e-8
    assert isinstance(errors["b"], Uninformative) and isinstance(errors["y"], Uninformative)


@pytest.mark.parametrize("where", ["analytic", "numeric"])
def test_non_finite_gradients_never_pass(where):
    def backward(dy, x):
        g = dy / x
        if where == "analytic":
            g[0, 1] = np.nan
        return g

    x = np.random.default_rng(11).uniform(1, 2, (2, 3))
    if where == "numeric":
        x[1, 2] = 1e-7  # log(x - eps) is NaN there
    with np.errstate(invalid="ignore"):
        errors = gradcheck(lambda x: (np.log(x), x), (x,), backward)
    assert isinstance(errors["x"], NonFinite) and repr(errors["x"]) == "non-finite"
    assert not errors["x"] <= 1e-5 and errors["x"] > 1  # compares as inf: a failure by any tolerance


def test_print_op_table_fails_on_non_finite_and_uninformative(capsys):
    from numlm.cli.inspect import print_op_table
    x = np.random.default_rng(12).standard_normal((2, 5))
    assert print_op_table({"softmax": (ops.softmax_forward, ops.softmax_backward, (x,), {})}) == 0
    nan = {"softmax": (ops.softmax_forward, lambda dy, y: ops.softmax_backward(dy, y) * np.nan, (x,), {})}
    assert print_op_table(nan) == 1
    assert "non-finite" in capsys.readouterr().out
    zero = {"constant": (lambda x: (np.ones_like(x), None), lambda dy, c: np.zeros_like(dy), (x,), {})}
    assert print_op_table(zero) == 1
    assert "uninformative" in capsys.readouterr().out


def test_readme_gradcheck_example_prints_what_it_claims():
    """README, "Gradient checking": the snippet prints the dicts its comments show, every error
    below the bound the text states (it printed 2e-6 for LayerNorm's x when dout was x itself)."""
    import ast
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).parent.parent
    section = (root / "README.md").read_text().split("\n## Gradient checking\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    bound = float(re.search(r"Every error these lines print is below (\d[\d.e+-]*\d):", section).group(1))
    claimed = [ast.literal_eval(c) for c in re.findall(r"# (\{.*\})", code)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         env=env).stdout
    printed = [ast.literal_eval(line) for line in out.splitlines()]
    assert [list(p) for p in printed] == [list(c) for c in claimed] and len(printed) == 2, out
    assert all(0 <= e < bound for p in printed + claimed for e in p.values()), (bound, out)
