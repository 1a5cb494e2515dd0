"""Property-based: the numeric flags of `numlm finetune`, `pretrain` and `profile`, drawn inside and
outside their ranges (NaN, infinities, zero, negatives, text), and the rows of user CSV / JSONL files.
Every draw either runs (exit 0, the run's files written) or gets one clear line
`numlm <command>: error: ...` (exit 2) that is not a Python exception's name, and writes nothing."""
import csv
import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from numlm.cli import main
from numlm.data import datasets as D
from numlm.data.tokenizer import Tokenizer
from numlm.models import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

DRAWS = settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
WORDS = ["good", "bad", "film", "plot", "great", "dull", "the", "a"]
UNCLEAR = re.compile(r"error: [A-Z]\w*(Error|Exception)\b")  # describe() names the type of an unforeseen error


def out_of_range():
    return st.sampled_from(["0", "-1", "-0.5", "nan", "inf", "-inf", "1e999", "abc", "", "0x10", "2.5"])


def ints(lo, hi):
    """An integer flag's text: out of range (a third of the draws) or a small integer that runs."""
    valid = st.integers(lo, hi).map(str)
    return st.one_of(out_of_range(), valid, valid)


def reals(lo, hi):
    valid = st.floats(lo, hi).map(repr)
    return st.one_of(out_of_range(), valid, valid)


def one_clear_line(code, err, command):
    lines = [l for l in err.strip().splitlines() if ": warning: " not in l]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert lines[0].startswith(f"numlm {command}: error: ") and not UNCLEAR.search(lines[0]), lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-flags")
    rng = np.random.default_rng(0)
    rows = [(" ".join(rng.choice(WORDS, 4)), i % 2) for i in range(20)]
    (root / "d.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    texts = [t for t, _ in rows] * 4
    bert_tok = Tokenizer.train_wordpiece_from_iterator(texts, vocab_size=60, min_frequency=1)
    BertForMaskedLM(BertConfig(vocab_size=bert_tok.vocab_size, hidden_size=8, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=8, max_position_embeddings=32),
                    seed=0).save_pretrained(root / "bert")
    bert_tok.save(root / "bert")
    gpt_tok = Tokenizer.train_bpe_from_iterator(texts, vocab_size=280, min_frequency=1)
    GPT2LMHeadModel(GPT2Config(vocab_size=gpt_tok.vocab_size, n_positions=32, n_embd=8, n_layer=1, n_head=2,
                               eos_token_id=gpt_tok.eos_id, bos_token_id=gpt_tok.eos_id),
                    seed=0).save_pretrained(root / "gpt")
    gpt_tok.save(root / "gpt")
    gpt_tok.save(root / "tok.json")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{i}.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 8)) for _ in range(6)) + "\n")
    return root


FINETUNE = {"--lr": reals(1e-4, 1e-2), "--warmup": reals(0.0, 0.9),
            "--weight-decay": reals(0.0, 0.1), "--alpha": reals(0.5, 32.0),
            "--lm-coef": reals(0.0, 1.0), "--epochs": ints(1, 4), "--max-steps": ints(1, 4),
            "--batch-size": ints(1, 8), "--max-length": ints(1, 40), "--seed": ints(0, 9),
            "--r": ints(1, 4), "--num-labels": ints(1, 3), "--max-examples": ints(1, 12),
            "--eval-batch-size": ints(1, 4), "--freeze-layers": ints(0, 2)}


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(world):
    """A finished fine-tuning run, copied for each draw that starts again over it (--overwrite)."""
    out = world / "finished"
    assert main(["finetune", str(world / "bert"), "--data", str(world / "d.csv"), "--out", str(out),
                 "--no-progress", "--max-steps", "1"]) == 0
    return out


@DRAWS
@given(data=st.data(), model=st.sampled_from(["bert", "gpt"]), method=st.sampled_from(["full", "lora"]),
       overwrite=st.booleans())
def test_drawn_finetune_flags_run_or_are_one_line(world, finished, data, model, method, overwrite, capsys):
    """Refused: one line, and nothing written, deleted or changed (an earlier run under --overwrite too)."""
    flags = data.draw(st.lists(st.sampled_from(sorted(FINETUNE)), min_size=1, max_size=3, unique=True))
    argv = ["finetune", str(world / model), "--data", str(world / "d.csv"), "--method", method,
            "--no-progress", "--max-steps", "2", "--max-examples", "10"]
    for f in flags:
        value = data.draw(FINETUNE[f], label=f)
        argv = argv[:argv.index(f)] + argv[argv.index(f) + 2:] if f in argv else argv
        argv += [f, value]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        if overwrite:
            shutil.copytree(finished, out)
            argv.append("--overwrite")
        before = snapshot(Path(scratch))
        code = main(argv + ["--out", str(out)])
        event(f"exit {code}")
        _, err = capsys.readouterr()
        if code == 0:
            assert (out / "results.json").is_file()
        else:
            one_clear_line(code, err, "finetune")
            assert snapshot(Path(scratch)) == before and out.exists() == overwrite


PRETRAIN = {"--steps": ints(1, 4), "--batch-size": ints(1, 6), "--block-size": ints(1, 40),
            "--grad-accum": ints(1, 3), "--lr": reals(1e-4, 1e-2),
            "--warmup": ints(0, 3), "--seed": ints(0, 9), "--vocab-size": ints(1, 400),
            "--minutes": out_of_range()}


@DRAWS
@given(data=st.data(), arch=st.sampled_from(["gpt2", "openai-gpt"]))
def test_drawn_pretrain_flags_run_or_are_one_line(world, data, arch, capsys):
    flags = data.draw(st.lists(st.sampled_from(sorted(PRETRAIN)), min_size=1, max_size=3, unique=True))
    argv = ["pretrain", "--arch", arch, "--size", "tiny", "--data", str(world / "corpus"), "--tokenizer",
            str(world / "tok.json"), "--steps", "2", "--block-size", "8", "--batch-size", "2"]
    for f in flags:
        value = data.draw(PRETRAIN[f], label=f)
        argv = argv[:argv.index(f)] + argv[argv.index(f) + 2:] if f in argv else argv
        argv += [f, value]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        code = main(argv + ["--out", str(out)])
        event(f"exit {code}")
        _, err = capsys.readouterr()
        if code == 0:
            assert (out / "model" / "model.safetensors").is_file()
        else:
            one_clear_line(code, err, "pretrain")
            assert not list(Path(scratch).iterdir())


PROFILE = {"--steps": ints(1, 2), "--warmup": ints(0, 1), "--batch": ints(1, 3),
           "--seq": ints(1, 40), "--generate": ints(1, 4), "--top": ints(1, 30)}


@DRAWS
@given(data=st.data())
def test_drawn_profile_flags_run_or_are_one_line(world, data, capsys):
    flags = data.draw(st.lists(st.sampled_from(sorted(PROFILE)), min_size=1, max_size=3, unique=True))
    argv = ["profile", str(world / "gpt"), "--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "8"]
    for f in flags:
        value = data.draw(PROFILE[f], label=f)
        argv = argv[:argv.index(f)] + argv[argv.index(f) + 2:] if f in argv else argv
        argv += [f, value]
    code = main(argv)
    event(f"exit {code}")
    out, err = capsys.readouterr()
    if code == 0:  # the sizes asked for are the sizes profiled (--batch 0 and --seq 0 were replaced)
        value = {f: argv[len(argv) - 1 - argv[::-1].index(f) + 1] for f in ("--batch", "--seq", "--generate")
                 if f in argv}
        want = (f"{value['--seq']}-token prompt + {value['--generate']} new tokens" if "--generate" in value
                else f"batch {value['--batch']} x {value['--seq']}")
        assert want in out and "attention_forward" in out, out
    else:
        one_clear_line(code, err, "profile")


# ---- the rows of a user's file -------------------------------------------------------------------
texts = st.one_of(st.sampled_from(WORDS), st.text(max_size=12))
binary = st.sampled_from([0, 1, "0", "1", " 1 "])
labels = st.one_of(binary, binary, binary, st.sampled_from(["pos", "neg", "l"]), st.integers(-2, 3),
                   st.text(max_size=3), st.booleans(), st.floats(allow_nan=True), st.none())


def csv_file(rows, quoted):
    if quoted:  # csv.writer's quoting: every field comes back as written
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["text", "label"])
        w.writerows(rows)
        return buf.getvalue()
    return "text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)  # by hand: commas and quotes unescaped


def is_integer(y):
    return isinstance(y, int) and not isinstance(y, bool) or isinstance(y, str) and re.fullmatch(r"\s*-?\d+\s*", y)


def check_loaded(d, rows):
    """Loaded: labels all integers or all names (a stray one is a typo), two classes or more."""
    assert len({bool(is_integer(y)) for _, y in rows}) == 1
    n_rows = len(rows)
    examples = d.train + d.validation + d.test
    K = len(d.label_names)
    assert len(examples) <= n_rows and K >= 2 and len({e["label"] for e in examples}) >= 2
    assert all(isinstance(e["label"], int) and 0 <= e["label"] < K for e in examples)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["csv", "jsonl"]), quoted=st.booleans(), bom=st.booleans())
def test_drawn_label_file_rows_load_or_are_one_line(data, kind, quoted, bom):
    """Rows of a sound file, up to two of them replaced by anything (a typo, an empty text, a float)."""
    rows = data.draw(st.lists(st.tuples(st.sampled_from(WORDS), binary), min_size=8, max_size=16))
    for _ in range(data.draw(st.integers(0, 2))):
        rows[data.draw(st.integers(0, len(rows) - 1))] = data.draw(st.tuples(texts, labels))
    with tempfile.TemporaryDirectory() as scratch:
        f = Path(scratch) / f"data.{kind}"
        text = csv_file(rows, quoted) if kind == "csv" else "".join(
            json.dumps({"text": t, "label": y}) + "\n" for t, y in rows)
        f.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass"))
        try:
            d = D.load(f)
            event("loaded")
        except ValueError as e:
            msg = str(e)
            assert msg.startswith(str(f)) and "\n" not in msg, msg
        else:
            check_loaded(d, rows)
