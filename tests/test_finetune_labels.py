"""The labels numlm.finetune feeds the model, checked against derivations that do not use its code:
token classification from each word encoded alone (first piece labelled, the rest -100); QA spans
from the character span through the untruncated encoding's offsets, then cut where truncation cuts;
multiple-choice sequences from the context and the choice encoded alone; the prompt's shift."""
import numpy as np
import pytest

import numlm.finetune as F
from numlm.data.tokenizer import Tokenizer
from numlm.models import BertConfig, BertForQuestionAnswering, BertForTokenClassification

TEXTS = ["the quick brown fox jumps over the lazy dog", "romeo and juliet wherefore art thou romeo",
         "unbelievable extraordinary circumstances happen"] * 5
WORDS = [["unbelievable", "fox", "romeo", "a", "extraordinary", "dog"],
         ["the", "circumstances", "jumps", "over", "juliet"],
         ["wherefore"], ["art", "thou", "lazy", "quick", "brown", "happen", "unbelievable"]]
CONTEXT = "romeo: the quick fox jumps over the lazy dog\njuliet: wherefore art thou romeo"
ANSWERS = ["romeo", "quick fox", "lazy dog", "juliet", "wherefore art", "thou romeo"]  # first and last included


@pytest.fixture(scope="module")
def wp():
    return Tokenizer.train_wordpiece_from_iterator(TEXTS, vocab_size=60, min_frequency=1)  # words split in pieces


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe_from_iterator(TEXTS, vocab_size=300, min_frequency=1)


def pieces(tok, word):
    return tok.backend.encode(word, add_special_tokens=False).ids


def expected_tokcls(tok, words, labels, max_length):
    """[CLS] pieces [SEP], the pieces cut to max_length - 2; a word's first piece carries its label."""
    ids, ys = [], []
    for w, y in zip(words, labels):
        p = pieces(tok, w)
        ids += p
        ys += [y] + [-100] * (len(p) - 1)
    keep = max_length - 2
    cls, sep = tok.backend.token_to_id("[CLS]"), tok.backend.token_to_id("[SEP]")
    return [cls] + ids[:keep] + [sep], [-100] + ys[:keep] + [-100]


def test_token_classification_labels_the_first_piece_of_each_word(wp):
    examples = [{"words": w, "labels": [(3 * i + j) % 5 for j in range(len(w))]} for i, w in enumerate(WORDS)]
    assert max(len(pieces(wp, w)) for w in WORDS[0]) > 3  # multi-piece words: the test's premise
    total = max(sum(len(pieces(wp, w)) for w in ws) for ws in WORDS) + 2
    for max_length in range(3, total + 2):  # every cut, inside words and between them
        enc = F.encode("tokcls", "bert", wp, examples, max_length)
        for e, row in zip(examples, enc.rows):
            ids, labels = expected_tokcls(wp, e["words"], e["labels"], max_length)
            assert row["input_ids"].tolist() == ids, max_length
            assert row["labels"].tolist() == labels, max_length
        b = enc.batch(range(len(examples)))  # padded: pad id, mask 0, label -100
        for i, row in enumerate(enc.rows):
            n = len(row["input_ids"])
            assert b["labels"][i, :n].tolist() == row["labels"].tolist() and np.all(b["labels"][i, n:] == -100)
            assert b["attention_mask"][i].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)


def test_token_classification_agrees_with_the_word_ids_recipe(wp):
    """transformers' documented recipe: label = word's label at its first word id, -100 elsewhere."""
    examples = [{"words": w, "labels": list(range(len(w)))} for w in WORDS]
    enc = F.encode("tokcls", "bert", wp, examples, 64)
    for e, row in zip(examples, enc.rows):
        word_ids = wp.backend.encode(e["words"], is_pretokenized=True).word_ids
        want = [-100 if w is None or (i and word_ids[i - 1] == w) else e["labels"][w] for i, w in enumerate(word_ids)]
        assert row["labels"].tolist() == want


def qa_examples(question="who?"):
    out = []
    for a in ANSWERS:
        s = CONTEXT.find(a) if a != "thou romeo" else CONTEXT.rfind(a)
        out.append({"question": question, "context": CONTEXT, "answer_start": s, "answer_text": a})
    return out


def expected_span(tok, e, max_length):
    """(start, end) token positions of the answer's characters in the untruncated encoding, or (0, 0)
    when truncation to max_length drops any of its tokens."""
    tok.backend.no_truncation()
    full = tok.backend.encode(e["question"], e["context"])
    s, t = e["answer_start"], e["answer_start"] + len(e["answer_text"])
    ctx = [i for i, q in enumerate(full.sequence_ids) if q == 1]
    hit = [i for i in ctx if full.offsets[i][0] < t and full.offsets[i][1] > s]
    a, b = hit[0], hit[-1]
    assert e["context"][full.offsets[a][0]:full.offsets[b][1]] == e["answer_text"]  # tokens = the answer
    room = min(len(ctx), max_length - (ctx[0] + 1))  # the context tokens truncation keeps ([SEP] at the end)
    return ((a, b) if b - ctx[0] < room else (0, 0)), full.ids[:ctx[0] + room] + [full.ids[-1]]


def test_qa_spans_from_the_character_span_with_every_truncation(wp):
    examples = qa_examples()
    tok_q = len(wp.backend.encode("who?", add_special_tokens=False).ids)
    full_len = len(wp.backend.encode("who?", CONTEXT).ids)
    seen = set()
    for max_length in range(tok_q + 4, full_len + 2):  # [CLS] q [SEP] c [SEP]: one context token at least
        enc = F.encode("qa", "bert", wp, examples, max_length)
        for e, row in zip(examples, enc.rows):
            (a, b), ids = expected_span(wp, e, max_length)
            assert (row["start_positions"], row["end_positions"]) == (a, b), (e["answer_text"], max_length)
            assert row["answerable"] == (a > 0) and row["input_ids"].tolist() == ids
            seen.add((e["answer_text"], a > 0))
    assert all((a, True) in seen and (a, False) in seen for a in ANSWERS[1:])  # each answer kept and cut
    batch = enc.batch(range(len(examples)))
    assert batch["start_positions"].tolist() == [r["start_positions"] for r in enc.rows]
    assert batch["end_positions"].tolist() == [r["end_positions"] for r in enc.rows]


def _ce(logits, y):
    z = np.asarray(logits, np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return float(np.mean(lse - z[np.arange(len(y)), y]))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_qa_spans_reach_the_right_positions_under_prompt_and_prefix_tuning(wp, method):
    """The loss equals the cross-entropy of the model's own (B, n + T) logits at the derived span
    moved past the n virtual tokens (prompt), or at the span itself (prefix: logits cover T)."""
    n, max_length = 3, 30
    cfg = BertConfig(vocab_size=wp.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=40)
    pm = F._apply_peft(BertForQuestionAnswering(cfg, seed=1, dtype="float64"), "bert",
                       F.FinetuneArgs("m", "d", "o", method=method, task="qa", num_virtual_tokens=n))
    pm.eval()
    examples = [e for e in qa_examples() if expected_span(wp, e, max_length)[0][0] > 0]
    enc = F.encode("qa", "bert", wp, examples, max_length)
    b = enc.batch(range(len(examples)))
    span = np.array([expected_span(wp, e, max_length)[0] for e in examples])
    out = pm(**b)
    full = pm.pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
    shift = n if method == "prompt" else 0
    assert full.start_logits.shape[1] == b["input_ids"].shape[1] + shift
    want = (_ce(full.start_logits, span[:, 0] + shift) + _ce(full.end_logits, span[:, 1] + shift)) / 2
    assert float(out.loss) == pytest.approx(want, rel=1e-12)


def test_token_labels_reach_their_tokens_under_prompt_tuning(wp):
    n = 2
    cfg = BertConfig(vocab_size=wp.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=64, num_labels=5)
    pm = F._apply_peft(BertForTokenClassification(cfg, seed=1, dtype="float64"), "bert",
                       F.FinetuneArgs("m", "d", "o", method="prompt", task="tokcls", num_virtual_tokens=n))
    pm.eval()
    examples = [{"words": w, "labels": [j % 5 for j in range(len(w))]} for w in WORDS]
    b = F.encode("tokcls", "bert", wp, examples, 40).batch(range(len(examples)))
    out = pm(**b)
    full = pm.pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
    rows, cols, ys = [], [], []
    for i, e in enumerate(examples):
        _, labels = expected_tokcls(wp, e["words"], e["labels"], 40)
        for t, y in enumerate(labels):
            if y != -100:
                rows.append(i), cols.append(t + n), ys.append(y)
    assert float(out.loss) == pytest.approx(_ce(full.logits[rows, cols], np.array(ys)), rel=1e-12)


def test_multiple_choice_sequences_from_context_and_choice_encoded_alone(bpe):
    examples = [{"context": TEXTS[i], "choices": [TEXTS[(i + k) % 3] for k in range(3)], "label": i % 3}
                for i in range(3)]
    eos = bpe.eos_id
    for max_length in (6, 9, 14, 40):
        enc = F.encode("multiple-choice", "gpt2", bpe, examples, max_length)
        b = enc.batch(range(len(examples)))
        assert b["mc_labels"].tolist() == [e["label"] for e in examples]
        for i, e in enumerate(examples):
            ctx = bpe.encode(e["context"], add_special_tokens=False)
            for c, choice in enumerate(e["choices"]):
                ans = bpe.encode(choice, add_special_tokens=False)[:max_length // 2 - 1]  # at most half
                keep = min(len(ctx), max_length - len(ans) - 2)   # the context's last tokens
                want = ctx[len(ctx) - keep:] + [eos] + ans + [eos]
                L = len(want)
                assert L <= max_length and b["input_ids"][i, c, :L].tolist() == want, (max_length, i, c)
                assert b["mc_token_ids"][i, c] == L - 1  # the head reads the extract token
                assert b["attention_mask"][i, c].tolist() == [1] * L + [0] * (b["input_ids"].shape[2] - L)
                assert b["labels"][i, c].tolist() == want + [-100] * (b["input_ids"].shape[2] - L)
