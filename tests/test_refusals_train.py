"""Training and checkpoints: a refused resume changes nothing, a resume never silently changes the
optimisation settings, and a failed or killed checkpoint write leaves a clear error and no clutter."""
import contextlib
import json
import resource
import shutil
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from numlm.cli import main
from numlm.data import TokenStream
from numlm.models import GPT2LMHeadModel
from numlm.models.gpt import GPT2Config
from numlm.recipes import pretrain
from numlm.train import (CheckpointError, Trainer, TrainConfig, check_resume, latest_checkpoint, read_checkpoint_state,
                         resume_settings)

V, T, B = 30, 8, 2


def gpt(seed=0):
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=8, n_layer=1, n_head=2), seed=seed)


def stream(batch_size=B, seed=0):
    tokens = np.random.default_rng(7).integers(0, V, 600)
    return TokenStream(tokens, T, batch_size, rng=np.random.default_rng(seed))


def trainer(out, steps=4, batch_size=B, **kw):
    args = dict(out_dir=str(out), max_steps=steps, lr=1e-2, warmup=1, save_every=2, eval_every=100, log_every=1,
                progress=False)
    args.update(kw)
    return Trainer(gpt(), stream(batch_size), TrainConfig(**args))


def optimizer_state(t):
    sd = t.optimizer.state_dict()
    return (sd["step"], sd["lr"], sd["betas"], sd["eps"], sd["weight_decay"], sd["param_step"],
            {k: v.copy() for k, v in sd["exp_avg"].items()}, {k: v.copy() for k, v in sd["exp_avg_sq"].items()})


def assert_same_optimizer(a, b):
    assert a[:6] == b[:6]
    for da, db in zip(a[6:], b[6:]):
        assert da.keys() == db.keys()
        for k in da:
            np.testing.assert_array_equal(da[k], db[k], err_msg=k)


# ---- A6: a refused resume changes nothing --------------------------------------------------------------
def test_a_resume_refused_by_the_stream_leaves_the_optimizer_and_stream_as_they_were(tmp_path):
    trainer(tmp_path / "a").run()
    ck = tmp_path / "a" / "checkpoints" / "step-0000004"
    t = trainer(tmp_path / "b", batch_size=B + 1)  # another batch size: the stream refuses the checkpoint
    opt, data = optimizer_state(t), t.stream.state_dict()
    with pytest.raises(ValueError, match="does not fit this run"):
        t.resume(ck)
    assert_same_optimizer(optimizer_state(t), opt)
    assert t.optimizer.step_count == 0 and not t.optimizer.exp_avg
    assert repr(t.stream.state_dict()) == repr(data)



# ---- A7, A8: a resume trains with this run's settings, and the CLI refuses a changed one ----------------
def test_a_resumed_trainer_keeps_its_own_optimizer_settings_and_records_them(tmp_path):
    trainer(tmp_path, steps=2).run()
    new = dict(weight_decay=0.5, betas=(0.5, 0.6), eps=1e-3)
    t = trainer(tmp_path, steps=4, **new)
    t.resume()
    assert (t.optimizer.weight_decay, t.optimizer.betas, t.optimizer.eps) == tuple(new.values())
    t.run()
    saved = read_checkpoint_state(latest_checkpoint(tmp_path))
    assert saved["optimizer"]["weight_decay"] == saved["train_config"]["weight_decay"] == new["weight_decay"]
    assert tuple(saved["optimizer"]["betas"]) == tuple(saved["train_config"]["betas"]) == new["betas"]
    assert saved["optimizer"]["eps"] == saved["train_config"]["eps"] == new["eps"]


def test_check_resume_names_a_changed_optimisation_setting(tmp_path):
    trainer(tmp_path, steps=2).run()
    state = read_checkpoint_state(latest_checkpoint(tmp_path))
    was = state["train_config"]
    for field, value, flag in [("lr", was["lr"] * 2, "--lr"), ("warmup", was["warmup"] + 1, "--warmup"),
                               ("grad_accum", was["grad_accum"] + 1, "--grad-accum"),
                               ("weight_decay", was["weight_decay"] * 3, "--weight-decay"),
                               ("betas", (0.5, 0.6), "betas"), ("eps", was["eps"] * 10, "eps"),
                               ("schedule", "linear", "schedule")]:
        cfg = TrainConfig(**{**was, field: value})
        with pytest.raises(ValueError) as e:
            check_resume(state, {}, 4, train=resume_settings(cfg))
        shown = tuple(was[field]) if field == "betas" else was[field]
        assert f"trained with {flag} {shown}, not {value};" in str(e.value) and "\n" not in str(e.value)
        check_resume(state, {}, 4, allow_changes=True, train=resume_settings(cfg))
    check_resume(state, {}, 4, train=resume_settings(TrainConfig(**was)))  # nothing changed


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "r"
    base = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--data", str(corpus), "--vocab-size", "300",
            "--out", str(run), "--block-size", "16", "--batch-size", "2"]
    assert main(base + ["--steps", "4", "--lr", "0.002", "--grad-accum", "2"]) == 0
    return run, base, read_checkpoint_state(latest_checkpoint(run))["train_config"]


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags, flag, field, now", [
    (["--lr", "5", "--grad-accum", "2"], "--lr", "lr", 5.0),
    (["--lr", "0.002"], "--grad-accum", "grad_accum", 1),
    (["--lr", "0.002", "--grad-accum", "2", "--warmup", "3"], "--warmup", "warmup", 3)])
def test_pretrain_resume_refuses_a_changed_lr_warmup_or_grad_accum(pretrained, capsys, flags, flag, field, now):
    run, base, was = pretrained
    before = files(run)
    capsys.readouterr()
    assert main(base + ["--steps", "6", "--resume"] + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"trained with {flag} {was[field]}, not {now};" in err, err
    assert files(run) == before


def test_pretrain_resume_with_the_same_settings_or_allow_changes_trains_with_them(pretrained, capsys):
    run, base, was = pretrained
    assert main(base + ["--steps", "6", "--resume", "--grad-accum", "2"]) == 0  # an omitted --lr: the run's
    assert read_checkpoint_state(latest_checkpoint(run))["train_config"]["lr"] == was["lr"]
    assert main(base + ["--steps", "8", "--resume", "--lr", "0.003", "--allow-changes"]) == 0
    now = read_checkpoint_state(latest_checkpoint(run))
    assert now["step"] == 8 and now["train_config"]["lr"] == now["optimizer"]["lr"] == 0.003
    assert now["train_config"]["grad_accum"] == 1


def test_pretrain_resume_without_warmup_keeps_the_runs_own(corpus, tmp_path):
    """its default follows --steps: a resume that extends the run keeps the warmup it trained with"""
    kw = dict(arch="gpt2", size="tiny", data=corpus, vocab_size=300, out_dir=tmp_path, block_size=16, batch_size=2,
              log=lambda *a: None, progress=False)
    pretrain(steps=4, warmup=3, **kw)
    pretrain(steps=20, resume=True, **kw)
    assert read_checkpoint_state(latest_checkpoint(tmp_path))["train_config"]["warmup"] == 3


# ---- B4: a write that fails inside safetensors is a CheckpointError -------------------------------------
@contextlib.contextmanager
def file_size_limit(limit):
    """Files written inside may grow to `limit` bytes; a longer write fails (EFBIG), as on a full disk.
    Only around the call: pytest's own output (a log file larger than limit) must not meet it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def test_a_checkpoint_write_failing_in_safetensors_names_the_checkpoint_and_the_intact_one(tmp_path):
    t = trainer(tmp_path, steps=4)
    t.run(max_time=0)  # one step, and its checkpoint
    first = latest_checkpoint(tmp_path)
    model_bytes = (first / "model.safetensors").stat().st_size
    assert (first / "optimizer.safetensors").stat().st_size > model_bytes + 1000  # two moments per parameter
    before = files(tmp_path / "checkpoints")
    t.train_step()
    with pytest.raises(CheckpointError) as e:
        with file_size_limit(model_bytes + 1000):  # the model fits, the optimizer's moments do not
            t.save()
    assert f"step-{t.step:07d}" in str(e.value) and f"{first.name} is intact" in str(e.value)
    assert files(tmp_path / "checkpoints") == before


# ---- B8: what a killed save left is cleared on the next save or resume ---------------------------------
@pytest.fixture
def pids():
    """(the pid of a finished process, the pid of a running one)"""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield done.pid, live.pid
    live.kill()
    live.wait()


def test_a_resume_removes_a_dead_saves_temporary_folder_and_puts_back_its_old_copy(tmp_path, pids):
    dead, live = pids
    trainer(tmp_path, steps=4).run()
    root = tmp_path / "checkpoints"
    last = root / "step-0000004"
    want = files(last)
    shutil.copytree(last, root / f".tmp-step-0000006-{dead}")   # killed before its rename
    shutil.copytree(last, root / f".tmp-step-0000004-{dead}")   # killed between the two renames of a re-save:
    last.rename(root / f".old-step-0000004-{dead}")             # step 4 exists only under its .old- name
    shutil.copytree(root / "step-0000002", root / f".tmp-step-0000008-{live}")  # a running save
    t = trainer(tmp_path, steps=6)
    assert t.resume() == 4
    assert sorted(p.name for p in root.iterdir()) == [f".tmp-step-0000008-{live}", "step-0000002", "step-0000004"]
    assert files(last) == want


def test_a_save_removes_a_dead_saves_temporary_folder(tmp_path, pids):
    dead, live = pids
    t = trainer(tmp_path, steps=4)
    t.run(max_time=0)
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "step-0000001", root / f".tmp-step-0000002-{dead}")
    shutil.copytree(root / "step-0000001", root / f".tmp-step-0000003-{live}")
    t.train_step()
    t.save()
    assert sorted(p.name for p in root.iterdir()) == [f".tmp-step-0000003-{live}", "step-0000001", "step-0000002"]


# ---- B3: a short run trains, and a warmup longer than the run is refused --------------------------------
def test_a_warmup_longer_than_the_run_is_refused():
    TrainConfig(max_steps=4, warmup=4).validate()
    with pytest.raises(ValueError) as e:
        TrainConfig(max_steps=4, warmup=5).validate()
    assert str(e.value).startswith("warmup must be at most max_steps (4), got 5") and "\n" not in str(e.value)


def test_pretrain_one_step_trains_at_the_full_rate_and_a_longer_warmup_is_one_line(corpus, tmp_path, capsys):
    base = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--data", str(corpus), "--vocab-size", "300",
            "--block-size", "16", "--batch-size", "2"]
    assert main(base + ["--out", str(tmp_path / "one"), "--steps", "1"]) == 0
    state = read_checkpoint_state(latest_checkpoint(tmp_path / "one"))
    row = next(json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
               if "lr" in json.loads(line))
    assert state["train_config"]["warmup"] == 0 and row["lr"] == state["train_config"]["lr"] > 0
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "long"), "--steps", "2", "--warmup", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warmup must be at most max_steps (2), got 3" in err, err
    assert not (tmp_path / "long").exists()


# ---- C6: the last step is saved once ---------------------------------------------------------------
@pytest.mark.parametrize("steps, save_every", [(4, 2), (5, 2)])
def test_the_final_checkpoint_is_written_once(tmp_path, steps, save_every):
    t = trainer(tmp_path, steps=steps, save_every=save_every)
    saved, save = [], t.save
    t.save = lambda: saved.append(t.step) or save()
    t.run()
    assert saved == sorted(set(range(save_every, steps + 1, save_every)) | {steps})
    assert latest_checkpoint(tmp_path).name == f"step-{steps:07d}"


# ---- C7: written files get the mode the umask gives --------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_models_and_checkpoints_are_written_with_the_umasks_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        trainer(tmp_path / "run", steps=2).run()
        gpt().save_pretrained(tmp_path / "model")
        (tmp_path / "reference").write_text("")  # what open() gives under this umask
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    written = [*(tmp_path / "run" / "checkpoints").rglob("*"), *(tmp_path / "model").iterdir()]
    assert {f.name for f in written} >= {"config.json", "model.safetensors", "optimizer.safetensors"}
    modes = {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in written if f.is_file()}
    assert modes == dict.fromkeys(modes, oct(want))
