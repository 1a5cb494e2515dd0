"""Freezing: a frozen parameter has no gradient array, its layer computes no gradient for it, the
gradients of the other parameters are unchanged, and training leaves it bit-identical."""
import numpy as np
import pytest

import numlm.nn.layers as layers
from numlm import gradcheck
from numlm.models.bert import BertConfig, BertForSequenceClassification, BertForMaskedLM
from numlm.models.gpt import GPT2Config, GPT2LMHeadModel
from numlm.nn import Linear, Embedding, LayerNorm
from numlm.ops import linear_forward, linear_backward
from numlm.optim import AdamW, clip_grad_norm
from numlm.train import Trainer, TrainConfig

V = 30


def tiny_bert(cls=BertForSequenceClassification, seed=0, dtype="float32", **kw):
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    return cls(cfg, seed=seed, dtype=dtype)


def tiny_gpt(seed=0, dtype="float32"):
    cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg, seed=seed).astype(dtype)


def batch(seed=0, B=3, T=6, labels=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, (B, T))
    am = np.ones((B, T), np.int64)
    am[0, 4:] = 0
    return dict(input_ids=ids, attention_mask=am, labels=rng.integers(0, labels, B))


def grads_of(model, b):
    model.zero_grad()
    model(**b)
    model.backward()
    return {k: v.copy() for k, v in model.grad_arrays().items()}


def test_linear_backward_skips_the_frozen_gradients():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 5)), rng.standard_normal(5)
    dy = rng.standard_normal((4, 5))
    _, cache = linear_forward(x, w, b)
    dx, dw, db = linear_backward(dy, cache, need_dw=False, need_db=False)
    assert dw is None and db is None
    np.testing.assert_allclose(dx, dy @ w.T, rtol=1e-14)
    dx2, dw2, db2 = linear_backward(dy, cache, need_dw=False)
    assert dw2 is None
    np.testing.assert_allclose(db2, dy.sum(0), rtol=1e-14)


def test_frozen_layers_compute_no_weight_gradient(monkeypatch):
    calls = []
    fwd, real = layers.OPS["linear"]
    monkeypatch.setitem(layers.OPS, "linear", (fwd, lambda dy, c, dw=True, db=True: calls.append((dw, db)) or real(dy, c, dw, db)))
    monkeypatch.setitem(layers.OPS, "embedding", (layers.OPS["embedding"][0],
                                                  lambda *a: pytest.fail("frozen embedding got a gradient")))
    lin = Linear(3, 4, dtype=np.float64).freeze()
    emb = Embedding(5, 3, dtype=np.float64).freeze()
    ln = LayerNorm(3, dtype=np.float64).freeze(["weight"])
    lin.params["weight"][...] = np.arange(12).reshape(3, 4) / 7
    ids = np.array([[0, 2, 4]])
    y = lin(ln(emb(ids)))
    dy = np.ones_like(y)
    dx = ln.backward(lin.backward(dy))
    emb.backward(dx)
    assert calls == [(False, False)]
    assert lin.grads == {} and emb.grads == {} and list(ln.grads) == ["bias"]
    assert np.abs(ln.grads["bias"]).sum() > 0


def test_freeze_leaves_other_gradients_exactly_unchanged():
    b = batch()
    full = grads_of(tiny_bert(), b)
    model = tiny_bert()
    model.freeze([k for k in model.parameters() if k.startswith(("bert.embeddings", "bert.encoder.layer.0"))])
    part = grads_of(model, b)
    assert set(part) == {k for k in full if not k.startswith(("bert.embeddings", "bert.encoder.layer.0"))}
    assert len(part) < len(full)
    for k in part:
        assert np.array_equal(part[k], full[k]), k
    assert set(model.trainable_parameters()) == set(part)
    assert model.needs_backward() and not model.bert.embeddings.needs_backward()
    # transformers-keyed gradients leave frozen tensors out
    assert set(model.gradients()) == {k for k in model.state_dict() if k in part}


@pytest.mark.parametrize("make", [lambda: tiny_bert(BertForMaskedLM), tiny_gpt])
def test_frozen_tied_token_table(make):
    """The LM head reuses the token table: freezing the table stops its gradient from both uses."""
    b = batch(labels=V)
    b["labels"] = np.random.default_rng(5).integers(0, V, b["input_ids"].shape)
    full = grads_of(make(), b)
    model = make()
    table = [k for k in model.parameters() if k.endswith(("word_embeddings.weight", "wte.weight"))]
    assert len(table) == 1
    model.freeze(table)
    part = grads_of(model, b)
    assert table[0] not in part and set(part) == set(full) - set(table)
    for k in part:
        assert np.array_equal(part[k], full[k]), k


def test_training_leaves_frozen_tensors_bit_identical(tmp_path):
    model = tiny_bert()
    frozen = [k for k in model.parameters() if k.startswith("bert.encoder.layer.0") or "embeddings" in k]
    model.freeze(frozen)
    before = {k: v.copy() for k, v in model.parameters().items()}

    class Stream:
        def __init__(self):
            self.i = 0

        def next_batch(self):
            self.i += 1
            return {k: v for k, v in batch(self.i).items()}

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, s):
            self.i = s["i"]

    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=4, lr=1e-2, warmup=1, save_every=10, eval_every=10,
                      log_every=1, progress=False, weight_decay=0.1)
    Trainer(model, Stream(), cfg, optimizer=AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)).run()
    after = model.parameters()
    for k in before:
        if k in frozen:
            assert np.array_equal(before[k], after[k]), k
        else:
            assert not np.array_equal(before[k], after[k]), k


def test_optimizer_over_trainable_parameters_only():
    model = tiny_bert()
    model.freeze([k for k in model.parameters() if not k.startswith("classifier")])
    opt = AdamW(model.trainable_parameters(), lr=0.1, weight_decay=0.5)
    assert set(opt.params) == {"classifier.weight", "classifier.bias"}
    g = grads_of(model, batch())
    clip_grad_norm(g, 1.0)
    w0 = model.parameters()["classifier.weight"].copy()
    opt.step(g)
    assert not np.array_equal(w0, model.parameters()["classifier.weight"])


def test_gradcheck_checks_the_trainable_parameters_of_a_frozen_model():
    model = tiny_bert(dtype="float64", initializer_range=0.5)  # large weights: gradients well above noise
    model.freeze([k for k in model.parameters() if k.startswith("bert.embeddings")])
    b = batch()
    errs = gradcheck(model, b, max_entries=3, eps=1e-5)
    params = {k[len("param:"):] for k in errs}
    assert params == set(model.trainable_parameters()) and not any("embeddings" in k for k in params)
    errs = {k: v for k, v in errs.items() if "key.bias" not in k}  # structurally zero gradient
    assert max(errs.values()) < 1e-7, errs


def test_unfreeze_astype_and_bad_names():
    model = tiny_bert()
    model.bert.embeddings.freeze()
    assert not model.bert.embeddings.needs_backward()
    model.astype("float64")
    assert not model.bert.embeddings.needs_backward()  # casting keeps a frozen parameter frozen
    model.bert.embeddings.unfreeze(["LayerNorm.weight"])
    g = model.bert.embeddings.LayerNorm.grads["weight"]
    assert g.dtype == np.float64 and not g.any()
    assert set(model.bert.embeddings.trainable_parameters()) == {"LayerNorm.weight"}
    with pytest.raises(ValueError, match="no parameter named 'bert.nope'"):
        model.freeze(["bert.nope"])
    model.unfreeze()
    assert set(model.trainable_parameters()) == set(model.parameters())


@pytest.mark.parametrize("family", ["bert", "gpt"])
@pytest.mark.parametrize("train_from", [1, 2])  # layer 1 and above, or only the head
def test_backward_stops_below_the_lowest_trainable_layer(family, train_from, monkeypatch):
    """Below the lowest trainable layer nothing needs a gradient: those layers' backward never runs,
    and the trainable gradients equal those of the backward through every layer."""
    model = tiny_bert(dtype="float64") if family == "bert" else tiny_gpt(dtype="float64")
    b = batch() if family == "bert" else {k: v for k, v in batch().items() if k != "labels"} | {"labels": batch()["input_ids"]}
    layers_ = model.bert.encoder.layer if family == "bert" else model.transformer.h
    prefix = "bert.encoder.layer" if family == "bert" else "transformer.h"
    head = [n for n in model.parameters() if not n.startswith(("bert.", "transformer."))]
    keep = [n for n in model.parameters() if any(n.startswith(f"{prefix}.{i}.") for i in range(train_from, 2))]
    if family == "gpt":  # GPT-2's final LayerNorm sits above the blocks; its LM head is tied to wte
        keep += [n for n in model.parameters() if n.startswith("transformer.ln_f.")]
        head = []
    model.freeze([n for n in model.parameters() if n not in keep + head])
    everything = tiny_bert(dtype="float64") if family == "bert" else tiny_gpt(dtype="float64")
    reference = grads_of(everything, b)
    ran = []
    for i, layer in enumerate(layers_):
        real = layer.backward
        monkeypatch.setattr(layer, "backward", lambda d, real=real, i=i: ran.append(i) or real(d))
    got = grads_of(model, b)
    assert ran == list(reversed(range(train_from, 2)))
    assert sorted(got) == sorted(keep + head) and got
    for k, g in got.items():
        np.testing.assert_allclose(g, reference[k], rtol=1e-12, atol=1e-15)
