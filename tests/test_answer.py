"""Extractive question answering (numlm.answer, answer_spans, best_spans) against transformers 4.57's
question-answering pipeline (tests/fixtures/pipelines/qa-bert-tiny, made by
tests/fixtures/make/pipeline_qa.py), and against a span search written out by hand here."""
import json

import numpy as np
import pytest

import numlm
from numlm import peft
from numlm.data.tokenizer import Tokenizer
from numlm.inference import answer, answer_spans, best_spans, qa_windows

from conftest import FIXTURES

PIPELINES = FIXTURES / "pipelines"
QA = PIPELINES / "qa-bert-tiny"
CASES = json.loads((QA / "answers.json").read_text())["cases"]
SHORT = CASES[0]["context"]
LONG = CASES[4]["context"]
REFERENCE = [(name, dtype, i) for name in ("qa-bert-tiny", "qa-roberta-tiny") for dtype in ("float32", "float64")
             for i in range(len(CASES))]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(QA)


@pytest.fixture(scope="module")
def models():
    return {dt: numlm.from_pretrained(QA, dtype=dt).eval() for dt in ("float32", "float64")}


@pytest.fixture(scope="module")
def references():
    """folder -> (tokenizer, {dtype: model}, cases)"""
    return {name: (Tokenizer.from_dir(PIPELINES / name),
                   {dt: numlm.from_pretrained(PIPELINES / name, dtype=dt).eval() for dt in ("float32", "float64")},
                   json.loads((PIPELINES / name / "answers.json").read_text())["cases"])
            for name in ("qa-bert-tiny", "qa-roberta-tiny")}


def as_returned(want, top_k):
    """The pipeline gives a lone answer as a dict even when top_k > 1; numlm gives a list whenever top_k > 1."""
    return [want] if top_k > 1 and isinstance(want, dict) else want


def assert_same(got, want, rtol):
    if isinstance(want, dict):
        assert {k: got[k] for k in ("answer", "start", "end")} == {k: want[k] for k in ("answer", "start", "end")}
        np.testing.assert_allclose(got["score"], want["score"], rtol=rtol, atol=1e-9)
    else:
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w, rtol)


@pytest.mark.parametrize("name, dtype, i", REFERENCE, ids=[f"{n}-{d}-{i}" for n, d, i in REFERENCE])
def test_answers_are_the_pipelines(references, name, dtype, i):
    """BERT (WordPiece, [CLS]) and RoBERTa (byte-level BPE, <s>): every answer's text, start and end exactly,
    scores to 1e-5 in float32 and 1e-10 in float64, in the pipeline's order: windows, top_k, max_answer_len,
    the no-answer score, answers merged across spans and windows, and the pipeline's spans from [CLS] of
    score 0 when a context has too few spans ("", "Ye", "Y"). Where the pipeline fails (tokenizers panics
    on a doc_stride the question leaves no room for), numlm refuses."""
    tok, models, cases = references[name]
    case = cases[i]
    want, top_k = case[dtype], case["kwargs"].get("top_k", 1)
    if isinstance(want, dict) and "error" in want:
        assert "stride" in want["error"]
        with pytest.raises(ValueError, match="doc_stride=.* must be below the"):
            answer(models[dtype], tok, case["question"], case["context"], **case["kwargs"])
        return
    if isinstance(case["question"], list):
        want = [as_returned(w, top_k) for w in want]
    else:
        want = as_returned(want, top_k)
    got = answer(models[dtype], tok, case["question"], case["context"], **case["kwargs"])
    assert_same(got, want, 1e-5 if dtype == "float32" else 1e-10)


def answers_of(case):
    out = case["float32"] if isinstance(case["float32"], list) else [case["float32"]]
    return [a for x in out for a in (x if isinstance(x, list) else [x])]


def test_the_cases_cover_windows_no_answer_and_zero_spans(tok):
    """The fixture exercises what it claims: contexts read in three windows or more, the empty answer
    ranked first, and zero-score spans from [CLS] among the answers."""
    windows = [len(qa_windows(tok, c["question"], c["context"], c["kwargs"]["max_seq_len"],
                              c["kwargs"]["doc_stride"]))
               for c in CASES if "max_seq_len" in c["kwargs"] and isinstance(c["question"], str)]
    assert len(windows) >= 3 and min(windows) >= 3
    firsts = [answers_of(c)[0] for c in CASES]
    assert any(a["answer"] == "" and a["score"] > 0 for a in firsts)
    assert any(a["answer"] == "Ye" and a["score"] == 0 for c in CASES for a in answers_of(c))


def hand_spans(start, end, cand, max_answer_len):
    """The pipeline's scoring written out: softmax over the candidates (position 0 among them), position 0
    then barred; every span s <= e < s + max_answer_len of candidates with a positive score, best first."""
    cand = [t for t in range(len(start)) if cand[t] or t == 0]
    zs, ze = sum(np.exp(start[t] - max(start[cand])) for t in cand), sum(np.exp(end[t] - max(end[cand])) for t in cand)
    p = {(s, e): np.exp(start[s] - max(start[cand])) / zs * np.exp(end[e] - max(end[cand])) / ze
         for s in cand for e in cand if 0 < s <= e < s + max_answer_len}
    return sorted(p.items(), key=lambda x: -x[1])


def windows_batch(tok, question, context, max_seq_len, doc_stride):
    ws = qa_windows(tok, question, context, max_seq_len, doc_stride)
    T = max(len(w.ids) for w in ws)
    ids, types, ctx, mask = (np.zeros((len(ws), T), np.int64) for _ in range(4))
    for i, w in enumerate(ws):
        n = len(w.ids)
        ids[i, :n], types[i, :n], mask[i, :n] = w.ids, w.type_ids, 1
        ctx[i, :n] = [q == 1 for q in w.sequence_ids]
    return ids, types, ctx, mask


def assert_spans_by_hand(out, start, end, ctx, mask, top_k, max_answer_len):
    for b in range(len(ctx)):
        n = int(mask[b].sum())
        want = hand_spans(start[b, :n], end[b, :n], ctx[b, :n], max_answer_len)[:top_k]
        assert [(int(s), int(e)) for s, e in zip(out.starts[b], out.ends[b])] == [se for se, _ in want]
        np.testing.assert_allclose(out.scores[b], [p for _, p in want], rtol=1e-10)


def test_answer_spans_by_hand_on_padded_windows(models, tok):
    """Windows of different lengths in one padded batch: each row's spans and scores are the hand search on
    the model's own logits of that row."""
    model = models["float64"]
    ids, types, ctx, mask = windows_batch(tok, "Where does Python search?", LONG, 40, 10)
    assert (mask.sum(1) < ids.shape[1]).any()  # the last window is padded
    out = answer_spans(model, ids, ctx, mask, types, top_k=4, max_answer_len=5)
    logits = model(ids, attention_mask=mask, token_type_ids=types)
    assert_spans_by_hand(out, logits.start_logits, logits.end_logits, ctx, mask, 4, 5)


def test_peft_models(models, tok):
    """LoRA at its initialisation (B = 0) answers as the model; a trained-looking LoRA as its merged
    model; prompt tuning's spans are the hand search on its logits past the virtual tokens."""
    q, c, kw = CASES[4]["question"], CASES[4]["context"], CASES[4]["kwargs"]
    base = models["float64"]
    fresh = peft.get_peft_model(numlm.from_pretrained(QA, dtype="float64"),
                                peft.LoraConfig(r=2, task_type="QUESTION_ANS"), seed=1)
    assert_same(answer(fresh, tok, q, c, **kw), CASES[4]["float64"], 1e-10)
    lora = peft.get_peft_model(numlm.from_pretrained(QA, dtype="float64"),
                               peft.LoraConfig(r=2, task_type="QUESTION_ANS", init_lora_weights=False), seed=1)
    got = answer(lora, tok, q, c, **kw)
    assert got != answer(base, tok, q, c, **kw)
    assert_same(answer(lora.merge_and_unload(), tok, q, c, **kw), got, 1e-9)

    n = 3
    prompt = peft.get_peft_model(numlm.from_pretrained(QA, dtype="float64"),
                                 peft.PromptTuningConfig(num_virtual_tokens=n, task_type="QUESTION_ANS"), seed=2).eval()
    ids, types, ctx, mask = windows_batch(tok, q, c, 40, 10)
    out = answer_spans(prompt, ids, ctx, mask, types, top_k=3)
    full = prompt(ids, attention_mask=mask, token_type_ids=types)
    assert full.start_logits.shape[1] == ids.shape[1] + n
    assert_spans_by_hand(out, full.start_logits[:, n:], full.end_logits[:, n:], ctx, mask, 3, 15)


def test_distilbert_qa_model(tok):
    """DistilBERT has no token types: the context's type 1 is not passed, and the search is the same."""
    ids, types, ctx, mask = windows_batch(tok, "What does the parser build?", SHORT, 384, 128)
    distil = numlm.DistilBertForQuestionAnswering(numlm.DistilBertConfig(
        vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=24, max_position_embeddings=128),
        seed=1, dtype="float64").eval()
    assert types.any()
    out = answer_spans(distil, ids, ctx, mask, top_k=3)
    logits = distil(ids, attention_mask=mask)
    assert_spans_by_hand(out, logits.start_logits, logits.end_logits, ctx, mask, 3, 15)
    res = answer(distil, tok, "What does the parser build?", SHORT)
    assert res["answer"] == SHORT[res["start"]:res["end"]] and 0 < res["score"] <= 1


def test_eval_mode_kept(tok):
    """A model in training mode answers as in eval mode (no dropout: the pipeline's answer) and is left
    training."""
    model = numlm.from_pretrained(QA, dtype="float32")
    model.train()
    case = CASES[1]
    assert_same(answer(model, tok, case["question"], case["context"], **case["kwargs"]), case["float32"], 1e-5)
    assert all(m.training for _, m in model.modules())


def test_best_spans_of_equal_logits():
    """Equal logits: the candidates (position 0 and the context, 3 and 4) share the probability, position 0
    is barred from spans and gives the no-answer score; with one-token answers the rest of top_k are spans of
    score 0, kept only where both ends are candidates."""
    start, end = np.zeros(6), np.zeros(6)
    ctx = np.array([0, 0, 0, 1, 1, 0], bool)
    starts, ends, scores, null = best_spans(start, end, ctx, top_k=3, max_answer_len=15)
    assert set(zip(starts.tolist(), ends.tolist())) == {(3, 3), (3, 4), (4, 4)}
    np.testing.assert_allclose(scores, 1 / 9)
    np.testing.assert_allclose(null, 1 / 9)
    starts, ends, scores, _ = best_spans(start, end, ctx, top_k=3, max_answer_len=1)
    assert set(zip(starts[:2].tolist(), ends[:2].tolist())) == {(3, 3), (4, 4)}
    np.testing.assert_allclose(scores[:2], 1 / 9)
    assert (scores[2:] == 0).all() and set(starts.tolist()) | set(ends.tolist()) <= {0, 3, 4}


@pytest.mark.parametrize("kwargs, match", [
    ({"question": ""}, "question is empty"),
    ({"question": "   "}, "question is empty"),
    ({"context": ""}, "context is empty"),
    ({"top_k": 0}, "top_k must be an integer >= 1"),
    ({"max_answer_len": 0}, "max_answer_len must be an integer >= 1"),
    ({"max_seq_len": 32, "doc_stride": 30}, "doc_stride=30 must be below the"),
    ({"question": "what " * 40, "max_seq_len": 32}, "leave its context no room"),
    ({"question": ["a?", "b?"], "context": ["x"]}, "2 questions and 1 contexts"),
    ({"doc_stride": -1}, "doc_stride must be an integer >= 0"),
    ({"handle_impossible_answer": "no"}, "handle_impossible_answer must be True or False"),
])
def test_refusals(models, tok, kwargs, match):
    args = {"question": "What is a module?", "context": LONG, **kwargs}
    with pytest.raises(ValueError, match=match):
        answer(models["float32"], tok, **args)


def test_refuses_other_models_and_left_padding(models, tok):
    cls = numlm.BertForSequenceClassification(numlm.BertConfig(vocab_size=tok.vocab_size, hidden_size=16,
                                              num_hidden_layers=1, num_attention_heads=2, intermediate_size=24))
    with pytest.raises(ValueError, match="BertForSequenceClassification is not a question-answering model"):
        answer(cls, tok, "What?", SHORT)
    ids = np.array([[0, 2, 10, 3, 11, 3]])
    with pytest.raises(ValueError, match="start with a real token"):
        answer_spans(models["float32"], ids, ids > 5, attention_mask=np.array([[0, 1, 1, 1, 1, 1]]))


def test_windows_fit_the_tokenizer_and_the_model():
    """max_seq_len defaults to the pipeline's min(384, model_max_length), and never past the model's
    positions: a long context runs in windows on the 128-position fixture model"""
    model, tok = numlm.from_pretrained(QA), Tokenizer.from_dir(QA)
    context = "The module reads files and writes them back to the disk. " * 30
    assert numlm.answer(model, tok, "What does it read?", context) == \
        numlm.answer(model, tok, "What does it read?", context, max_seq_len=128)
    tok.model_max_length = 100
    assert numlm.answer(model, tok, "What does it read?", context, top_k=3) == \
        numlm.answer(model, tok, "What does it read?", context, top_k=3, max_seq_len=100)


@pytest.mark.parametrize("call, says", [
    (lambda m, t: numlm.answer(m, None, "q?", "c."), "tokenizer must be a numlm.data.Tokenizer"),
    (lambda m, t: best_spans(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 3))), "one row each"),
    (lambda m, t: best_spans(np.zeros(5), np.zeros(4), np.ones(5)), "one row each"),
    (lambda m, t: best_spans(np.zeros(5), np.zeros(5), np.ones(5), top_k=0), "top_k must be an integer >= 1"),
    # a mask of 2s or of strings counted as all context
    (lambda m, t: best_spans(np.zeros(5), np.zeros(5), np.full(5, 2)), "context_mask must hold only 0 and 1"),
    (lambda m, t: best_spans(np.zeros(5), np.zeros(5), np.array(list("01010"))), "context_mask must hold only 0"),
    (lambda m, t: answer_spans(m, np.array([[2, 5, 3, 7, 3]]), np.full((1, 5), 2)), "context_mask must hold only"),
    (lambda m, t: qa_windows(t, "q?", "c.", doc_stride=None), "doc_stride must be an integer"),
    (lambda m, t: qa_windows(t, "q?", "c.", max_seq_len=None), "max_seq_len must be an integer"),
])
def test_helpers_refuse_bad_arguments(call, says):
    model, tok = numlm.from_pretrained(QA), Tokenizer.from_dir(QA)
    with pytest.raises(ValueError, match=says):
        call(model, tok)


def test_a_window_past_the_models_positions_is_refused_by_name(tmp_path):
    """max_seq_len above what the model holds names the option (it had failed inside the model on
    input_ids); the tokenizer's model_max_length is saved and read back"""
    model, tok = numlm.from_pretrained(QA), Tokenizer.from_dir(QA)
    with pytest.raises(ValueError, match=r"max_seq_len=300: a window holds at most 128 tokens"):
        numlm.answer(model, tok, "What?", "The module reads files. " * 80, max_seq_len=300)
    tok.model_max_length = 100
    tok.save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).model_max_length == 100
    for bad in ("16", 0, 2.5, True):
        with pytest.raises(ValueError, match="model_max_length must be an integer >= 1 or None"):
            tok.model_max_length = bad
    assert tok.model_max_length == 100
