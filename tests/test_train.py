"""The training loop: bit-exact resume, atomic checkpoints, divergence, accumulation, metrics."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from numlm.data import TokenStream
from numlm.models import GPT2LMHeadModel, BertForPreTraining
from numlm.models.gpt import GPT2Config
from numlm.train import (Trainer, TrainConfig, TrainingDiverged, latest_checkpoint, list_checkpoints,
                         load_checkpoint)
from numlm.optim import AdamW

V, T, B = 40, 12, 3


def tiny_gpt(seed=0, dtype="float32", dropout=0.1):
    cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(cfg, seed=seed).astype(dtype)


def stream(seed=0):
    tokens = np.random.default_rng(123).integers(0, V, 2000)
    return TokenStream(tokens, T, B, rng=np.random.default_rng(seed))


def config(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), max_steps=8, lr=1e-2, warmup=2, schedule="cosine", save_every=3,
                eval_every=4, keep_last=5, log_every=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def snapshot(trainer):
    opt = trainer.optimizer.state_dict()
    return ({k: v.copy() for k, v in trainer.model.parameters().items()},
            {k: v.copy() for k, v in opt["exp_avg"].items()}, {k: v.copy() for k, v in opt["exp_avg_sq"].items()})


def assert_identical(a, b):
    for da, db in zip(a, b):
        assert da.keys() == db.keys()
        for k in da:
            assert np.array_equal(da[k], db[k]), k


class Interrupting:
    """A stream that raises KeyboardInterrupt (as Ctrl-C would) when asked for batch number `at`."""

    def __init__(self, inner, at):
        self.inner, self.at, self.n = inner, at, 0

    def next_batch(self):
        self.n += 1
        if self.n == self.at:
            raise KeyboardInterrupt
        return self.inner.next_batch()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)


def test_interrupt_and_resume_is_bit_exact(tmp_path):
    full = Trainer(tiny_gpt(), stream(), config(tmp_path / "full"))
    full.run()
    # Ctrl-C during step 6: a checkpoint of step 5 is written, then a fresh process resumes
    cut = Trainer(tiny_gpt(), Interrupting(stream(), at=6), config(tmp_path / "cut"))
    res = cut.run()
    assert res["interrupted"] and res["step"] == 5
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000005"
    again = Trainer(tiny_gpt(seed=99), stream(seed=7), config(tmp_path / "cut"))
    assert again.resume() == 5
    again.run()
    assert again.step == full.step == 8
    assert_identical(snapshot(full), snapshot(again))


def test_resume_bit_exact_for_bert_with_grad_accumulation(tmp_path):
    from numlm.models.bert import BertConfig
    from numlm.recipes import PairStream
    from numlm.data import NSPPair

    class Tok:  # the ids a tokenizer would give
        cls_id, sep_id, pad_id, mask_id, vocab_size, special_ids = 1, 2, 0, 3, V, {0, 1, 2, 3}
    rng = np.random.default_rng(5)
    pairs = [NSPPair(list(rng.integers(4, V, rng.integers(2, 5))), list(rng.integers(4, V, rng.integers(2, 5))),
                     int(rng.integers(0, 2))) for _ in range(20)]
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=20, max_position_embeddings=16)

    def run(out, stop_at=None):
        s = PairStream(pairs, Tok, 4, 12, np.random.default_rng(1))
        tr = Trainer(BertForPreTraining(cfg, seed=3), s if stop_at is None else Interrupting(s, stop_at),
                     config(out, max_steps=6, grad_accum=2))
        tr.run()
        return tr

    full = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=7)   # micro-batch 7 is in step 4: resumes from step 3
    s = PairStream(pairs, Tok, 4, 12, np.random.default_rng(1))
    again = Trainer(BertForPreTraining(cfg, seed=8), s, config(tmp_path / "b", max_steps=6, grad_accum=2))
    assert again.resume() == 3
    again.run()
    assert_identical(snapshot(full), snapshot(again))


def test_killed_mid_checkpoint_write_keeps_previous(tmp_path):
    """A process killed (os._exit) after writing part of checkpoint 4: checkpoint 2 still loads."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import numlm.train as train
        from test_train import tiny_gpt, stream, config
        from pathlib import Path
        real = train.save_file
        def dying(tensors, path, *a, **k):
            real(tensors, path, *a, **k)
            if "step-0000004" in path:
                os._exit(17)    # killed half-way: model and optimizer written, state not yet, no rename
        train.save_file = dying
        t = train.Trainer(tiny_gpt(), stream(), config(Path({str(tmp_path)!r}), max_steps=6, save_every=2))
        t.run()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 17, r.stderr
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-0000002"]
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert leftovers, "the half-written checkpoint should sit under its temporary name"
    model = tiny_gpt(seed=5)
    opt = AdamW(model.parameters())
    state = load_checkpoint(tmp_path / "checkpoints" / "step-0000002", model, opt)
    assert state["step"] == 2
    # and the run resumes from it, ending where an uninterrupted run ends
    again = Trainer(tiny_gpt(seed=5), stream(), config(tmp_path, max_steps=6, save_every=2))
    assert again.resume() == 2
    again.run()
    full = Trainer(tiny_gpt(), stream(), config(tmp_path / "full", max_steps=6, save_every=2))
    full.run()
    assert_identical(snapshot(full), snapshot(again))


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    t = Trainer(tiny_gpt(), stream(), config(tmp_path, max_steps=4, save_every=2))
    t.run()
    before = {p.name: (p / "model.safetensors").read_bytes() for p in list_checkpoints(tmp_path)}
    t2 = Trainer(tiny_gpt(), stream(), config(tmp_path, max_steps=8, save_every=2))
    t2.resume()
    t2.model.parameters()["transformer.wte.weight"][:] = np.nan
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        t2.run()
    after = {p.name: (p / "model.safetensors").read_bytes() for p in list_checkpoints(tmp_path)}
    assert after == before


def test_resume_refuses_other_architecture_and_touches_nothing(tmp_path):
    Trainer(tiny_gpt(), stream(), config(tmp_path, max_steps=2, save_every=2)).run()
    ck = latest_checkpoint(tmp_path)
    stamp = {f.name: f.read_bytes() for f in ck.iterdir()}
    from numlm.models.bert import BertConfig
    bert = BertForPreTraining(BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16, max_position_embeddings=16))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        Trainer(bert, stream(), config(tmp_path)).resume()
    assert {f.name: f.read_bytes() for f in ck.iterdir()} == stamp


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    """Two micro-batches of B equal one batch of 2B when every batch has the same token count."""
    tokens = np.random.default_rng(3).integers(0, V, 500)
    big = TokenStream(tokens, T, 2 * B, rng=np.random.default_rng(0))
    batch = big.next_batch()

    class Fixed:
        def __init__(self, batches):
            self.batches, self.i = batches, 0

        def next_batch(self):
            self.i += 1
            return self.batches[(self.i - 1) % len(self.batches)]

        def state_dict(self):
            return {}

    halves = [{k: v[:B] for k, v in batch.items()}, {k: v[B:] for k, v in batch.items()}]
    a = Trainer(tiny_gpt(dtype="float64", dropout=0.0), Fixed([batch]),
                config(tmp_path / "a", max_steps=1, warmup=1, clip=0))
    b = Trainer(tiny_gpt(dtype="float64", dropout=0.0), Fixed(halves),
                config(tmp_path / "b", max_steps=1, warmup=1, clip=0, grad_accum=2))
    a.train_step()
    b.train_step()
    for k, v in a.model.parameters().items():
        np.testing.assert_allclose(b.model.parameters()[k], v, rtol=1e-12, atol=1e-14, err_msg=k)
    for k, g in a.model.grad_arrays().items():  # the gradients too: Adam's step hides a scale
        np.testing.assert_allclose(b.model.grad_arrays()[k], g, rtol=1e-10, atol=1e-14, err_msg=k)


def test_metrics_and_evaluation_logged(tmp_path):
    calls = []

    def evaluate(model):
        calls.append(model.training)
        return {"val_loss": 1.5}
    t = Trainer(tiny_gpt(), stream(), config(tmp_path, max_steps=8, eval_every=4, log_every=2), evaluate=evaluate)
    res = t.run()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in train_rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    assert res["val_loss"] == 1.5 and res["tokens"] == 8 * B * T
    # the loss actually falls on this learnable stream (repeated random tokens memorised)


def test_training_lowers_the_loss(tmp_path):
    tokens = np.tile(np.arange(V), 50)  # a perfectly predictable sequence
    s = TokenStream(tokens, T, B, rng=np.random.default_rng(0))
    t = Trainer(tiny_gpt(dropout=0.0), s, config(tmp_path, max_steps=60, lr=1e-2, warmup=5))
    t.run()
    losses = [r["loss"] for r in t.history if "loss" in r]
    assert losses[-1] < 0.4 * losses[0]


def test_bad_train_config():
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0).validate()
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="triangle").validate()


def test_loss_curve_png_written_when_matplotlib_is_there(tmp_path, monkeypatch):
    from numlm.train import plot_metrics
    t = Trainer(tiny_gpt(), stream(), config(tmp_path, max_steps=4, eval_every=2, log_every=1),
                evaluate=lambda m: {"val_loss": 3.0})
    t.run()
    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_metrics(tmp_path) is None and not png.exists()


@pytest.mark.parametrize("field, value", [
    ("clip", float("nan")), ("clip", -1.0), ("lr", float("inf")), ("lr", float("nan")), ("lr", 0.0),
    ("weight_decay", float("nan")), ("eps", 0.0), ("eps", float("inf")), ("betas", (0.9, float("nan"))),
    ("betas", (1.0, 0.999)), ("betas", (0.9,)), ("warmup", -1), ("warmup", 1.5), ("max_steps", True),
    ("grad_accum", 0), ("keep_last", "2"), ("log_every", float("nan")), ("progress", "yes"), ("out_dir", ""),
])
def test_train_config_checks_every_number(field, value):
    """TrainConfig(clip=nan) used to switch clipping off; every field now names its bad value."""
    with pytest.raises(ValueError, match=field.split("[")[0]):
        TrainConfig(**{field: value}).validate()


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_and_no_temp_folder(tmp_path, monkeypatch):
    import errno
    import numlm.train as train
    from numlm.train import CheckpointError
    real = train.save_file

    def full(tensors, path, *a, **k):
        if "step-0000004" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(train, "save_file", full)
    t = Trainer(tiny_gpt(), stream(), config(tmp_path, max_steps=6, save_every=2))
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step-0000004'.*No space left on device; "
                                              r"step-0000002 is intact"):
        t.run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002"]
    monkeypatch.undo()
    again = Trainer(tiny_gpt(seed=4), stream(), config(tmp_path, max_steps=6, save_every=2))
    assert again.resume() == 2
    again.run()
    full_run = Trainer(tiny_gpt(), stream(), config(tmp_path / "full", max_steps=6, save_every=2))
    full_run.run()
    assert_identical(snapshot(full_run), snapshot(again))


@pytest.mark.parametrize("damage", ["truncated weights", "truncated optimizer", "bad json", "no data key",
                                    "bad generator", "one flipped byte"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(damage, tmp_path):
    from numlm.train import CheckpointError, CheckpointWarning
    Trainer(tiny_gpt(), stream(), config(tmp_path, max_steps=4, save_every=2)).run()
    ck = tmp_path / "checkpoints" / "step-0000004"
    state = json.loads((ck / "trainer_state.json").read_text())
    if damage == "truncated weights":
        (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:50])
    elif damage == "truncated optimizer":
        (ck / "optimizer.safetensors").write_bytes(b"")
    elif damage == "one flipped byte":  # a weight changed, the file still parses: the checksum catches it
        b = bytearray((ck / "model.safetensors").read_bytes())
        b[-3] ^= 0x10
        (ck / "model.safetensors").write_bytes(bytes(b))
    elif damage == "bad json":
        (ck / "trainer_state.json").write_text('{"step": 4, ')
    else:  # consistent checksums: the deeper checks must catch it
        from numlm.train import _state_hash
        if damage == "no data key":
            del state["data"]
        else:
            state["generators"] = {"rng": {"bit_generator": "PCG64", "state": "x"}}
        state["state_sha256"] = _state_hash(state)
        (ck / "trainer_state.json").write_text(json.dumps(state))
    t = Trainer(tiny_gpt(seed=3), stream(), config(tmp_path, max_steps=4, save_every=2))
    with pytest.warns(CheckpointWarning, match="step-0000004.*resuming from the checkpoint before it"):
        assert t.resume() == 2
    with pytest.raises(CheckpointError, match="step-0000004"):   # named explicitly: refused, naming it
        Trainer(tiny_gpt(), stream(), config(tmp_path, max_steps=4)).resume(ck)


def test_parameters_that_are_not_finite_are_never_checkpointed(tmp_path):
    t = Trainer(tiny_gpt(), stream(), config(tmp_path, max_steps=4, save_every=2))
    real = t.optimizer.step

    def blow_up(grads, lr=None):
        real(grads, lr=lr)
        if t.step == 3:   # the update of step 4 overflows
            t.model.parameters()["lm_head.weight" if "lm_head.weight" in t.model.parameters()
                                 else "transformer.wte.weight"][0, 0] = np.inf
    t.optimizer.step = blow_up
    with pytest.raises(TrainingDiverged, match=r"is not finite after the update at step 4; stopping \(the latest "
                                               r"checkpoint, .*step-0000002', is intact\)"):
        t.run()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002"]


def test_reuse_freed_memory_keeps_large_arrays_paged_in():
    """After reuse_freed_memory(), allocating and freeing the same 8 MB array again and again touches
    no new page: the heap keeps it (a trim threshold lost to the C int conversion had glibc give it
    back at every free, 2,048 faults per allocation)."""
    code = textwrap.dedent("""
        import resource, sys
        import numpy as np
        from numlm.train import reuse_freed_memory
        if not reuse_freed_memory():
            sys.exit(3)
        np.ones(1 << 21, np.float32)  # 8 MB, paged in once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            np.ones(1 << 21, np.float32)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if p.returncode == 3:
        pytest.skip("not glibc: mallopt is not there")
    assert p.returncode == 0, p.stderr
    assert int(p.stdout) < 2048, f"{p.stdout.strip()} page faults for 20 allocations of 8 MB"
