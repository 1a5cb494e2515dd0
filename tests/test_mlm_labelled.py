"""BertForPreTraining in training runs its MLM head only at the labelled positions: the same loss and
the same gradients as the head on every position, the logits of those rows only; eval keeps (B, T, V)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numlm import BertForPreTraining, gradcheck

CFG = dict(vocab_size=23, hidden_size=8, num_attention_heads=2, num_hidden_layers=2, intermediate_size=12,
           max_position_embeddings=16, type_vocab_size=2, initializer_range=0.5,
           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def batch(seed, B, T, frac):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 23, (B, T))
    labels = np.where(rng.random((B, T)) < frac, rng.integers(0, 23, (B, T)), -100)
    mask = np.ones((B, T), dtype=np.int64)
    mask[0, T - 1:] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=rng.integers(0, 2, (B, T)), labels=labels,
                next_sentence_label=rng.integers(0, 2, B))


def run(inputs, labelled_only, train=True):
    m = BertForPreTraining(CFG, seed=1, dtype="float64").train(train)
    m.mlm_on_labelled_only = labelled_only
    out = m(**inputs)
    m.backward()
    return out, m.gradients()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 3), T=st.integers(2, 7), frac=st.sampled_from([0.0, 0.3, 1.0]))
def test_same_loss_and_gradients_as_the_head_on_every_position(seed, B, T, frac):
    inputs = batch(seed, B, T, frac)
    part, g_part = run(inputs, True)
    full, g_full = run(inputs, False)
    rows = np.flatnonzero(inputs["labels"].reshape(-1) != -100)
    np.testing.assert_array_equal(part.mlm_positions, rows)
    V = CFG["vocab_size"]
    assert part.prediction_logits.shape == (len(rows), V) and full.prediction_logits.shape == (B, T, V)
    np.testing.assert_allclose(part.prediction_logits, full.prediction_logits.reshape(-1, V)[rows],
                               rtol=1e-12, atol=1e-12)
    assert abs(part.loss - full.loss) <= 1e-12 * max(1.0, abs(full.loss))
    top = max(np.abs(g).max(initial=0.0) for g in g_full.values())  # rounding is relative to this
    for k, g in g_full.items():  # (a key bias's gradient is 0 up to rounding: softmax ignores it)
        scale = max(np.abs(g).max(initial=0.0), 1e-6 * top)
        assert np.abs(g_part[k] - g).max(initial=0.0) <= 1e-10 * scale, k


def test_eval_and_unlabelled_forwards_keep_every_position():
    inputs = batch(0, 2, 5, 0.3)
    out, _ = run(inputs, True, train=False)
    assert out.prediction_logits.shape == (2, 5, 23) and out.get("mlm_positions") is None
    m = BertForPreTraining(CFG, seed=1, dtype="float64").train()
    out = m(inputs["input_ids"])  # no labels: fill-mask's forward
    assert out.prediction_logits.shape == (2, 5, 23)


def test_gradcheck_in_training_with_labelled_positions_only():
    m = BertForPreTraining(CFG, seed=2, dtype="float64").train()
    assert m.mlm_on_labelled_only
    inputs = batch(3, 2, 5, 0.4)
    errors = gradcheck(m, inputs, max_entries=6, seed=0)
    assert any(k.startswith("param:cls.predictions") for k in errors)
    # a key bias's gradient is 0 (softmax ignores a constant per row): its relative error is noise
    assert max(v for k, v in errors.items() if not k.endswith("key.bias")) < 1e-7, errors


def test_backward_with_a_given_gradient_of_the_labelled_rows():
    inputs = batch(4, 2, 6, 0.5)
    m = BertForPreTraining(CFG, seed=1, dtype="float64").train()
    out = m(**inputs)
    d = np.random.default_rng(0).standard_normal(out.prediction_logits.shape)
    m.zero_grad()
    m.backward(d)
    g_part = m.gradients()
    full = BertForPreTraining(CFG, seed=1, dtype="float64").train()
    full.mlm_on_labelled_only = False
    o = full(**inputs)
    dfull = np.zeros(o.prediction_logits.shape).reshape(-1, 23)
    dfull[out.mlm_positions] = d
    full.zero_grad()
    full.backward(dfull.reshape(o.prediction_logits.shape))
    for k, g in full.gradients().items():
        np.testing.assert_allclose(g_part[k], g, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(g).max()))
    with pytest.raises(ValueError):
        m.backward(np.zeros((2, 6, 23)))
