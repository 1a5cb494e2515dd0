"""numlm.no_grad(): forwards keep no caches, give bit-identical outputs, and a backward after one is a
ValueError; gradient arrays take no memory until a backward writes them."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import numlm
from numlm.kernels import set_numba
from numlm.models import (BertConfig, BertForPreTraining, BertForSequenceClassification, BertModel, GPT2Config,
                          GPT2DoubleHeadsModel, GPT2LMHeadModel, GPT2Model, OpenAIGPTConfig, OpenAIGPTLMHeadModel)
from numlm.nn import Linear, grad_enabled, no_grad

GPT = dict(vocab_size=29, n_positions=16, n_embd=8, n_layer=2, n_head=2, initializer_range=0.3)
BERT = dict(vocab_size=23, hidden_size=8, num_attention_heads=2, num_hidden_layers=2, intermediate_size=12,
            max_position_embeddings=16, initializer_range=0.3)
MODELS = [(BertModel, BertConfig(**BERT)), (BertForPreTraining, BertConfig(**BERT)),
          (BertForSequenceClassification, BertConfig(**BERT)), (GPT2LMHeadModel, GPT2Config(**GPT)),
          (GPT2DoubleHeadsModel, GPT2Config(**GPT)), (OpenAIGPTLMHeadModel, OpenAIGPTConfig(**GPT))]


@pytest.fixture(params=[True, False], ids=["numba", "numpy"])
def path(request):
    previous = set_numba(request.param)
    yield request.param
    set_numba(previous)


def inputs(cls, seed, B=2, T=7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 20, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[0, T - 2:] = 0  # padding in one row
    kw = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    if cls is BertForPreTraining:
        kw.update(labels=np.where(rng.random((B, T)) < 0.4, ids, -100), next_sentence_label=rng.integers(0, 2, B))
    elif cls is BertForSequenceClassification:
        kw.update(labels=rng.integers(0, 2, B))
    elif cls is GPT2DoubleHeadsModel:
        kw = dict(input_ids=ids[:, None], mc_token_ids=np.array([[4], [6]]), labels=ids[:, None],
                  mc_labels=np.array([0, 0]))
    elif cls is not BertModel:
        kw.update(labels=ids)
    return kw


def arrays(out):
    """Every array of a ModelOutput, flattened in a fixed order."""
    flat = []
    for k in sorted(out):
        v = out[k]
        for a in (v if isinstance(v, tuple) else (v,)):
            flat.append((k, np.asarray(a)))
    return flat


def cached_bytes(model):
    """Bytes of the arrays the model's modules keep in their caches."""
    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if isinstance(x, np.ndarray):
            if id(x) not in seen:
                seen.add(id(x))
                total += x.nbytes
        elif isinstance(x, (tuple, list)):
            for y in x:
                walk(y)
    for _, m in model.modules():
        walk(m.cache)
    return total


@pytest.mark.parametrize("cls,cfg", MODELS, ids=[c.__name__ for c, _ in MODELS])
def test_no_grad_outputs_bit_identical_and_no_caches(path, cls, cfg):
    model = cls(cfg, seed=3, dtype="float64").eval()
    kw = inputs(cls, 4)
    ref = model(**kw)
    assert cached_bytes(model) > 0
    with no_grad():
        out = model(**kw)
    assert cached_bytes(model) == 0
    assert [k for k, _ in arrays(out)] == [k for k, _ in arrays(ref)]
    for (k, a), (_, b) in zip(arrays(out), arrays(ref)):
        assert np.array_equal(a, b), k


@pytest.mark.parametrize("cls,cfg", MODELS, ids=[c.__name__ for c, _ in MODELS])
def test_backward_after_no_grad_forward_is_a_value_error(cls, cfg):
    model = cls(cfg, seed=3, dtype="float64").eval()
    kw = inputs(cls, 5)
    out = model(**kw)
    grad = None if out.loss is not None else np.ones_like(out.last_hidden_state)
    model.backward(grad)
    ref = {k: v.copy() for k, v in model.grad_arrays().items()}
    model.zero_grad()
    with no_grad():
        model(**kw)
    with pytest.raises(ValueError, match=r"numlm\.no_grad\(\)"):
        model.backward(grad)
    assert all(not g.any() for g in model.grad_arrays().values())  # nothing half-accumulated
    model(**kw)  # a forward outside no_grad differentiates again, to the same gradients
    model.backward(grad)
    for k, g in model.grad_arrays().items():
        assert np.array_equal(g, ref[k]), k


def test_layer_backward_after_no_grad_forward_names_the_layer():
    lin = Linear(3, 2)
    with no_grad():
        lin(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"Linear\.backward: the forward ran under numlm\.no_grad\(\)"):
        lin.backward(np.ones((4, 2), np.float32))


def test_no_grad_nests_and_restores_on_error():
    assert grad_enabled()
    with no_grad():
        assert not grad_enabled()
        with no_grad():
            assert not grad_enabled()
        assert not grad_enabled()
    assert grad_enabled()
    with pytest.raises(RuntimeError):
        with numlm.no_grad():
            raise RuntimeError
    assert grad_enabled()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 8), new=st.integers(1, 4))
def test_generate_under_no_grad_equals_stepwise_forward(seed, T, new):
    """generate() runs its steps under no_grad: the greedy tokens equal argmax of full forwards."""
    model = GPT2LMHeadModel(GPT2Config(**GPT), seed=seed % 1000, dtype="float64").eval()
    ids = np.random.default_rng(seed).integers(0, 29, (1, T))
    seqs = numlm.generate(model, ids, max_new_tokens=new, eos_token_id=[])
    want = ids
    for _ in range(new):
        logits = model(want).logits[:, -1]
        want = np.concatenate([want, logits.argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(seqs, want)
    assert cached_bytes(model) > 0  # the last full forward above kept its caches; generate's did not
    numlm.generate(model, ids, max_new_tokens=1, eos_token_id=[])
    assert cached_bytes(model) == 0


def test_gradient_arrays_are_zero_until_written():
    """Gradients start as zeros from calloc (no memory until written), and still read as zeros."""
    model = GPT2LMHeadModel(GPT2Config(**GPT), seed=0, dtype="float32")
    grads = model.grad_arrays()
    assert set(grads) == set(model.parameters())
    for k, g in grads.items():
        assert g.shape == model.parameters()[k].shape and g.dtype == np.float32 and not g.any(), k
    model.astype("float64")
    assert all(g.dtype == np.float64 and not g.any() for g in model.grad_arrays().values())


def test_attention_cores_keep_only_what_the_caller_asked_for():
    """No layer's keys, values or probabilities outlive a forward unless use_cache / output_attentions
    asked for them; asked, they are the outputs the model returns."""
    model = GPT2LMHeadModel(GPT2Config(**GPT))
    ids = np.arange(6).reshape(1, 6)
    cores = [block.attn.core for block in model.transformer.h.items]
    with no_grad():
        model(ids)
        assert all(c.present is None and c.probs is None for c in cores)
        out = model(ids, use_cache=True, output_attentions=True)
    assert all(c.present is p and c.probs is a for c, p, a in zip(cores, out.past_key_values, out.attentions))
    bert = BertModel(BertConfig(**BERT))
    bert(ids)  # a training forward: the probabilities stay in the cache only
    assert all(layer.attention.self.core.probs is None for layer in bert.encoder.layer.items)


def test_flags_given_by_position_count_as_by_keyword():
    """use_cache and output_attentions passed positionally decide what the cores keep, as by keyword;
    left out, they take forward's defaults (False)."""
    model = GPT2LMHeadModel(GPT2Config(**GPT))
    ids = np.arange(6).reshape(1, 6)
    cores = [block.attn.core for block in model.transformer.h.items]
    with no_grad():
        # input_ids, attention_mask, token_type_ids, position_ids, labels, past_key_values, use_cache
        out = model(ids, None, None, None, None, None, True)
        assert all(c.present is p and c.probs is None for c, p in zip(cores, out.past_key_values))
        out = model(ids, None, None, None, None, None, False, False, True)  # output_attentions after hidden states
        assert all(c.present is None and c.probs is a for c, a in zip(cores, out.attentions))
        model(ids, None, None, None, None, None, False, False, False)
        assert all(c.present is None and c.probs is None for c in cores)
        out = model(ids, None, None, None, None, None, True, output_attentions=True)  # mixed
        assert all(c.present is p and c.probs is a for c, p, a in zip(cores, out.past_key_values, out.attentions))


def test_a_model_call_frees_the_last_forwards_outputs_first():
    """The last forward's outputs go before the new forward's math makes its own (once its inputs are
    checked: a refused call keeps them for backward())."""
    seen = []

    class ProbeCore(GPT2Model):
        def decode(self, x):  # where the new forward's math starts
            seen.append(model._last)
            return super().decode(x)

    class Probe(GPT2LMHeadModel):
        backbone = ProbeCore

    model = Probe(GPT2Config(**GPT))
    ids = np.arange(6).reshape(1, 6)
    model(input_ids=ids, labels=ids)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, labels=ids[:, 1:])
    assert model._last is not None
    model(input_ids=ids, labels=ids)
    assert seen == [None] * 2
    model.backward()  # the new forward's outputs serve the backward
