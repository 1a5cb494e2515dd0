"""numlm.peft's math: float64 gradchecks (hypothesis draws shapes, ranks, token counts, masks and
values) of the LoRA linear in both layouts, the bottleneck adapter block, prompt tuning and the prefix
table's view as past keys and values, plus values computed independently."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numlm.gradchecking import Uninformative, gradcheck
from numlm.nn import Linear
from numlm.peft import ops as P
from numlm.peft.config import DoubleSeqBnConfig, SeqBnConfig, BnConfig
from numlm.peft.layers import LoraLinear

from stencil import stencil_errors

TOL = 1e-7
TOL_STENCIL = 1e-9  # the five-point stencil's: float32 rounding (up to 6e-8) anywhere fails it
EPS = 2.0 ** -16
seeds = st.integers(0, 2**32 - 1)


def worst(errs, n):
    assert len(errs) == n, errs
    return max(errs.values())


def fine(forward, inputs, backward, kwargs=None, h=2.0 ** -10):
    errs = stencil_errors(forward, inputs, backward, kwargs=kwargs, h=h)
    assert errs and max(errs.values()) < TOL_STENCIL, errs


# ---------------------------------------------------------------------------------------- LoRA

@settings(max_examples=15)
@given(N=st.integers(1, 6), c_in=st.integers(1, 7), c_out=st.integers(1, 7), r=st.integers(1, 4),
       bias=st.booleans(), dropout=st.booleans(), seed=seeds)
def test_lora_linear_gradcheck(N, c_in, c_out, r, bias, dropout, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, c_in))
    w = rng.standard_normal((c_in, c_out))
    b = rng.standard_normal(c_out) if bias else None
    a, bb = rng.standard_normal((c_in, r)), rng.standard_normal((r, c_out))
    s = float(rng.uniform(0.5, 4.0))
    inputs = [x, w, b, a, bb, s]
    if dropout:
        inputs.append(x * (rng.random(x.shape) > 0.3) / 0.7)  # the LoRA branch's own input

    def backward(dy, cache):  # one gradient per floating input: no slot for an absent bias
        g = P.lora_linear_backward(dy, cache)
        return g if bias else g[:2] + g[3:]
    errs = gradcheck(P.lora_linear_forward, tuple(inputs), backward, eps=EPS)
    assert worst(errs, 4 + bias + dropout) < TOL, errs
    fine(P.lora_linear_forward, tuple(inputs), backward)


def test_lora_linear_values_and_frozen_weight():
    """y = x W + b + s (x A^T) B^T with A, B in torch's layout; no weight gradient unless asked."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    A, B = rng.standard_normal((2, 4)), rng.standard_normal((3, 2))  # torch (r, C_in), (C_out, r)
    y, cache = P.lora_linear_forward(x, w, b, A.T.copy(), B.T.copy(), 1.5)
    np.testing.assert_allclose(y, x @ w + b + 1.5 * (x @ A.T) @ B.T, rtol=1e-13)
    dx, dw, db, da, dbb = P.lora_linear_backward(np.ones_like(y), cache, weight_grad=False, bias_grad=False)
    assert dw is None and db is None


@settings(max_examples=10)
@given(B=st.integers(1, 3), T=st.integers(1, 4), c_in=st.integers(1, 6), c_out=st.integers(1, 6),
       r=st.integers(1, 4), torch_layout=st.booleans(), train_base=st.booleans(), seed=seeds)
def test_lora_module_gradcheck_both_layouts(B, T, c_in, c_out, r, torch_layout, train_base, seed):
    """The LoRA linear replacing an nn.Linear (BERT) or a Conv1D (GPT-2): every trainable tensor and
    the input checked numerically; a frozen base weight gets no gradient array at all."""
    rng = np.random.default_rng(seed)
    base = Linear(c_in, c_out, dtype=np.float64, torch_layout=torch_layout)
    base.params["weight"][...] = rng.standard_normal((c_in, c_out))
    base.params["bias"][...] = rng.standard_normal(c_out)
    if not train_base:
        base.grads.clear()  # frozen
    m = LoraLinear(base, r, alpha=2.0 * r)
    m.reset_lora(rng, init=False)
    m.lora_A.params["weight"][...] = rng.standard_normal((c_in, r))
    x = rng.standard_normal((B, T, c_in))
    errs = gradcheck(m, (x,), eps=EPS)
    n = 3 + (2 if train_base else 0)
    assert worst(errs, n) < TOL, errs
    assert ("param:weight" in errs) == train_base
    # torch's layout at the key level: lora_A (r, C_in), lora_B (C_out, r) whatever the base layout
    from numlm.peft.model import export_param
    assert export_param(m.lora_A, "weight").shape == (r, c_in)
    assert export_param(m.lora_B, "weight").shape == (c_out, r)


@settings(max_examples=10)
@given(c_in=st.integers(1, 6), c_out=st.integers(1, 6), r=st.integers(1, 4), torch_layout=st.booleans(),
       seed=seeds)
def test_lora_merge_equals_unmerged(c_in, c_out, r, torch_layout, seed):
    """Merged W + (alpha/r) a b gives the unmerged outputs to 1e-12; in transformers' layout the
    update is (alpha/r) B A for an nn.Linear and its transpose for a Conv1D."""
    rng = np.random.default_rng(seed)
    base = Linear(c_in, c_out, dtype=np.float64, torch_layout=torch_layout)
    base.params["weight"][...] = rng.standard_normal((c_in, c_out))
    base.params["bias"][...] = rng.standard_normal(c_out)
    W0 = base.params["weight"].copy()
    m = LoraLinear(base, r, alpha=3.0)
    A, Bm = rng.standard_normal((r, c_in)), rng.standard_normal((c_out, r))
    m.lora_A.params["weight"][...] = A.T
    m.lora_B.params["weight"][...] = Bm.T
    x = rng.standard_normal((4, c_in))
    y = m(x)
    merged = m.unwrap(merge=True)
    np.testing.assert_allclose(merged(x), y, rtol=0, atol=1e-12 * np.abs(y).max())
    torch_w = W0.T + 3.0 / r * Bm @ A  # (C_out, C_in)
    from numlm.peft.model import export_param
    want = torch_w if torch_layout else torch_w.T
    np.testing.assert_allclose(export_param(merged, "weight"), want, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------- DoRA, IA3

@settings(max_examples=15)
@given(N=st.integers(1, 5), c_in=st.integers(1, 6), c_out=st.integers(1, 6), r=st.integers(1, 3),
       bias=st.booleans(), dropout=st.booleans(), seed=seeds)
def test_dora_linear_gradcheck(N, c_in, c_out, r, bias, dropout, seed):
    """Every input, the norm n among them: the layer passes n = ||W + s a b|| and drops dn (peft
    detaches it), so the op's own gradients, dn included, are checked against central differences."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, c_in))
    w, a, bb = rng.standard_normal((c_in, c_out)), rng.standard_normal((c_in, r)), rng.standard_normal((r, c_out))
    b = rng.standard_normal(c_out) if bias else None
    m, n = rng.uniform(0.5, 2.0, c_out), rng.uniform(0.5, 2.0, c_out)
    inputs = [x, w, b, a, bb, m, n, float(rng.uniform(0.5, 3.0))]
    if dropout:
        inputs.append(x * (rng.random(x.shape) > 0.3) / 0.7)

    def backward(dy, cache):
        g = P.dora_linear_backward(dy, cache)
        return g if bias else g[:2] + g[3:]
    errs = gradcheck(P.dora_linear_forward, tuple(inputs), backward, eps=EPS)
    assert worst(errs, 6 + bias + dropout) < TOL, errs


def test_dora_values_against_peft_formula():
    """y = x W^T + b + (m/n - 1) (x W^T) + (m/n) s (x A^T) B^T in torch's layout, n = ||W + s B A|| per row
    (peft's DoraLinearLayer), computed here independently; with x' = dropout(x) the base term sees x'."""
    rng = np.random.default_rng(3)
    Wt, A, B = rng.standard_normal((3, 4)), rng.standard_normal((2, 4)), rng.standard_normal((3, 2))  # torch layouts
    b, m, x, s = rng.standard_normal(3), rng.uniform(1, 2, 3), rng.standard_normal((5, 4)), 1.5
    n = np.linalg.norm(Wt + s * B @ A, axis=1)
    np.testing.assert_allclose(P.dora_norm(Wt.T.copy(), A.T.copy(), B.T.copy(), s), n, rtol=1e-14)
    y, _ = P.dora_linear_forward(x, Wt.T.copy(), b, A.T.copy(), B.T.copy(), m, n, s)
    np.testing.assert_allclose(y, (m / n) * (x @ Wt.T + s * x @ A.T @ B.T) + b, rtol=1e-13)
    xd = x * (rng.random(x.shape) > 0.5) * 2
    y, _ = P.dora_linear_forward(x, Wt.T.copy(), b, A.T.copy(), B.T.copy(), m, n, s, xd)
    want = x @ Wt.T + b + (m / n - 1) * (xd @ Wt.T) + (m / n) * s * (xd @ A.T @ B.T)
    np.testing.assert_allclose(y, want, rtol=1e-13)


@settings(max_examples=15)
@given(B=st.integers(1, 3), T=st.integers(1, 4), c_in=st.integers(1, 6), c_out=st.integers(1, 6),
       bias=st.booleans(), feedforward=st.booleans(), seed=seeds)
def test_ia3_gradcheck(B, T, c_in, c_out, bias, feedforward, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((B, T, c_in)), rng.standard_normal((c_in, c_out))
    b = rng.standard_normal(c_out) if bias else None
    l = rng.uniform(0.5, 1.5, c_in if feedforward else c_out)

    def backward(dy, cache):
        g = P.ia3_backward(dy, cache)
        return g if bias else g[:2] + g[3:]
    errs = gradcheck(P.ia3_forward, (x, w, b, l, feedforward), backward, eps=EPS)
    assert worst(errs, 3 + bias) < TOL, errs


def test_ia3_values_and_merge():
    """Output scaling (x W^T + b) * l, input scaling (x * l) W^T + b (peft's IA3 Linear), independent
    of numlm; merging (W, b rescaled) gives the same outputs, both layouts."""
    from numlm.peft.layers import IA3Linear
    rng = np.random.default_rng(4)
    x, Wt, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)
    for ff, l in ((False, rng.uniform(0.5, 2, 5)), (True, rng.uniform(0.5, 2, 4))):
        want = (x * l) @ Wt.T + b if ff else (x @ Wt.T + b) * l
        y, _ = P.ia3_forward(x, Wt.T.copy(), b, l, ff)
        np.testing.assert_allclose(y, want, rtol=1e-13)
        for torch_layout in (True, False):
            base = Linear(4, 5, dtype=np.float64, torch_layout=torch_layout)
            base.params["weight"][...], base.params["bias"][...] = Wt.T, b
            m = IA3Linear(base, ff)
            m.ia3_l.params["weight"][...] = l.reshape(m.ia3_l.params["weight"].shape)
            assert m.ia3_l.params["weight"].shape == ((1, 4) if ff else (5, 1))  # peft's file shapes
            np.testing.assert_allclose(m(x), want, rtol=1e-13)
            np.testing.assert_allclose(m.unwrap(merge=True)(x), want, rtol=1e-13)
    with pytest.raises(ValueError, match=r"IA3 vector has shape \(4,\), the output needs \(5,\)"):
        P.ia3_forward(x, Wt.T.copy(), b, np.ones(4), False)


# ---------------------------------------------------------------------------------------- adapters

ACTS = ["swish", "relu", "gelu", "gelu_new", "tanh"]


@settings(max_examples=15)
@given(N=st.integers(1, 6), C=st.integers(1, 6), m=st.integers(1, 4), act=st.sampled_from(ACTS),
       scaling=st.floats(0.25, 2.0), seed=seeds)
def test_bottleneck_gradcheck(N, C, m, act, scaling, seed):
    rng = np.random.default_rng(seed)
    z, r = rng.standard_normal((N, C)), rng.standard_normal((N, C))
    wd, bd, wu, bu = (rng.standard_normal(s) for s in ((C, m), (m,), (m, C), (C,)))
    if act == "relu":  # keep pre-activations away from the kink
        bd = bd + np.sign(bd) * 0.5
    errs = gradcheck(P.bottleneck_forward, (z, r, wd, bd, wu, bu), P.bottleneck_backward,
                     kwargs={"act": act, "scaling": scaling}, eps=EPS)
    assert worst(errs, 6) < TOL, errs
    fine(P.bottleneck_forward, (z, r, wd, bd, wu, bu), P.bottleneck_backward, {"act": act, "scaling": scaling})


def _block_fn(cfg, use_ln):
    def forward(h, x, gamma, beta, wd, bd, wu, bu):
        ln = (gamma, beta, 1e-5) if use_ln else None
        return P.adapter_block_forward(h, x, ln, {"wd": wd, "bd": bd, "wu": wu, "bu": bu}, cfg)

    def backward(dout, cache):
        dh, dx, g, dln = P.adapter_block_backward(dout, cache, cfg)
        dg, db = dln if dln is not None else (np.zeros(dout.shape[-1]), np.zeros(dout.shape[-1]))
        return dh, dx, dg, db, g["wd"], g["bd"], g["wu"], g["bu"]
    return forward, backward


@settings(max_examples=20)
@given(B=st.integers(1, 3), T=st.integers(1, 4), C=st.integers(3, 6), m=st.integers(1, 3),
       kind=st.sampled_from(["houlsby", "pfeiffer", "custom"]), use_ln=st.booleans(),
       flags=st.tuples(st.booleans(), st.booleans(), st.booleans()), seed=seeds)
def test_adapter_block_gradcheck(B, T, C, m, kind, use_ln, flags, seed):
    """The sub-layer junction with an adapter, for every combination of AdapterHub's flags, with the
    block's LayerNorm (BERT, GPT-1) or without (GPT-2)."""
    if kind == "houlsby":
        cfg = DoubleSeqBnConfig(reduction_factor=1)
    elif kind == "pfeiffer":
        cfg = SeqBnConfig(reduction_factor=1, non_linearity="tanh")
    else:
        cfg = BnConfig(original_ln_before=flags[0], original_ln_after=flags[1], residual_before_ln=flags[2],
                       non_linearity="gelu", scaling=0.7)
    rng = np.random.default_rng(seed)
    h, x = rng.standard_normal((B, T, C)), rng.standard_normal((B, T, C))
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    wd, bd, wu, bu = (rng.standard_normal(s) for s in ((C, m), (m,), (m, C), (C,)))
    f, b = _block_fn(cfg, use_ln)
    errs = gradcheck(f, (h, x, gamma, beta, wd, bd, wu, bu), b, eps=EPS)
    unused = set()
    if not cfg.original_ln_before and not cfg.original_ln_after:
        unused = {"x", "gamma", "beta"}  # the block goes on with the adapter's output alone: no residual, no LN
    elif not use_ln:
        unused = {"gamma", "beta"}  # without the block's LayerNorm they change nothing
    assert {k for k, e in errs.items() if isinstance(e, Uninformative)} == unused, errs
    # the LayerNorm twice (Pfeiffer) is curved enough that central differences reach ~1e-7: the precise
    # check is the stencil, at a smaller step than the default (truncation O(h^4))
    assert max(e for k, e in errs.items() if k not in unused) < 1e-6, errs
    fine(f, (h, x, gamma, beta, wd, bd, wu, bu), b, h=2.0 ** -12)


def test_adapter_block_values():
    """Houlsby: LN(h + up(swish(down(h))) + x); Pfeiffer: LN(h + up(relu(down(LN(h + x)))) + x)."""
    rng = np.random.default_rng(1)
    C, m = 4, 2
    h, x = rng.standard_normal((3, C)), rng.standard_normal((3, C))
    g, be = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    W = {"wd": rng.standard_normal((C, m)), "bd": rng.standard_normal(m), "wu": rng.standard_normal((m, C)),
         "bu": rng.standard_normal(C)}

    def LN(v):
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-5) * g + be

    def up(v, act):
        p = v @ W["wd"] + W["bd"]
        return act(p) @ W["wu"] + W["bu"]

    swish = lambda p: p / (1 + np.exp(-p))  # noqa: E731
    relu = lambda p: np.maximum(p, 0)  # noqa: E731
    out, _ = P.adapter_block_forward(h, x, (g, be, 1e-5), W, DoubleSeqBnConfig())
    np.testing.assert_allclose(out, LN(h + up(h, swish) + x), rtol=1e-12, atol=1e-12)
    out, _ = P.adapter_block_forward(h, x, (g, be, 1e-5), W, SeqBnConfig())
    np.testing.assert_allclose(out, LN(h + up(LN(h + x), relu) + x), rtol=1e-12, atol=1e-12)
    out, _ = P.adapter_block_forward(h, x, None, W, SeqBnConfig())  # GPT-2: no LayerNorm
    np.testing.assert_allclose(out, h + up(h + x, relu) + x, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- prompts, prefixes

@settings(max_examples=10)
@given(B=st.integers(1, 3), T=st.integers(1, 4), C=st.integers(1, 5), n=st.integers(1, 4), seed=seeds)
def test_prompt_gradcheck(B, T, C, n, seed):
    rng = np.random.default_rng(seed)
    emb, prompt = rng.standard_normal((B, T, C)), rng.standard_normal((n, C))
    errs = gradcheck(P.prompt_forward, (emb, prompt), lambda d, c: P.prompt_backward(d, c), eps=EPS)
    assert worst(errs, 2) < TOL
    fine(P.prompt_forward, (emb, prompt), lambda d, c: P.prompt_backward(d, c))
    out, _ = P.prompt_forward(emb, prompt)
    np.testing.assert_array_equal(out[1 % B, :n], prompt)
    np.testing.assert_array_equal(out[:, n:], emb)


@settings(max_examples=10)
@given(B=st.integers(1, 3), n=st.integers(1, 4), L=st.integers(1, 3), H=st.integers(1, 3), D=st.integers(1, 3),
       seed=seeds)
def test_prefix_layout_gradcheck(B, n, L, H, D, seed):
    """prompt (n, L*2*C) -> view(B, n, 2L, H, D).permute(2, 0, 3, 1, 4): entry 2l the keys of layer l."""
    rng = np.random.default_rng(seed)
    prompt = rng.standard_normal((n, L * 2 * H * D))
    past, _ = P.prefix_forward(prompt, B, L, H)
    ref = prompt.reshape(n, 2 * L, H, D)
    for l in range(L):
        np.testing.assert_array_equal(past[l][0][B - 1], ref[:, 2 * l].transpose(1, 0, 2))
        np.testing.assert_array_equal(past[l][1][0], ref[:, 2 * l + 1].transpose(1, 0, 2))

    def f(prompt):
        past, c = P.prefix_forward(prompt, B, L, H)
        return np.stack([t for kv in past for t in kv]), c

    def b(d, c):
        return P.prefix_backward([(d[2 * l], d[2 * l + 1]) for l in range(L)], c)
    assert worst(gradcheck(f, (prompt,), b, eps=EPS), 1) < TOL
    fine(f, (prompt,), b)


def test_swish_values():
    x = np.linspace(-4, 4, 9)
    y, c = P.swish_forward(x)
    np.testing.assert_allclose(y, x / (1 + np.exp(-x)), rtol=1e-15)
    with pytest.raises(ValueError, match="non_linearity"):
        BnConfig(non_linearity="softsign")
