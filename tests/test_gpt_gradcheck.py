"""Whole-model numerical gradient checks (float64, tiny random configs) for every GPT class:
left and right padding, explicit position_ids, token_type_ids, scale_attn_by_inverse_layer_idx,
and dropout on (train mode, fixed seed; gradcheck rewinds the model's Generator)."""
import numba
import numpy as np
import pytest

import numlm
from numlm.models import ModelOutput
from numlm.nn import Module
from numlm.models.gpt import (GPT2Config, OpenAIGPTConfig, GPT2Model, GPT2LMHeadModel,
                              GPT2ForSequenceClassification, GPT2DoubleHeadsModel, OpenAIGPTModel,
                              OpenAIGPTLMHeadModel, OpenAIGPTDoubleHeadsModel)

V, T = 23, 6
TOL = 1e-7


def config(cls, dropout, **kw):
    p = 0.1 if dropout else 0.0
    base = dict(vocab_size=V, n_positions=10, n_embd=8, n_layer=2, n_head=2, resid_pdrop=p, embd_pdrop=p,
                attn_pdrop=p, summary_first_dropout=p)
    if "OpenAI" in cls.__name__:
        return OpenAIGPTConfig(**base, **kw)
    return GPT2Config(**base, **kw)


def inputs(rng, B, extras):
    """Row 0 right-padded, row 1 left-padded (both kinds of padding in one batch)."""
    ids = rng.integers(1, V, (B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[0, -2:] = 0
    mask[1, :2] = 0
    ids[mask == 0] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    if "positions" in extras:
        kw["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # generate()'s left-padding positions
    if "token_types" in extras:
        kw["token_type_ids"] = rng.integers(0, 3, (B, T))
    return kw


@pytest.fixture(autouse=True, scope="module")
def one_numba_thread():
    """Tiny arrays: a parallel kernel launch on a busy 2-core machine costs milliseconds."""
    prev = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(prev)


def check(model, kw, max_entries=6, zero=()):
    """Every parameter's relative error below TOL; `zero` names parameters whose gradient is exactly
    zero by the math (relative error is meaningless there): their analytic gradient must vanish."""
    errors = numlm.gradcheck(model, kw, max_entries=max_entries, seed=1)
    assert len(errors) == len(model.parameters())
    grads = model.grad_arrays()
    for name in zero:
        assert np.abs(grads[name]).max() < 1e-12, name
        errors.pop("param:" + name)
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, (worst, errors[worst])


CASES = [
    ("plain", False, {}),
    ("dropout+positions+token_types", True, {"positions", "token_types"}),
]


def _model(cls, dropout, seed=0, **kw):
    """Weights re-drawn at the fixtures' scales (0.02 init makes gradients so small that central
    differences lose digits): matrices N(0, 1/fan_in), embeddings N(0, 0.3^2), biases N(0, 0.1^2),
    LayerNorm weights 1 + N(0, 0.1^2)."""
    m = cls(config(cls, dropout, **kw), seed=seed, dtype="float64")
    rng = np.random.default_rng(seed + 100)
    for name, p in m.parameters().items():
        if name.endswith("bias") or ".ln_" in name:
            p[...] = (name.endswith("weight")) + rng.normal(0, 0.1, p.shape)
        elif "wte" in name or "wpe" in name or "_embed" in name:
            p[...] = rng.normal(0, 0.3, p.shape)
        else:
            p[...] = rng.normal(0, 1 / np.sqrt(p.shape[0]), p.shape)  # numlm keeps (C_in, C_out)
    return m.train() if dropout else m.eval()


@pytest.mark.parametrize("name,dropout,extras", CASES)
@pytest.mark.parametrize("cls", [GPT2LMHeadModel, OpenAIGPTLMHeadModel])
def test_lm_models(cls, name, dropout, extras):
    rng = np.random.default_rng(0)
    kw = inputs(rng, 2, extras)
    kw["labels"] = np.where(kw["attention_mask"] == 1, kw["input_ids"], -100)
    check(_model(cls, dropout), kw)


@pytest.mark.parametrize("name,dropout,extras", CASES)
@pytest.mark.parametrize("cls", [GPT2Model, OpenAIGPTModel])
def test_bare_models_random_upstream_gradient(cls, name, dropout, extras):
    kw = inputs(np.random.default_rng(1), 2, extras)
    check(_model(cls, dropout), kw)  # backward(d last_hidden_state) with a random d


def test_gpt2_scale_attn_by_inverse_layer_idx_and_no_scaling():
    kw = inputs(np.random.default_rng(2), 2, {"positions"})
    kw["labels"] = kw["input_ids"]
    check(_model(GPT2LMHeadModel, True, scale_attn_by_inverse_layer_idx=True, n_inner=12), kw)
    check(_model(GPT2LMHeadModel, False, scale_attn_weights=False, activation_function="gelu"), kw)


@pytest.mark.parametrize("name,dropout,extras", CASES)
def test_gpt2_sequence_classification(name, dropout, extras):
    kw = inputs(np.random.default_rng(3), 3, extras)
    kw["labels"] = np.array([0, 2, 1])
    check(_model(GPT2ForSequenceClassification, dropout, num_labels=3, pad_token_id=0), kw)


def test_gpt2_sequence_regression():
    kw = inputs(np.random.default_rng(4), 2, ())
    kw["labels"] = np.array([0.5, -1.25])
    check(_model(GPT2ForSequenceClassification, False, num_labels=1, pad_token_id=0), kw)


class TotalLoss(Module):
    """lm_coef * loss + mc_loss as one output, so gradcheck compares it with backward()."""

    def __init__(self, model, lm_coef):
        super().__init__()
        self.model, self.lm_coef = model, lm_coef

    def forward(self, **kw):
        out = self.model(**kw, lm_coef=self.lm_coef)
        return ModelOutput(loss=self.lm_coef * out.loss + out.mc_loss)

    def backward(self):
        self.model.backward()


@pytest.mark.parametrize("name,dropout,extras", CASES)
@pytest.mark.parametrize("cls", [GPT2DoubleHeadsModel, OpenAIGPTDoubleHeadsModel])
def test_double_heads(cls, name, dropout, extras):
    rng = np.random.default_rng(5)
    B, N = 2, 2
    flat = inputs(rng, B * N, extras)
    kw = {k: v.reshape(B, N, T) for k, v in flat.items()}
    kw["labels"] = np.where(kw["attention_mask"] == 1, kw["input_ids"], -100)
    kw["mc_token_ids"] = np.array([[3, 5], [5, 4]])
    kw["mc_labels"] = np.array([1, 0])
    # one score per choice: the summary bias shifts all N scores equally, so the softmax ignores it
    check(TotalLoss(_model(cls, dropout), lm_coef=0.7), kw, zero=["model.multiple_choice_head.summary.bias"])


def test_double_heads_backward_with_output_gradients():
    """backward(grad, mc_grad) against a random projection of both outputs."""
    model = _model(GPT2DoubleHeadsModel, False)
    rng = np.random.default_rng(6)
    flat = inputs(rng, 4, ())
    kw = {k: v.reshape(2, 2, T) for k, v in flat.items()}
    kw["mc_token_ids"] = np.array([[3, 5], [5, 4]])
    out = model(**kw)
    g, gm = rng.standard_normal(out.logits.shape), rng.standard_normal(out.mc_logits.shape)

    class Proj(Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, **k):
            o = self.model(**k)
            return ModelOutput(loss=np.sum(o.logits * g) + np.sum(o.mc_logits * gm))

        def backward(self):
            self.model.backward(g, mc_grad=gm)

    check(Proj(), kw)  # mc_grad is not a softmax gradient here, so the summary bias gets one
