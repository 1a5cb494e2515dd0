"""Token classification (numlm.tag, predict_tokens) against transformers' token-classification pipeline:
tests/fixtures/pipelines/tokcls-{bert,roberta}-tiny hold its outputs (tests/fixtures/make/pipeline_tokcls.py)
for every aggregation strategy, from a WordPiece tokenizer ("##" subwords) and a byte-level BPE (the
pipeline's space heuristic), in float32 and float64."""
import json
import warnings

import numpy as np
import pytest

import numlm
from numlm import peft
from numlm.data.tokenizer import Tokenizer
from numlm.inference import _encodings, predict_tokens, tag

from conftest import FIXTURES

PIPELINES = FIXTURES / "pipelines"
FAMILIES = ("bert", "roberta")
STRATEGIES = ("none", "simple", "first", "average", "max")
TOL = {"float32": 1e-5, "float64": 1e-9}


def load(family, dtype="float32"):
    folder = PIPELINES / f"tokcls-{family}-tiny"
    ref = json.loads((folder / "pipeline.json").read_text())
    return numlm.from_pretrained(folder, dtype=dtype), Tokenizer.from_dir(folder), ref


def without_scores(rows):
    return [[{k: v for k, v in e.items() if k != "score"} for e in row] for row in rows]


def assert_same_entities(got, want, tol):
    """labels, words, index, start and end exactly; scores to tol"""
    assert without_scores(got) == without_scores(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose([e["score"] for e in g], [e["score"] for e in w], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tag_is_the_pipeline(family, dtype):
    """Every strategy, with ignore_labels ["O"] and [], all texts as one padded batch."""
    model, tok, ref = load(family, dtype)
    for strategy in STRATEGIES:
        for ignore, want in ref["results"][dtype][strategy].items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # RoBERTa's words are guessed (tested below)
                got = tag(model, tok, ref["texts"], strategy, [ignore] if ignore else [])
            assert len(got) == len(want) == len(ref["texts"])
            assert_same_entities(got, want, TOL[dtype])
            assert all(type(e["score"]) is float for row in got for e in row)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fixture_covers_what_it_should(family):
    """The references exercise the paths they are meant to: every label predicted, words of several
    tokens, an unknown token (BERT), a text longer than the model's positions, and strategies that
    disagree."""
    model, tok, ref = load(family)
    res = ref["results"]["float32"]
    assert {e["entity"] for row in res["none"][""] for e in row} == set(ref["labels"])
    long = ref["texts"][-1]
    assert len(tok.encode(long)) > ref["model_max_length"] == len(ref["tokens"]["float32"][-1]["input_ids"])
    first, average = (without_scores(res[s][""]) for s in ("first", "average"))
    assert first != average and without_scores(res["simple"][""]) != first
    if family == "bert":
        none = [e for row in res["none"][""] for e in row]
        assert any(e["word"].startswith("##") for e in none)
        assert tok.unk_id in [i for row in ref["tokens"]["float32"] for i in row["input_ids"]]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_predict_tokens_is_softmax_of_the_model(family, dtype):
    """The encodings are the transformers tokenizer's (ids, offsets, specials, truncated to the model's
    positions) and predict_tokens' probs its softmax per token, on one padded batch."""
    model, tok, ref = load(family, dtype)
    rows = ref["tokens"][dtype]
    encs = _encodings(tok, ref["texts"], ref["model_max_length"])
    for enc, row in zip(encs, rows):
        assert enc.ids == row["input_ids"] and enc.special_tokens_mask == row["special_tokens_mask"]
        assert [list(o) for o in enc.offsets] == row["offsets"]
    T = max(len(r["input_ids"]) for r in rows)
    ids = np.full((len(rows), T), tok.pad_id, np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r["input_ids"])], mask[b, :len(r["input_ids"])] = r["input_ids"], 1
    out = predict_tokens(model, ids, mask)
    assert out.probs.dtype == np.dtype(dtype) and out.probs.shape == (len(rows), T, len(ref["labels"]))
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        np.testing.assert_allclose(out.probs[b, :n], r["probs"], rtol=TOL[dtype], atol=TOL[dtype])
        assert out.label_names[b][:n] == [ref["labels"][int(np.argmax(p))] for p in r["probs"]]


def test_words_are_guessed_without_a_subword_prefix():
    """A byte-level BPE has no "##": first / average / max warn that words are guessed from spaces (the
    pipeline warns too); WordPiece does not warn."""
    model, tok, ref = load("roberta")
    with pytest.warns(UserWarning, match="no continuing_subword_prefix"):
        tag(model, tok, ref["texts"][0], "first")
    bert, wp, _ = load("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tag(bert, wp, ref["texts"][0], "average")
        tag(model, tok, ref["texts"][0], "simple")


def test_one_text_many_texts_and_none():
    """A str gives its list of entities, a list one list per text (padding the batch changes a row's
    numbers only by rounding)."""
    model, tok, ref = load("bert", "float64")
    many = tag(model, tok, ref["texts"][:2], "simple")
    assert_same_entities([tag(model, tok, ref["texts"][1], "simple")], many[1:], 1e-12)
    assert tag(model, tok, [], "simple") == []
    assert tag(model, tok, ref["texts"][:2], "SIMPLE") == many  # the pipeline takes any case
    assert tag(model, tok, ref["texts"][:2], "simple", ignore_labels=None) == many  # None: the default ["O"]


def test_eval_mode_kept_and_used():
    """A model in training mode answers as in eval mode (no dropout) and is left training."""
    model, tok, ref = load("bert", "float64")
    want = tag(model.eval(), tok, ref["texts"], "max")
    model.train()
    assert tag(model, tok, ref["texts"], "max") == want
    assert model.training and all(m.training for _, m in model.modules())


def test_a_lora_model_tags_as_its_merged_weights():
    """A PeftModel with LoRA: the same entities as the LoRA merged into the weights, different from the
    base's; with B = 0 (peft's init) the base's exactly."""
    base, tok, ref = load("bert", "float64")
    texts = ref["texts"]
    lora = peft.get_peft_model(load("bert", "float64")[0],
                               peft.LoraConfig(r=4, lora_alpha=16, task_type="TOKEN_CLS", init_lora_weights=False),
                               seed=3)
    got = tag(lora, tok, texts, "none", [])
    assert got == tag(lora, tok, texts, "none", [])
    merged = tag(lora.merge_and_unload(), tok, texts, "none", [])
    assert_same_entities(got, merged, 1e-9)
    before = [e["score"] for row in tag(base, tok, texts, "none", []) for e in row]
    assert not np.allclose([e["score"] for row in got for e in row], before, atol=1e-3)
    zero = peft.get_peft_model(load("bert", "float64")[0], peft.LoraConfig(r=4, task_type="TOKEN_CLS"), seed=3)
    for strategy in STRATEGIES:
        assert tag(zero, tok, texts, strategy) == tag(base, tok, texts, strategy)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", [peft.PromptTuningConfig, peft.PrefixTuningConfig])
def test_virtual_tokens_take_positions(config, family):
    """Prompt and prefix tuning: the outputs are the text's tokens only (prompt tuning's virtual outputs
    dropped), and the virtual tokens take positions, so a long text is cut shorter (the position table
    would overflow otherwise)."""
    base, tok, ref = load(family, "float64")
    n = 3
    prompt = peft.get_peft_model(base, config(num_virtual_tokens=n, task_type="TOKEN_CLS"), seed=1)
    ids = np.array([tok.encode("John Smith lives in New York.")])
    out = predict_tokens(prompt, ids)
    assert out.probs.shape == (1, ids.shape[1], len(ref["labels"]))
    long = tag(prompt, tok, ref["texts"][-1], "none", [])
    assert [e["index"] for e in long] == list(range(1, ref["model_max_length"] - n - 1))
    assert tag(prompt, tok, ref["texts"][0], "none", []) != tag(base, tok, ref["texts"][0], "none", [])


def hand_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    e = np.array([np.exp(v - max(row)) for v in row])
    return e / e.sum()


def test_distilbert_by_hand():
    """DistilBERT (no token types): each token's label and score are those of the softmax of the
    model's own logits on the text alone."""
    _, tok, ref = load("bert")
    tok.model_max_length = None  # the fixture's 40 lifted: the texts run whole in the model's 64 positions
    cfg = numlm.DistilBertConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=24,
                                 max_position_embeddings=64, num_labels=3)
    model = numlm.DistilBertForTokenClassification(cfg, seed=4, dtype="float64")
    for text in ref["texts"][:4]:
        ids = tok.encode(text)
        logits = model.eval()(np.array([ids])).logits[0]
        want = []
        for t, i in enumerate(ids[1:-1], 1):
            p = hand_softmax(logits[t])
            k = max(range(3), key=lambda j: p[j])
            want.append((f"LABEL_{k}", t, tok.id_to_token(i) if i != tok.unk_id else None, p[k]))
        got = tag(model, tok, text, "none", [])
        assert [(e["entity"], e["index"]) for e in got] == [(w[0], w[1]) for w in want]
        assert all(w[2] is None or e["word"] == w[2] for e, w in zip(got, want))
        np.testing.assert_allclose([e["score"] for e in got], [w[3] for w in want], rtol=1e-12)


def test_refusals():
    model, tok, ref = load("bert")
    seqcls = numlm.BertForSequenceClassification(numlm.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=40), seed=0)
    cases = [((seqcls, tok, "John lives here"), {}, "BertForSequenceClassification is not a token-classification"),
             ((model, tok, ""), {}, r"texts\[0\] is empty"),
             ((model, tok, ["fine", "  \n "]), {}, r"texts\[1\] is empty"),
             ((model, tok, "John"), {"aggregation_strategy": "mean"}, "aggregation_strategy must be one of"),
             ((model, tok, "John"), {"aggregation_strategy": None}, "aggregation_strategy must be one of"),
             ((model, tok, ["John", 3]), {}, "texts must be a str or a sequence of str"),
             ((model, tok, 3), {}, "texts must be a str or a sequence of str"),
             ((model, tok, "John"), {"ignore_labels": "O"}, "ignore_labels must be a list of label names"),
             ((model, tok, "John"), {"ignore_labels": 0}, "ignore_labels must be a list of label names"),
             ((model, tok, "John"), {"ignore_labels": ["O", None]}, "ignore_labels must be a list of label names"),
             ((model, tok.backend, "John"), {}, "tokenizer must be a numlm.data.Tokenizer")]
    for args, kw, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            tag(*args, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a token-classification model"):
        predict_tokens(seqcls, [[2, 7, 3]])


def test_texts_are_cut_to_the_tokenizers_model_max_length():
    """as the pipeline cuts them (truncation to model_max_length, 16 here, below the model's 40 positions):
    the entities are those of the first 16 tokens' forward, [CLS] and [SEP] among them"""
    model, tok, ref = load("bert")
    tok.model_max_length = 16
    text = max(ref["texts"], key=len)
    got = tag(model, tok, text, "none", [])
    ids = tok.encode(text)[:15] + [tok.sep_id]
    probs = predict_tokens(model, np.array([ids])).probs[0]
    assert [e["index"] for e in got] == list(range(1, 15))
    np.testing.assert_allclose([e["score"] for e in got], probs[1:15].max(-1), rtol=1e-6)
    tok.model_max_length = None
    assert len(tag(model, tok, text, "none", [])) > 14
