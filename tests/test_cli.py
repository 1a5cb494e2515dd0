"""The `numlm` command: one-line errors, nothing deleted before a run is certain to start, strict
corpora, exact resume after a real Ctrl-C."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numlm.cli import main



def base(corpus, out, arch="gpt2", steps=4):
    return ["pretrain", "--arch", arch, "--size", "tiny", "--data", str(corpus), "--vocab-size", "300",
            "--out", str(out), "--block-size", "16", "--batch-size", "4", "--steps", str(steps)]


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err, command):
    """The error is stderr's last line, and its only error line (progress bars and warnings may precede it)."""
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"numlm {command}: error: "), err
    assert sum(": error: " in l for l in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(base(corpus, out)) == 0
    return out


# ---- --overwrite checks everything first; a used folder needs --resume or --overwrite ----------
@pytest.mark.parametrize("bad", [["--data", "/no/such/corpus"], ["--batch-size", "0"], ["--lr", "nan"],
                                 ["--config", "/no/such/config.json"], ["--config", "BAD_HEADS"],
                                 ["--resume"]])
def test_overwrite_validates_every_argument_before_deleting(bad, finished_run, corpus, tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 300, "n_positions": 32,
                                                   "n_embd": 18, "n_layer": 1, "n_head": 4}))
    bad = [str(tmp_path / "bad.json") if b == "BAD_HEADS" else b for b in bad]
    before = files(finished_run)
    args = base(corpus, finished_run) + ["--overwrite"] + bad
    assert main(args) == 2
    one_error_line(capsys.readouterr().err, "pretrain")
    assert files(finished_run) == before


def test_a_folder_left_by_a_failed_run_needs_resume_or_overwrite(corpus, tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    assert main(base(corpus, tmp_path)) == 2
    line = one_error_line(capsys.readouterr().err, "pretrain")
    assert "already holds a run (metrics.jsonl)" in line
    assert main(base(corpus, tmp_path) + ["--resume"]) == 2
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'
    assert main(base(corpus, tmp_path) + ["--overwrite"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4] and all(r.get("loss") != 9.0 for r in rows)


def test_bert_resume_refuses_a_changed_batch_or_block_size(corpus, tmp_path, capsys):
    assert main(base(corpus, tmp_path, arch="bert", steps=2)) == 0
    before = files(tmp_path)
    for flag, value, was in (("--batch-size", "8", "4"), ("--block-size", "24", "16")):
        args = base(corpus, tmp_path, arch="bert", steps=2) + ["--resume"]
        args[args.index(flag) + 1] = value
        assert main(args) == 2
        line = one_error_line(capsys.readouterr().err, "pretrain")
        assert f"was trained with {flag} {was}, not {value}" in line
    assert files(tmp_path) == before


# ---- corpora: strict UTF-8, --encoding, binary files ------------------------------------------------
def test_latin1_corpus_refused_with_file_and_offset_then_read_with_encoding(tmp_path, capsys):
    f = tmp_path / "latin.txt"
    f.write_bytes(("caf\u00e9 au lait " * 200).encode("latin-1"))
    tok = tmp_path / "tok.json"
    for cmd in (["tokenizer", "train", "--vocab-size", "300", "--out", str(tok), "--data", str(f)],
                ["pretrain", "--size", "tiny", "--vocab-size", "300", "--out", str(tmp_path / "r"), "--data", str(f)]):
        assert main(cmd) == 2
        line = one_error_line(capsys.readouterr().err, " ".join(cmd[:2]) if cmd[0] == "tokenizer" else cmd[0])
        assert f"{str(f)!r} is not valid utf-8: byte 0xe9 at offset 3" in line
    assert not tok.exists() and not (tmp_path / "r").exists()
    assert main(["tokenizer", "train", "--vocab-size", "300", "--out", str(tok), "--data", str(f),
                 "--encoding", "latin-1"]) == 0
    from numlm.data import Tokenizer
    t = Tokenizer.from_file(tok)
    assert t.decode(t.encode("caf\u00e9", add_special_tokens=False)) == "caf\u00e9"
    assert "\ufffd" not in "".join(t.backend.get_vocab())
    assert main(["prepare", "--tokenizer", str(tok), "--data", str(f), "--out", str(tmp_path / "t.bin")]) == 2
    assert "byte 0xe9 at offset 3" in capsys.readouterr().err
    assert main(["prepare", "--tokenizer", str(tok), "--data", str(f), "--out", str(tmp_path / "t.bin"),
                 "--encoding", "nope"]) == 2
    assert "unknown text encoding 'nope'" in capsys.readouterr().err


def test_binary_file_skipped_in_a_folder_refused_by_name(corpus, tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    for p in sorted(corpus.iterdir())[:5]:
        (d / p.name).write_bytes(p.read_bytes())
    (d / "program.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--vocab-size", "300", "--out", str(tok), "--data", str(d)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"numlm tokenizer train: warning: {str(d / 'program.txt')!r} is a binary file "
                   "(NUL byte at offset 7), not text; skipped"]
    assert main(["tokenizer", "train", "--vocab-size", "300", "--out", str(tmp_path / "tok2.json"), "--data",
                 str(d / "program.txt")]) == 2
    line = one_error_line(capsys.readouterr().err, "tokenizer train")
    assert "is a binary file (NUL byte at offset 7)" in line


def test_empty_string_corpus_refused_by_the_tokenizer_trainer():
    from numlm.data import Tokenizer
    for texts in ([""], ["", " \n"]):
        with pytest.raises(ValueError, match="texts is empty"):
            Tokenizer.train_bpe_from_iterator(texts, 300)
        with pytest.raises(ValueError, match="texts is empty"):
            Tokenizer.train_wordpiece_from_iterator(texts, 300)


# ---- numbers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["eval", "M", "--batches", "-1"], "argument --batches: must be an integer >= 1, got '-1'"),
    (["eval", "M", "--batches", "0"], "argument --batches: must be an integer >= 1, got '0'"),
    (["pretrain", "--lr", "inf"], "argument --lr: must be a finite number in (0, inf), got 'inf'"),
    (["pretrain", "--lr", "nan"], "argument --lr: must be a finite number in (0, inf), got 'nan'"),
    (["pretrain", "--minutes", "-1"], "argument --minutes: must be a finite number in (0, 1e+09), got '-1'"),
    (["demo", "--minutes", "0"], "argument --minutes: must be a finite number in (0, 1e+09), got '0'"),
    (["generate", "M", "--prompt", "a", "--top-p", "nan"], "argument --top-p: must be a finite number in (0, 1], got 'nan'"),
])
def test_cli_numbers_checked(args, message, capsys):
    assert main(args) == 2
    assert one_error_line(capsys.readouterr().err, args[0]) == f"numlm {args[0]}: error: {message}"


def test_eval_api_refuses_zero_validation_batches():
    from numlm.recipes import GPTData
    with pytest.raises(ValueError, match="val_batches must be an integer >= 1, got 0"):
        GPTData(np.arange(500) % 7, None, 8, 2, 0, val_batches=0)


# ---- every error is one line ---------------------------------------------------------------------------
def test_errors_of_any_type_are_one_line_and_debug_shows_the_traceback(corpus, finished_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["tokenizer", "train", "--vocab-size", "300", "--data", str(corpus), "--out", str(a_file / "t.json")],
         "tokenizer train", str(a_file)),
        (base(corpus, tmp_path / "r") + ["--config", str(tmp_path / "missing.json")], "pretrain", "missing.json"),
        (base(corpus, a_file), "pretrain", "is a file, not a folder"),
    ]
    for args, cmd, want in cases:
        assert main(args) == 2
        assert want in one_error_line(capsys.readouterr().err, cmd)
    assert main(["--debug"] + cases[0][0]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("numlm tokenizer train: error:")


def test_damaged_latest_checkpoint_falls_back_with_a_warning(corpus, tmp_path, capsys):
    assert main(base(corpus, tmp_path, steps=4)) == 0          # checkpoints at steps 2 and 4
    capsys.readouterr()
    latest = tmp_path / "checkpoints" / "step-0000004"
    (latest / "optimizer.safetensors").write_bytes((latest / "optimizer.safetensors").read_bytes()[:100])
    assert main(base(corpus, tmp_path, steps=4) + ["--resume"]) == 0
    out, err = capsys.readouterr()
    warn = [l for l in err.splitlines() if ": warning: " in l]
    assert warn == [f"numlm pretrain: warning: {str(latest / 'optimizer.safetensors')!r} is damaged: its content "
                    "does not match the checksum in trainer_state.json; resuming from the checkpoint before it"]
    assert "resumed from step 2" in out
    # every checkpoint damaged: refused, naming the files
    for ck in (tmp_path / "checkpoints").iterdir():
        (ck / "trainer_state.json").write_text("{not json")
    assert main(base(corpus, tmp_path, steps=4) + ["--resume"]) == 2
    assert "trainer_state.json" in one_error_line(capsys.readouterr().err, "pretrain")


def test_diverged_training_is_one_line(corpus, tmp_path, capsys):
    assert main(base(corpus, tmp_path, steps=3) + ["--lr", "1e30"]) == 2
    line = one_error_line(capsys.readouterr().err, "pretrain")
    assert "at step" in line and "stopping" in line


# ---- a real Ctrl-C ---------------------------------------------------------------------------------------
STEPS = 40  # evaluation every 8 steps, a checkpoint every 20


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref")
    assert main(base(corpus, ref, steps=STEPS)) == 0
    return ref


@pytest.mark.parametrize("step,where", [(5, "step"), (8, "update"), (16, "evaluate"), (20, "update")])
def test_sigint_at_a_given_step_then_resume_equals_an_uninterrupted_run(step, where, corpus, uninterrupted,
                                                                         tmp_path):
    """A real SIGINT the process sends itself at a chosen point (tests/interrupt_at.py): as a step
    begins, right after an update (8: an evaluation follows), as an evaluation begins, at a save step."""
    steps, ref = STEPS, uninterrupted
    out = tmp_path / "cut"
    cmd = [sys.executable, str(Path(__file__).parent / "interrupt_at.py"), str(step), where]
    cmd += base(corpus, out, steps=steps)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and f"interrupted at step {step};" in stdout, stderr
    assert not (out / "model").exists()  # an interrupted run is not a finished one
    assert main(base(corpus, out, steps=steps) + ["--resume"]) == 0
    assert (out / "model" / "model.safetensors").read_bytes() == (ref / "model" / "model.safetensors").read_bytes()
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    ref_rows = [json.loads(l) for l in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss")) for r in rows] == [(r["step"], r.get("loss")) for r in ref_rows]


def test_the_readme_documents_the_exit_codes_the_command_returns(capsys):
    """0 finished, 1 a check failed, 2 bad input, 130 interrupted (tests/test_recipes.py sends the
    signals), 141 the reader went away (tests/test_generate_cli.py): the README's table lists exactly
    these, and the command returns them."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = "\n".join(readme[readme.index("**Exit codes**"):].split("\n\n")[:2])  # the item and its table
    codes = {int(row.split("|")[1]) for row in table.splitlines() if row.strip().startswith("| ") and
             row.split("|")[1].strip().isdigit()}
    assert codes == {0, 1, 2, 130, 141}
    assert "Ctrl-C or SIGTERM" in table
    assert main(["gradcheck"]) == 0
    assert main(["gradcheck", "--break", "linear"]) == 1
    assert main(["gradcheck", "--seed", "-1"]) == 2
    capsys.readouterr()


def test_paths_under_a_file_and_folders_are_named_for_what_they_are(corpus, tmp_path, capsys):
    """Was "File exists" (a parent of --out is a file) and "does not exist" (--tokenizer is a folder)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--vocab-size", "300", "--data", str(corpus), "--out", str(tok)]) == 0
    capsys.readouterr()
    cases = [(["tokenizer", "train", "--vocab-size", "300", "--data", str(corpus), "--out", str(a_file / "t.json")],
              "tokenizer train", f"{str(a_file)!r} is a file, not a folder"),
             (["prepare", "--tokenizer", str(tok), "--data", str(corpus), "--out", str(a_file / "sub" / "t.bin")],
              "prepare", f"{str(a_file)!r} is a file, so"),
             (["prepare", "--tokenizer", str(tmp_path), "--data", str(corpus), "--out", str(tmp_path / "t.bin")],
              "prepare", f"{str(tmp_path)!r} is a folder, not a tokenizer.json file")]
    for args, cmd, want in cases:
        assert main(args) == 2
        assert want in one_error_line(capsys.readouterr().err, cmd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "tok.json"]


def test_tokenizer_train_replaces_a_tokenizer_only_with_overwrite(corpus, tmp_path, capsys):
    """Was: --out naming a model's folder replaced its tokenizer.json (and its config) silently."""
    model = tmp_path / "model"
    assert main(["tokenizer", "train", "--vocab-size", "300", "--data", str(corpus), "--out", str(model)]) == 0
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    assert set(before) == {"tokenizer.json", "tokenizer_config.json"}
    capsys.readouterr()
    assert main(["tokenizer", "train", "--vocab-size", "280", "--data", str(corpus), "--out", str(model)]) == 2
    line = one_error_line(capsys.readouterr().err, "tokenizer train")
    assert "already holds tokenizer.json and tokenizer_config.json" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert main(["tokenizer", "train", "--vocab-size", "280", "--data", str(corpus), "--out", str(model),
                 "--overwrite"]) == 0
    assert (model / "tokenizer.json").read_bytes() != before["tokenizer.json"]
