"""Fuzzing the `numlm` command (in-process, through cli.main) with bad values: every refusal is
exit code 2 and one line `numlm <command>: error: ...` without a traceback, and no file of the run
folder changes."""
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st, HealthCheck

from numlm.cli import main

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TEXT = "ROMEO: But soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, a finished GPT-2 run (checkpoints at steps 2 and 4, model, tokenizer), a BERT model
    directory, and bad files of every kind."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    lines = (TEXT * 2).splitlines()
    for i in range(30):
        (corpus / f"doc{i}.txt").write_text("\n".join(rng.permutation(lines)) + "\n")
    run = root / "run"
    assert main(pretrain_args(corpus, run)) == 0
    from numlm.data import Tokenizer
    from numlm.models import BertForMaskedLM
    from numlm.models.bert import BertConfig
    bert = root / "bert"
    tok = Tokenizer.train_wordpiece_from_iterator([TEXT] * 3, vocab_size=60, min_frequency=1)
    BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=8, max_position_embeddings=32), seed=0).save_pretrained(bert)
    tok.save(bert)
    bad = root / "bad"
    bad.mkdir()
    (bad / "binary.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00" + bytes(range(200)))
    (bad / "latin1.txt").write_bytes("na\u00efve caf\u00e9".encode("latin-1"))
    (bad / "empty.txt").write_bytes(b"")
    (bad / "empty_dir").mkdir()
    (bad / "garbage.json").write_bytes(b"{\"n_embd\": 8, ")
    (bad / "list.json").write_text("[1, 2]")
    (bad / "reviews.csv").write_text("text,label\ngood film,1\nbad film,0\n")
    (bad / "heads.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 300, "n_positions": 32,
                                                "n_embd": 18, "n_layer": 1, "n_head": 4}))
    return {"corpus": corpus, "run": run, "bert": bert, "bad": bad, "root": root}


def pretrain_args(corpus, out, steps=4):
    return ["pretrain", "--arch", "gpt2", "--size", "tiny", "--data", str(corpus), "--vocab-size", "300",
            "--out", str(out), "--block-size", "16", "--batch-size", "4", "--steps", str(steps)]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def refused(argv, capsys):
    """Run numlm in-process; assert exit 2 and one error line without a traceback; return that line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert lines and "Traceback" not in err, err
    assert sum(": error: " in l for l in lines) == 1 and lines[-1].startswith(f"numlm {command_of(argv)}: error: "), err
    return lines[-1]


def command_of(argv):
    argv = [a for a in argv if a != "--debug"]
    return " ".join(argv[:2]) if argv[0] == "tokenizer" else argv[0]


BAD_NUMBERS = ["0", "-1", "nan", "inf", "-inf", "1.5", "abc", "", "1e999"]
BAD = {  # per command: flag -> bad values ("@name" is a file of the world)
    "pretrain": {"--steps": BAD_NUMBERS, "--batch-size": BAD_NUMBERS, "--block-size": BAD_NUMBERS + ["1"],
                 "--grad-accum": BAD_NUMBERS, "--vocab-size": BAD_NUMBERS, "--lr": BAD_NUMBERS,
                 "--minutes": BAD_NUMBERS, "--warmup": ["-1", "nan", "x"], "--seed": ["-1", "x"],
                 "--arch": ["gpt3"], "--size": ["huge"], "--dtype": ["float16"], "--encoding": ["nope", ""],
                 "--data": ["@binary.txt", "@latin1.txt", "@empty.txt", "@empty_dir", "/no/such/path"],
                 "--config": ["@garbage.json", "@list.json", "@heads.json", "@binary.txt", "/no/such.json"],
                 "--tokenizer": ["@garbage.json", "@binary.txt", "@empty_dir", "/no/such.json"],
                 "--out": ["@binary.txt"]},
    "eval": {"--batches": BAD_NUMBERS, "--batch-size": BAD_NUMBERS, "--block-size": BAD_NUMBERS,
             "--seed": ["-1", "x"], "--dtype": ["int8"], "--data": ["@binary.txt", "@latin1.txt", "@empty_dir"],
             "--encoding": ["nope"]},
    "generate": {"--max-new-tokens": BAD_NUMBERS, "--temperature": BAD_NUMBERS, "--top-k": BAD_NUMBERS,
                 "--top-p": BAD_NUMBERS + ["1.01"], "--num-beams": BAD_NUMBERS, "--repetition-penalty": BAD_NUMBERS,
                 "--seed": ["-1", "x"], "--prompt": [""]},
    "fill-mask": {"--top-k": BAD_NUMBERS},
    "tokenizer train": {"--vocab-size": BAD_NUMBERS, "--kind": ["unigram"], "--encoding": ["nope"],
                        "--data": ["@binary.txt", "@latin1.txt", "@empty.txt", "@empty_dir"]},
    "prepare": {"--data": ["@binary.txt", "@latin1.txt", "@empty.txt", "@empty_dir"], "--encoding": ["nope"],
                "--tokenizer": ["@garbage.json", "@binary.txt", "/no/such.json"]},
    "gradcheck": {"--seed": ["-1", "x", "1.5"]},
    "finetune": {"--lr": BAD_NUMBERS, "--epochs": BAD_NUMBERS, "--batch-size": BAD_NUMBERS,
                 "--max-steps": ["0", "-1", "x"], "--weight-decay": ["nan", "-1"], "--max-length": ["0", "x"],
                 "--seed": ["-1", "x"], "--data": ["@binary.txt", "@empty.txt", "/no/such.csv"]},
    "attention": {"--layer": ["-1", "99", "x"], "--head": ["-1", "99", "x"], "--text": [""]},
}


def base_argv(command, w, scratch):
    run = w["run"]
    if command == "pretrain":
        return pretrain_args(w["corpus"], run)
    if command == "eval":
        return ["eval", str(run / "model"), "--data", str(w["corpus"]), "--block-size", "16", "--batches", "1"]
    if command == "generate":
        return ["generate", str(run / "model"), "--prompt", "ROMEO", "--max-new-tokens", "2"]
    if command == "fill-mask":
        return ["fill-mask", str(w["bert"]), "the [MASK] is the sun"]
    if command == "tokenizer train":
        return ["tokenizer", "train", "--vocab-size", "300", "--data", str(w["corpus"]), "--out", str(scratch / "t.json")]
    if command == "prepare":
        return ["prepare", "--tokenizer", str(run / "tokenizer.json"), "--data", str(w["corpus"]),
                "--out", str(scratch / "t.bin")]
    if command == "finetune":
        return ["finetune", str(run / "model"), "--data", str(w["bad"] / "reviews.csv"), "--out", str(scratch / "ft"),
                "--max-steps", "1"]
    if command == "attention":
        return ["attention", str(run / "model"), "--text", "ROMEO", "--out", str(scratch / "a.png")]
    return ["gradcheck"]


def with_flag(argv, flag, value):
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


@FUZZ
@given(data=st.data(), mode=st.sampled_from([[], ["--overwrite"], ["--resume"]]), debug=st.booleans())
def test_bad_arguments_are_one_line_and_change_nothing(world, data, mode, debug, capsys):
    command = data.draw(st.sampled_from(sorted(BAD)))
    flag = data.draw(st.sampled_from(sorted(BAD[command])))
    value = data.draw(st.sampled_from(BAD[command][flag]))
    value = str(world["bad"] / value[1:]) if value.startswith("@") else value
    before = snapshot(world["root"])
    with tempfile.TemporaryDirectory() as scratch:
        argv = with_flag(base_argv(command, world, Path(scratch)), flag, value)
        if command == "pretrain":
            argv += mode
        line = refused(argv, capsys) if not debug else None
        if debug:  # --debug: the traceback, then the same one line
            capsys.readouterr()
            assert main(["--debug"] + argv) == 2
            assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"numlm {command}: error: ")
        else:
            assert flag in line or value in line or "error: " in line
        assert not list(Path(scratch).iterdir())          # nothing half-written
    assert snapshot(world["root"]) == before


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=48), st.text(max_size=24).map(lambda t: t.encode("utf-8"))),
       command=st.sampled_from(["prepare", "tokenizer train"]))
def test_drawn_corpus_files_are_read_strictly(world, content, command, capsys):
    """Any bytes as a corpus: valid UTF-8 text without NUL bytes is accepted; anything else is exit 2
    naming the file, and the output is not written."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        f = scratch / "corpus.txt"
        f.write_bytes(content)
        argv = with_flag(base_argv(command, world, scratch), "--data", str(f))
        try:
            text = content.decode("utf-8")
            good = "\0" not in text and text.strip() != ""
        except UnicodeDecodeError:
            good = False
        if good:
            capsys.readouterr()
            code = main(argv)
            err = capsys.readouterr().err
            assert code in (0, 2) and "Traceback" not in err   # a tiny corpus may be refused by the trainer
            if code == 2:
                assert err.strip().splitlines()[-1].startswith(f"numlm {command}: error: ")
        else:
            line = refused(argv, capsys)
            assert str(f) in line or "no text" in line
            assert sorted(p.name for p in scratch.iterdir()) == ["corpus.txt"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["config.json", "model.safetensors", "tokenizer.json"]),
       how=st.sampled_from(["truncate", "junk", "delete"]), where=st.floats(0, 1), junk=st.binary(max_size=30),
       command=st.sampled_from(["generate", "eval"]))
def test_a_damaged_model_directory_is_named(world, name, how, where, junk, command, capsys):
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = scratch / "model"
        shutil.copytree(world["run"] / "model", model)
        f = model / name
        data = f.read_bytes()
        i = int(where * (len(data) - 1))
        if how == "truncate":
            f.write_bytes(data[:i])
        elif how == "junk":
            f.write_bytes(junk)
        else:
            f.unlink()
        assume(not f.exists() or f.read_bytes().strip() != data.strip())   # JSON white space is no damage
        before = snapshot(scratch)
        argv = base_argv(command, world, scratch)
        argv[1] = str(model)
        line = refused(argv, capsys)
        assert "model" in line
        assert snapshot(scratch) == before


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json"]),
       how=st.sampled_from(["truncate", "flip", "junk", "delete"]), where=st.floats(0, 1), junk=st.binary(max_size=30))
def test_resume_past_a_damaged_checkpoint_warns_and_ends_where_the_run_ended(world, name, how, where, junk, capsys):
    """The latest checkpoint damaged: --resume warns naming the file, resumes from the one before it,
    and (resume being exact) ends with the very weights the undamaged run ended with."""
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        shutil.copytree(world["run"], run)
        f = run / "checkpoints" / "step-0000004" / name
        data = f.read_bytes()
        i = int(where * (len(data) - 1))
        if how == "truncate":
            f.write_bytes(data[:i])
        elif how == "flip":
            f.write_bytes(data[:i] + bytes([data[i] ^ 0x21]) + data[i + 1:])
        elif how == "junk":
            f.write_bytes(junk)
        else:
            f.unlink()
        assume(not f.exists() or f.read_bytes().strip() != data.strip())
        capsys.readouterr()
        assert main(pretrain_args(world["corpus"], run) + ["--resume"]) == 0
        out, err = capsys.readouterr()
        warnings = [l for l in err.splitlines() if ": warning: " in l]
        if name == "trainer_state.json" and how == "delete":
            assert warnings and "step-0000004" in warnings[0]
        else:
            assert len(warnings) == 1 and str(f) in warnings[0], err
        assert "resumed from step 2" in out
        assert (run / "model" / "model.safetensors").read_bytes() == \
            (world["run"] / "model" / "model.safetensors").read_bytes()
