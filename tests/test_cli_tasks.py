"""`numlm classify`, `numlm tag` and `numlm answer`: the Python functions' results, one line each."""
from pathlib import Path

import numpy as np
import pytest

import numlm
from numlm.cli import main
from numlm.data.tokenizer import Tokenizer
from numlm.peft import LoraConfig, get_peft_model

PIPES = Path(__file__).parent / "fixtures" / "pipelines"
TOKCLS, QA = PIPES / "tokcls-bert-tiny", PIPES / "qa-bert-tiny"
TEXT = "Ada Lovelace lived in London with Charles Babbage."
QUESTION, CONTEXT = "What does it do?", "The module provides a way to read files and write them back."


def _lines(capsys):
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("aggregation", ["none", "simple", "max"])
def test_tag_prints_the_entities(capsys, aggregation):
    assert main(["tag", str(TOKCLS), TEXT, "--aggregation", aggregation]) == 0
    lines = _lines(capsys)
    ents = numlm.tag(numlm.from_pretrained(TOKCLS), Tokenizer.from_dir(TOKCLS), TEXT, aggregation_strategy=aggregation)
    assert len(lines) == len(ents) > 0
    for line, e in zip(lines, ents):
        score, label, span = line.split()[:3]
        assert float(score) == pytest.approx(e["score"], abs=5e-5)
        assert label == e.get("entity_group", e.get("entity")) and span == f"{e['start']}:{e['end']}"
        assert line.endswith(TEXT[e["start"]:e["end"]])


def test_answer_prints_the_best_answers(capsys):
    assert main(["answer", str(QA), "--question", QUESTION, "--context", CONTEXT, "--top-k", "3"]) == 0
    lines = _lines(capsys)
    found = numlm.answer(numlm.from_pretrained(QA), Tokenizer.from_dir(QA), QUESTION, CONTEXT, top_k=3)
    assert len(lines) == len(found) == 3
    for line, r in zip(lines, found):
        assert line.split()[1] == f"{r['start']}:{r['end']}" and line.endswith(r["answer"])
        assert r["answer"] == CONTEXT[r["start"]:r["end"]]


def test_answer_from_an_adapter_folder(tmp_path, capsys):
    """an adapter folder on the QA model answers as the PeftModel does (its base given with --base)"""
    base = numlm.from_pretrained(QA)
    peft = get_peft_model(base, LoraConfig(task_type="QUESTION_ANS", r=4, target_modules=["query", "value"]))
    rng = np.random.default_rng(0)
    for name, p in peft.parameters().items():
        if "lora_B" in name:
            p[...] = rng.normal(0, 0.5, p.shape)
    peft.save_pretrained(tmp_path)
    want = numlm.answer(peft, Tokenizer.from_dir(QA), QUESTION, CONTEXT)
    assert main(["answer", str(tmp_path), "--base", str(QA), "--question", QUESTION, "--context", CONTEXT]) == 0
    assert _lines(capsys) == [f"{want['score']:.4f}  {want['start']:>4d}:{want['end']:<4d} {want['answer']}"]


def test_classify_prints_a_label_per_text(tmp_path, capsys):
    texts = ["a fine film", "a dull film", "the cast shines"]
    tok = Tokenizer.train_wordpiece_from_iterator(texts * 5, vocab_size=120, min_frequency=1)
    cfg = numlm.BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=32)
    cls = numlm.BertForSequenceClassification
    model = cls(cls.from_config_dict(cfg.to_dict(), id2label={0: "rotten", 1: "fresh"}), seed=4)
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    assert main(["classify", str(tmp_path), *texts]) == 0
    want = numlm.classify(numlm.from_pretrained(tmp_path), tok, texts)
    assert _lines(capsys) == [f"{r['score']:.4f}  {r['label']:<15s} {t}" for t, r in zip(texts, want)]


@pytest.mark.parametrize("args, says", [
    (["classify", str(QA), "hi"], "is not a sequence-classification model"),
    (["tag", str(QA), "hi"], "is not a token-classification model"),
    (["answer", str(TOKCLS), "--question", "q?", "--context", "c."], "is not a question-answering model"),
    (["answer", str(QA), "--question", " ", "--context", "c."], "question"),
    (["answer", str(QA), "--question", "q?", "--context", "c.", "--top-k", "0"], "top-k"),
    (["tag", str(TOKCLS), "x", "--base", str(TOKCLS)], "--base goes with an adapter folder"),
])
def test_bad_input_is_one_line_and_exit_2(args, says, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_results_stay_on_their_lines_and_long_contexts_window(capsys):
    """a context longer than the model's 128 positions is read in windows by default; an answer or
    entity that crosses a line break is printed on its one line"""
    context = "The module reads files.\nIt writes them back. " * 40
    assert main(["answer", str(QA), "--question", "What?", "--context", context, "--top-k", "3"]) == 0
    lines = _lines(capsys)
    found = numlm.answer(numlm.from_pretrained(QA), Tokenizer.from_dir(QA), "What?", context, top_k=3)
    assert len(lines) == 3 and any("\n" in r["answer"] for r in found)
    assert [line.split(None, 2)[2] for line in lines] == [r["answer"].replace("\n", "\\n") for r in found]
    text = "Ada Lovelace\nlived in London"
    assert main(["tag", str(TOKCLS), text, "--aggregation", "simple"]) == 0
    ents = numlm.tag(numlm.from_pretrained(TOKCLS), Tokenizer.from_dir(TOKCLS), text, aggregation_strategy="simple")
    assert len(_lines(capsys)) == len(ents)
