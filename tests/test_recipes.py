"""Pre-training recipes and the numlm command, end to end on a small corpus."""
import json
from pathlib import Path

import numpy as np
import pytest

from numlm.cli import main
from numlm.recipes import pretrain



def quiet(*a, **k):
    pass


@pytest.mark.parametrize("arch", ["gpt2", "openai-gpt", "bert"])
def test_pretrain_runs_and_lowers_loss(arch, corpus, tmp_path):
    model, tok, res = pretrain(arch, size="tiny", data=corpus, vocab_size=300, out_dir=tmp_path, block_size=32,
                               batch_size=4, steps=30, lr=3e-3, seed=0, log=quiet, progress=False)
    assert res["val_loss"] < res["initial"]["val_loss"] - 0.5
    d = tmp_path / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in d.iterdir()}
    from numlm import from_pretrained
    again = from_pretrained(d)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[k], v)


def test_pretrain_in_float64_trains_and_saves_float64(corpus, tmp_path):
    """dtype="float64": the weights are float64 from the start and stay so, in memory and on disk,
    and the training moved them off float32's grid."""
    from safetensors.numpy import load_file
    model, _, _ = pretrain("gpt2", size="tiny", data=corpus, vocab_size=300, out_dir=tmp_path, block_size=16,
                           batch_size=2, steps=2, seed=0, dtype="float64", log=quiet, progress=False)
    params = model.parameters()
    assert all(v.dtype == np.float64 for v in params.values())
    assert any(np.any(v.astype(np.float32) != v) for v in params.values())
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert saved and all(v.dtype == np.float64 for v in saved.values())


def test_eval_command_matches_training_eval(corpus, tmp_path, capsys):
    pretrain("gpt2", size="tiny", data=corpus, vocab_size=300, out_dir=tmp_path, block_size=16, batch_size=4,
             steps=5, log=quiet, progress=False)
    assert main(["eval", str(tmp_path / "model"), "--data", str(corpus), "--block-size", "16",
                 "--batch-size", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert np.isfinite(out["val_loss"]) and abs(out["val_ppl"] - np.exp(out["val_loss"])) < 1e-6 * out["val_ppl"]


def test_cli_resume_continues(corpus, tmp_path, capsys):
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--data", str(corpus), "--vocab-size", "300",
            "--out", str(tmp_path), "--block-size", "16", "--batch-size", "4", "--steps", "6"]
    assert main(args) == 0
    first = last_json(capsys.readouterr().out)
    assert main(args + ["--resume"]) == 0   # already at max_steps: resumes and stops at once
    second = last_json(capsys.readouterr().out)
    assert first["step"] == second["step"] == 6
    assert second["tokens"] == first["tokens"]


def last_json(text):
    return json.loads(text[text.rindex("\n{") + 1:] if "\n{" in text else text[text.index("{"):])


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/corpus"], "does not exist"),
    (["--arch", "gpt2", "--block-size", "100", "--size", "tiny", "--config", "CFG_SMALL_POS"], "position table"),
    (["--config", "CFG_BAD_HEADS"], "multiple of n_head"),
])
def test_pretrain_bad_input(args, message, corpus, tmp_path, capsys):
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 300, "n_positions": 32, "n_embd": 16,
                                 "n_layer": 1, "n_head": 2}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 300, "n_positions": 32, "n_embd": 18,
                               "n_layer": 1, "n_head": 4}))
    args = [{"CFG_SMALL_POS": str(small), "CFG_BAD_HEADS": str(bad)}.get(a, a) for a in args]
    if "--data" not in args:
        args += ["--data", str(corpus)]
    code = main(["pretrain", "--out", str(tmp_path / "run"), "--vocab-size", "300", "--steps", "2"] + args)
    assert code == 2
    assert message in capsys.readouterr().err


def test_tokenizer_vocab_mismatch_refused(corpus, tmp_path, capsys):
    assert main(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "350", "--data", str(corpus),
                 "--out", str(tmp_path / "tok.json")]) == 0
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 300, "n_positions": 32, "n_embd": 16,
                               "n_layer": 1, "n_head": 2}))
    code = main(["pretrain", "--config", str(cfg), "--tokenizer", str(tmp_path / "tok.json"), "--data",
                 str(corpus), "--out", str(tmp_path / "run"), "--block-size", "16", "--steps", "2"])
    assert code == 2 and "vocab_size" in capsys.readouterr().err


def test_resume_with_other_arch_refused_and_checkpoint_untouched(corpus, tmp_path, capsys):
    base = ["pretrain", "--size", "tiny", "--data", str(corpus), "--vocab-size", "300", "--out", str(tmp_path),
            "--block-size", "16", "--batch-size", "4", "--steps", "2"]
    assert main(base + ["--arch", "gpt2"]) == 0
    ck = sorted((tmp_path / "checkpoints").iterdir())
    stamp = {f: f.read_bytes() for c in ck for f in c.iterdir()}
    assert main(base + ["--arch", "bert", "--resume"]) == 2
    assert "GPT2LMHeadModel" in capsys.readouterr().err
    assert {f: f.read_bytes() for c in ck for f in c.iterdir()} == stamp


def test_empty_corpus_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "empty" in err or "no text" in err


def test_gradcheck_command(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    worst = float(out.strip().splitlines()[-1].split()[2])
    assert worst < 1e-7


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_130(corpus, tmp_path, sig):
    """A real SIGINT (Ctrl-C) or SIGTERM (timeout, schedulers) to a running `numlm pretrain`, sent by the
    process itself after step 23's update (tests/interrupt_at.py, no timing): it writes a checkpoint of
    that step, says so, exits 130 and writes no model/ as if it had finished; --resume continues."""
    import os
    import subprocess
    import sys
    out = tmp_path / "run"
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--data", str(corpus), "--vocab-size", "300",
            "--out", str(out), "--block-size", "16", "--batch-size", "4", "--steps", "100000"]
    cmd = [sys.executable, str(Path(__file__).parent / "interrupt_at.py"), "23", "update", sig] + args
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stdout and "--resume continues the run" in stderr.splitlines()[-1]
    step = int(stdout.split("interrupted at step ")[1].split(";")[0])
    ck = out / "checkpoints" / f"step-{step:07d}"
    assert (ck / "model.safetensors").is_file() and (ck / "trainer_state.json").is_file()
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == step == 23
    assert not (out / "model").exists()
    args[args.index("--steps") + 1] = str(step + 2)
    assert main(args + ["--resume"]) == 0 and (out / "model" / "model.safetensors").is_file()


def test_prepare_command_streams_a_folder_and_leaves_nothing_on_error(corpus, tmp_path, capsys):
    from numlm.data import Tokenizer, load_tokens, read_texts
    tok_path = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "300", "--data", str(corpus),
                 "--out", str(tok_path)]) == 0
    out = tmp_path / "tokens.bin"
    assert main(["prepare", "--tokenizer", str(tok_path), "--data", str(corpus), "--out", str(out)]) == 0
    tok = Tokenizer.from_file(tok_path)
    expected = [i for d in read_texts(corpus) for i in tok.encode(d, add_special_tokens=False) + [tok.eos_id]]
    np.testing.assert_array_equal(load_tokens(out), expected)
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.bin"
    assert main(["prepare", "--tokenizer", str(tok_path), "--data", str(tmp_path / "empty"), "--out", str(bad)]) == 2
    assert "no text" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad.bin*"))


def test_fresh_run_into_an_earlier_run_is_refused_unless_overwrite(corpus, tmp_path, capsys):
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--data", str(corpus), "--vocab-size", "300",
            "--out", str(tmp_path), "--block-size", "16", "--batch-size", "4", "--steps", "4"]
    assert main(args) == 0
    ck = tmp_path / "checkpoints" / "step-0000004"
    stamp = (ck / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args[:-1] + ["2"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (ck / "model.safetensors").read_bytes() == stamp
    assert main(args[:-1] + ["2", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2


def test_overwrite_with_a_tokenizer_of_ones_own_leaves_no_earlier_tokenizer_config(corpus, tmp_path):
    """A run that trained its tokenizer wrote tokenizer.json and tokenizer_config.json; --overwrite with
    --tokenizer removed the first and left the second, the earlier tokenizer's settings with no tokenizer."""
    run, tok = tmp_path / "run", tmp_path / "tok.json"
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--data", str(corpus), "--out", str(run),
            "--block-size", "16", "--batch-size", "4", "--steps", "1"]
    assert main(args + ["--vocab-size", "300"]) == 0
    assert (run / "tokenizer.json").is_file() and (run / "tokenizer_config.json").is_file()
    assert main(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "280", "--data", str(corpus),
                 "--out", str(tok)]) == 0
    assert main(args + ["--tokenizer", str(tok), "--overwrite"]) == 0
    assert not (run / "tokenizer.json").exists() and not (run / "tokenizer_config.json").exists()
    assert main(args + ["--tokenizer", str(run / "model" / "tokenizer.json"), "--overwrite"]) == 0
    assert (run / "model" / "tokenizer_config.json").is_file()  # the input's own pair is kept


def test_special_ids_come_from_the_tokenizer():
    """A 300-token GPT-2 takes bos/eos from its tokenizer, not GPT-2's 50256; BERT takes its pad."""
    from types import SimpleNamespace
    from numlm.recipes import make_config
    tok = SimpleNamespace(vocab_size=300, eos_id=7, pad_id=3)
    gpt = make_config("gpt2", "tiny", 300, 32, tokenizer=tok)
    assert (gpt.bos_token_id, gpt.eos_token_id, gpt.pad_token_id) == (7, 7, None)
    assert make_config("bert", "tiny", 300, 32, tokenizer=tok).pad_token_id == 3
    assert make_config("gpt2", "tiny", 300, 32).eos_token_id is None  # 50256 does not fit 300 tokens


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_refuses_another_tokenizer_corpus_batch_or_fewer_steps(corpus, tmp_path, capsys):
    """Each of these continued silently (another tokenizer was trained, the data re-tokenized)."""
    run = tmp_path / "run"
    base = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--out", str(run), "--block-size", "16"]
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--vocab-size", "300", "--data", str(corpus), "--out", str(tok)]) == 0
    other_tok = tmp_path / "other.json"
    assert main(["tokenizer", "train", "--vocab-size", "280", "--data", str(corpus), "--out", str(other_tok)]) == 0
    other = tmp_path / "other-corpus"
    other.mkdir()
    for f in sorted(corpus.iterdir())[:-3]:
        (other / f.name).write_bytes(f.read_bytes())
    same = ["--data", str(corpus), "--tokenizer", str(tok), "--batch-size", "4"]
    assert main(base + same + ["--steps", "4"]) == 0
    before = snapshot(run)
    cases = [(["--data", str(corpus), "--batch-size", "4", "--steps", "6"], "pass that --tokenizer again"),
             (["--data", str(corpus), "--tokenizer", str(other_tok), "--batch-size", "4", "--steps", "6"],
              "the tokenizer differs from the checkpoint's"),
             (["--data", str(other), "--tokenizer", str(tok), "--batch-size", "4", "--steps", "6"],
              "the data differs from the checkpoint's"),
             (same + ["--steps", "2"], "the checkpoint is at step 4, beyond the 2 steps asked for"),
             (["--data", str(corpus), "--tokenizer", str(tok), "--batch-size", "8", "--steps", "6"], "--batch-size")]
    capsys.readouterr()
    for args, message in cases:
        assert main(base + args + ["--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert snapshot(run) == before
    # a change that is meant
    assert main(base + ["--data", str(other), "--tokenizer", str(tok), "--batch-size", "4", "--steps", "6",
                        "--resume", "--allow-changes"]) == 0
    assert "resumed from step 4" in capsys.readouterr().out


def test_pretrain_out_under_a_file_and_bad_flags_before_anything(corpus, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="out: '.*a_file' is a file, so '.*run' cannot be a folder"):
        pretrain("gpt2", size="tiny", data=corpus, out_dir=tmp_path / "a_file" / "run", log=quiet)
    for kw, message in (({"progress": "no"}, "progress must be True or False"), ({"lr": float("inf")}, "lr must be"),
                        ({"allow_changes": 1}, "allow_changes must be True or False")):
        with pytest.raises(ValueError, match=message):
            pretrain("gpt2", size="tiny", data=corpus, out_dir=tmp_path / "r", log=quiet, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_resume_without_steps_keeps_the_runs_own_length(corpus, tmp_path, capsys):
    """`--resume` without --steps continued to the default 300 steps under another cosine schedule; it
    now ends where the run it continues ends, bit for bit (the run is cut back to its step-3
    checkpoint, as an interrupt after step 3 leaves it)."""
    import shutil
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--data", str(corpus), "--vocab-size", "300",
            "--out", str(tmp_path), "--block-size", "16", "--batch-size", "4"]
    assert main(args + ["--steps", "6"]) == 0
    whole = (tmp_path / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "model")
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000006")
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 3" in out and last_json(out)["step"] == 6
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == whole


def test_bert_data_with_no_masked_token_is_one_line_and_writes_nothing(corpus, tmp_path, capsys):
    """Text the tokenizer reads as [UNK] only (never masked) gives no masked-LM target: eval failed
    with 'ZeroDivisionError: float division by zero', and pretrain too, after it had written its folder."""
    import numlm
    from numlm.data import Tokenizer
    from numlm.recipes import eval_bert
    tok_path = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--kind", "wordpiece", "--vocab-size", "300", "--data", str(corpus),
                 "--out", str(tok_path)]) == 0
    tok = Tokenizer.from_file(tok_path)
    docs = ["日本\n語", "中文\n字", "漢\n字"]
    assert {i for d in docs for i in tok.encode(d, add_special_tokens=False)} == {tok.unk_id}
    model = numlm.BertForPreTraining(numlm.BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=32), seed=0)
    with pytest.raises(ValueError, match="drew no masked token"):
        eval_bert(model, docs, tok, 16, 2, seed=0)
    data = tmp_path / "cjk.txt"
    data.write_text("\n".join(docs) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["pretrain", "--arch", "bert", "--size", "tiny", "--data", str(data), "--tokenizer", str(tok_path),
                 "--out", str(tmp_path / "run"), "--block-size", "16", "--batch-size", "2", "--steps", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if ": warning: " not in line]
    assert len(err) == 1 and "drew no masked token" in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, was, now", [("--seed", "0", "5"), ("--vocab-size", "300", "280")])
def test_resume_with_another_seed_or_vocab_size_is_refused_by_name(flag, was, now, corpus, tmp_path, capsys):
    """--seed picks BERT's validation documents and NSP pairs and a model's first weights: a resume
    under another seed went on silently with the checkpoint's draws (GPT), or was refused for a
    'split of N tokens' the user never set (BERT). Another --vocab-size went on silently with the
    run's tokenizer."""
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--data", str(corpus), "--vocab-size", "300",
            "--out", str(tmp_path), "--block-size", "16", "--batch-size", "4", "--steps", "2"]
    assert main(args) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(args[:-1] + ["4", "--resume", flag, now]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"trained with {flag} {was}, not {now}" in err, err
    assert snapshot(tmp_path) == before
    assert main(args[:-1] + ["4", "--resume", flag, now, "--allow-changes"]) == 0


def test_resume_without_vocab_size_keeps_the_runs_own(corpus, tmp_path):
    """--vocab-size defaulted to 8192, so a run trained with --vocab-size 300 and resumed without the
    flag was refused as 'trained with --vocab-size 300, not 8192'."""
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--data", str(corpus), "--out", str(tmp_path),
            "--block-size", "16", "--batch-size", "4", "--steps"]
    assert main(args + ["2", "--vocab-size", "300"]) == 0
    assert main(args + ["4", "--resume"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "step" in r) == 4
    from numlm.data import Tokenizer
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").vocab_size == 300


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_eval_block_size_beyond_the_models_positions_is_named(arch, corpus, tmp_path, capsys):
    """eval's default --block-size 128 on a model of 64 positions failed inside the model ('sequence
    length 128 ... exceeds n_positions 64'), naming no flag."""
    pretrain(arch, size="tiny", data=corpus, vocab_size=300, out_dir=tmp_path, block_size=16, batch_size=4,
             steps=1, log=quiet, progress=False)
    from numlm import from_pretrained
    cfg = from_pretrained(tmp_path / "model").config
    positions = cfg.max_position_embeddings if arch == "bert" else cfg.n_positions
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "model"), "--data", str(corpus), "--block-size", str(positions + 1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--block-size {positions + 1} is above the model's {positions} positions" in err
    assert main(["eval", str(tmp_path / "model"), "--data", str(corpus), "--block-size", str(positions)]) == 0


def test_documents_of_one_sentence_each_warn_that_nsp_has_one_label(corpus, tmp_path):
    """Documents (or the runs of lines a small corpus is cut into) of one line each give NSP pairs
    that are all label 1: training reported an NSP accuracy of 1 and said nothing."""
    import warnings
    from numlm.data import Tokenizer, read_texts
    from numlm.recipes import BertData, NSPWarning
    docs = read_texts(corpus)
    tok = Tokenizer.train_wordpiece_from_iterator(docs, 300)
    single = [line for d in docs[:12] for line in d.splitlines()[:1]]
    with pytest.warns(NSPWarning, match="one sentence .* each: every NSP pair's B is a random sentence"):
        data = BertData(single, tok, 32, 4, seed=0)
    assert {p.label for p in data.pairs} == {1}
    with warnings.catch_warnings():
        warnings.simplefilter("error", NSPWarning)
        data = BertData(docs, tok, 32, 4, seed=0)
    assert {p.label for p in data.pairs} == {0, 1}


def test_a_resumed_run_labels_its_first_evaluation_with_its_step(corpus, tmp_path, capsys):
    """A resumed run printed its model's validation at the checkpoint as 'before training'."""
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--data", str(corpus), "--vocab-size", "300",
            "--out", str(tmp_path), "--block-size", "16", "--batch-size", "4", "--steps", "2"]
    assert main(args) == 0
    assert "before training: val_loss" in capsys.readouterr().out
    assert main(args[:-1] + ["3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "at step 2 (resumed): val_loss" in out and "before training" not in out


def test_resume_refuses_another_model_config_or_dtype_by_name(corpus, tmp_path, capsys):
    """A --config of the same shapes but another activation and dropout resumed silently, the model
    changed under the checkpoint's optimizer; another --dtype failed on an optimizer moment's dtype.
    The saved model's own config.json (extra keys and all) is the same config."""
    import json as json_
    args = ["pretrain", "--arch", "gpt2", "--data", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "run"),
            "--block-size", "16", "--batch-size", "4"]
    assert main(args + ["--size", "tiny", "--steps", "2"]) == 0
    cfg = json_.loads((tmp_path / "run" / "model" / "config.json").read_text())
    other = tmp_path / "relu.json"
    other.write_text(json_.dumps({**cfg, "activation_function": "relu", "resid_pdrop": 0.5}))
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    for extra, message in ((["--config", str(other)], "the model config differs from the checkpoint's"),
                           (["--size", "tiny", "--dtype", "float64"], "trained with --dtype float32, not float64")):
        assert main(args + extra + ["--steps", "3", "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert snapshot(tmp_path / "run") == before
    assert main(args + ["--config", str(tmp_path / "run" / "model" / "config.json"), "--steps", "3", "--resume"]) == 0


def test_a_long_run_checkpoints_every_few_hundred_steps(tmp_path):
    """As the README says; a run of 10,000 steps saved its first checkpoint at step 5,000 (half of
    --steps), so a process killed outright (out of memory, a lost machine) lost up to 5,000 steps."""
    from numlm.recipes import _train_config
    for steps in (300, 10_000, 1_000_000):
        cfg = _train_config(tmp_path, "gpt2", "tiny", steps, None, None, None, None, False, 1)
        assert 1 <= cfg.save_every <= 200 and cfg.save_every <= steps // 2
    assert _train_config(tmp_path, "gpt2", "tiny", 10_000, None, None, None, 50, False, 1).save_every == 50


def test_calibrated_steps_count_every_micro_batch(monkeypatch):
    """calibrate_steps timed one micro-batch per step: with --grad-accum 4 a --minutes run took four
    times its budget. A clock that moves 1 s per reading makes the count deterministic."""
    import itertools
    from numlm import recipes
    from numlm.data import TokenStream
    from numlm.models import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2), seed=0)
    stream = TokenStream(np.arange(400) % 50, 8, 2, rng=np.random.default_rng(0))
    clock = itertools.count()
    monkeypatch.setattr(recipes.time, "perf_counter", lambda: float(next(clock)))
    steps = {k: recipes.calibrate_steps(model, stream, next(clock) + 10_000, log=lambda *a: None, grad_accum=k)
             for k in (1, 4)}
    assert steps[1] > 100 and abs(4 * steps[4] - steps[1]) <= 8, steps
