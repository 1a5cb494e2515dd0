"""The models' shell and hooks: either key of a tied pair loads, configs are checked when built, one
problem_type loss for both families, and the core's hook points (inputs_embeds, per-layer past keys and
values, residual adapters) give the right numbers and gradients."""
import json

import numpy as np
import pytest

import numlm
from numlm.gradchecking import gradcheck
from numlm.io import save_safetensors
from numlm.nn import Module
from numlm.models import (BertConfig, BertForMaskedLM, BertForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification, GPT2LMHeadModel, OpenAIGPTConfig,
                          OpenAIGPTDoubleHeadsModel, OpenAIGPTLMHeadModel)

GPT = dict(vocab_size=29, n_positions=16, n_embd=8, n_layer=2, n_head=2, initializer_range=0.3)
BERT = dict(vocab_size=23, hidden_size=8, num_attention_heads=2, num_hidden_layers=2, intermediate_size=12,
            max_position_embeddings=16, initializer_range=0.3)


def nonzero(errors):
    """BERT's key bias has a structurally zero gradient (softmax ignores a shift of every score), so its
    relative error is noise over noise; every other entry is checked."""
    return {k: v for k, v in errors.items() if "key.bias" not in k}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------------------- tied pairs

@pytest.mark.parametrize("cls,cfg,kept,dropped", [
    # transformers' OpenAIGPTDoubleHeadsModel declares its tie the other way round: its checkpoints keep
    # lm_head.weight and drop transformer.tokens_embed.weight
    (OpenAIGPTDoubleHeadsModel, OpenAIGPTConfig(**GPT), "lm_head.weight", "transformer.tokens_embed.weight"),
    (OpenAIGPTLMHeadModel, OpenAIGPTConfig(**GPT), "lm_head.weight", "transformer.tokens_embed.weight"),
    (GPT2LMHeadModel, GPT2Config(**GPT), "lm_head.weight", "transformer.wte.weight"),
    (BertForMaskedLM, BertConfig(**BERT), "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
])
def test_either_key_of_a_tied_pair_loads(tmp_path, cls, cfg, kept, dropped):
    src = cls(cfg, seed=1, dtype="float64")
    state = src.state_dict()
    assert np.array_equal(state[kept], state[dropped])
    state = {k: v for k, v in state.items() if k != dropped and k not in set(src.tied) - {kept}}
    assert kept in state and dropped not in state
    save_safetensors(state, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "architectures": [cls.__name__]}))
    model = numlm.from_pretrained(tmp_path, dtype="float64")
    assert type(model) is cls
    for k, v in src.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[k], v, err_msg=k)
    fresh = cls(cfg, seed=2, dtype="float64")
    missing, unexpected = fresh.load_state_dict(state)
    assert missing == [] and unexpected == []
    np.testing.assert_array_equal(fresh.state_dict()[dropped], src.state_dict()[dropped])


# ---------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("make,match", [
    (lambda: GPT2Config(n_embd=7, n_head=2), "n_embd 7 is not a multiple of n_head 2"),
    (lambda: OpenAIGPTConfig(n_layer=0), "n_layer"),
    (lambda: GPT2Config(vocab_size=300, eos_token_id=300), "eos_token_id 300 must lie in"),
    (lambda: GPT2Config(vocab_size=300, bos_token_id=-1), "bos_token_id -1 must lie in"),
    (lambda: GPT2Config(vocab_size=300, pad_token_id=512), "pad_token_id 512 must lie in"),
    (lambda: OpenAIGPTConfig(vocab_size=30, pad_token_id=30), "pad_token_id 30 must lie in"),
    (lambda: BertConfig(vocab_size=30, pad_token_id=30), "pad_token_id 30 must lie in"),
    (lambda: GPT2Config(summary_type="max"), "summary_type"),
    (lambda: OpenAIGPTConfig(problem_type="ranking"), "problem_type"),
])
def test_configs_are_checked_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_gpt2_special_ids_default_to_50256_only_when_it_fits():
    assert GPT2Config().bos_token_id == GPT2Config().eos_token_id == 50256
    small = GPT2Config(vocab_size=300)
    assert small.bos_token_id is None and small.eos_token_id is None
    assert GPT2Config(vocab_size=300, eos_token_id=299).eos_token_id == 299


# ---------------------------------------------------------------------------------------- one loss selection

def test_gpt2_multi_label_is_bce_as_bert():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 29, (3, 6))
    y = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    gpt = GPT2ForSequenceClassification(GPT2Config(**GPT, num_labels=3, pad_token_id=0), seed=0, dtype="float64")
    out = gpt(ids, labels=y)
    assert gpt.config.problem_type == "multi_label_classification"
    s = 1 / (1 + np.exp(-out.logits))
    assert abs(out.loss - np.mean(-y * np.log(s) - (1 - y) * np.log(1 - s))) < 1e-14
    errors = gradcheck(gpt, dict(input_ids=ids, labels=y), max_entries=4)
    assert max(errors.values()) < 1e-6, errors
    bert = BertForSequenceClassification(BertConfig(**BERT, num_labels=3), seed=0, dtype="float64")
    bert(ids % 23, labels=y)
    assert bert.config.problem_type == gpt.config.problem_type


# ---------------------------------------------------------------------------------------- hooks

class LogitsOf(Module):
    """model(**inputs).logits as the output; backward returns the gradient the model leaves at a hook."""

    def __init__(self, model, grad_of):
        super().__init__()
        self.model, self.grad_of = model, grad_of

    def forward(self, **kw):
        return self.model(**kw).logits

    def backward(self, dlogits):
        self.model.backward(dlogits)
        return self.grad_of(self.model)


@pytest.mark.parametrize("family", ["gpt2", "openai-gpt", "bert"])
def test_inputs_embeds_equal_the_lookup_and_get_their_gradient(family):
    rng = np.random.default_rng(1)
    if family == "bert":
        model = BertForMaskedLM(BertConfig(**BERT), seed=3, dtype="float64")
        table, grad_of = model.bert.embeddings.word_embeddings, lambda m: m.bert.embeddings.inputs_embeds_grad
    else:
        cls, cfg = (GPT2LMHeadModel, GPT2Config) if family == "gpt2" else (OpenAIGPTLMHeadModel, OpenAIGPTConfig)
        model = cls(cfg(**GPT), seed=3, dtype="float64")
        table, grad_of = model.transformer.wte, lambda m: m.transformer.inputs_embeds_grad
    model.eval()
    ids = rng.integers(1, 20, (2, 5))
    embeds = table.params["weight"][ids].copy()
    np.testing.assert_allclose(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits, rtol=0, atol=1e-14)
    errors = nonzero(gradcheck(LogitsOf(model, grad_of), dict(inputs_embeds=embeds), max_entries=5))
    assert set(errors) > {"inputs_embeds"} and max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("cls,cfg", [(GPT2LMHeadModel, GPT2Config), (OpenAIGPTLMHeadModel, OpenAIGPTConfig)])
def test_past_keys_and_values_get_their_gradients(cls, cfg):
    """Prefix tuning's hook: per-layer (k, v) before the tokens' own, positions after them, the mask
    covering both; backward leaves d past in transformer.past_grads."""
    rng = np.random.default_rng(2)
    model = cls(cfg(**GPT), seed=4, dtype="float64").eval()
    B, H, n, D, T = 2, 2, 3, 4, 5
    past = tuple((rng.standard_normal((B, H, n, D)), rng.standard_normal((B, H, n, D))) for _ in range(2))
    mask = np.ones((B, n + T), dtype=np.int64)
    mask[1, n + 3:] = 0
    ids = rng.integers(0, 29, (B, T))
    flat = {f"past_{l}_{i}": past[l][i] for l in range(2) for i in range(2)}

    class WithPast(Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, past_0_0, past_0_1, past_1_0, past_1_1):
            kv = ((past_0_0, past_0_1), (past_1_0, past_1_1))
            return self.model(ids, attention_mask=mask, past_key_values=kv).logits

        def backward(self, dlogits):
            self.model.backward(dlogits)
            g = self.model.transformer.past_grads
            return g[0][0], g[0][1], g[1][0], g[1][1]

    errors = gradcheck(WithPast(), flat, max_entries=6)
    assert set(flat) < set(errors) and max(errors.values()) < 1e-6, errors


class ScaledTanhAdapter(Module):
    """A stand-in bottleneck: y = ln(x + h + 0.5 tanh(h W)) (ln optional), with backward (dh, dx)."""

    def __init__(self, C, seed):
        super().__init__()
        self.add_param("weight", np.random.default_rng(seed).standard_normal((C, C)) * 0.3)

    def forward(self, h, x, ln):
        t = np.tanh(h @ self.params["weight"])
        self.cache = (h, t, ln)
        s = x + h + 0.5 * t
        return s if ln is None else ln(s)

    def backward(self, dy):
        h, t, ln = self.cache
        ds = dy if ln is None else ln.backward(dy)
        dz = 0.5 * ds * (1 - t * t)
        self.grads["weight"] += h.reshape(-1, h.shape[-1]).T @ dz.reshape(-1, dz.shape[-1])
        return ds + dz @ self.params["weight"].T, ds


@pytest.mark.parametrize("family", ["gpt2", "openai-gpt", "bert"])
def test_residual_adapters_hook(family):
    rng = np.random.default_rng(3)
    if family == "bert":
        model = BertForMaskedLM(BertConfig(**BERT), seed=5, dtype="float64")
        sites = [(m, "adapters") for layer in model.bert.encoder.layer for m in (layer.attention.output, layer.output)]
    else:
        cls, cfg = (GPT2LMHeadModel, GPT2Config) if family == "gpt2" else (OpenAIGPTLMHeadModel, OpenAIGPTConfig)
        model = cls(cfg(**GPT), seed=5, dtype="float64")
        sites = [(b, n) for b in model.transformer.h for n in ("attention_adapters", "output_adapters")]
    model.eval()
    ids = rng.integers(1, 20, (2, 5))
    plain = model(ids).logits
    for i, (m, name) in enumerate(sites):
        setattr(m, name, ScaledTanhAdapter(8, i))
    out = model(ids).logits
    assert rel(out, plain) > 1e-3  # the adapters change the output
    errors = nonzero(gradcheck(LogitsOf(model, lambda m: None), dict(input_ids=ids), max_entries=4))
    adapter_keys = [k for k in errors if k.endswith("adapters.weight")]
    assert len(adapter_keys) == len(sites) and max(errors.values()) < 1e-6, errors
