"""Ctrl-C at every phase of a training step: the checkpoint it leaves is the state after the last
completed step, so a resumed run ends bit-for-bit where an uninterrupted one ends, and
metrics.jsonl holds every step once."""
import json
import os
import signal

import numpy as np
import pytest

import numlm.optim as optim
import numlm.train as train
from numlm.data import TokenStream, NSPPair
from numlm.models import GPT2LMHeadModel, BertForPreTraining
from numlm.models.bert import BertConfig
from numlm.models.gpt import GPT2Config
from numlm.recipes import PairStream
from numlm.train import Trainer, TrainConfig, latest_checkpoint

V = 40
STEPS = 6


def gpt_run():
    cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    tokens = np.random.default_rng(123).integers(0, V, 2000)
    return GPT2LMHeadModel(cfg, seed=0), TokenStream(tokens, 12, 3, rng=np.random.default_rng(0)), 1


class Tok:  # the ids a BERT tokenizer would give
    cls_id, sep_id, pad_id, mask_id, vocab_size, special_ids = 1, 2, 0, 3, V, {0, 1, 2, 3}


def bert_run():
    rng = np.random.default_rng(5)
    pairs = [NSPPair(list(rng.integers(4, V, rng.integers(2, 5))), list(rng.integers(4, V, rng.integers(2, 5))),
                     int(rng.integers(0, 2))) for _ in range(20)]
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=20, max_position_embeddings=16)
    return BertForPreTraining(cfg, seed=3), PairStream(pairs, Tok, 4, 12, np.random.default_rng(1)), 2


RUNS = {"gpt2": gpt_run, "bert": bert_run}


def evaluate(model):
    """A validation loss on a fixed batch (its own Generator, as the recipes' validation data)."""
    ids = np.random.default_rng(9).integers(4, V, (2, 8))
    kw = {"labels": ids} if isinstance(model, GPT2LMHeadModel) else {"labels": ids, "next_sentence_label": np.array([0, 1])}
    return {"val_loss": float(model(ids, **kw).loss)}


def trainer(kind, out, model=None, stream=None):
    m, s, accum = RUNS[kind]()
    cfg = TrainConfig(out_dir=str(out), max_steps=STEPS, lr=1e-2, warmup=2, save_every=2, eval_every=2,
                      keep_last=10, log_every=1, progress=False, grad_accum=accum)
    return Trainer(model or m, stream or s, cfg, evaluate=evaluate)


def final_state(t):
    opt = t.optimizer.state_dict()
    return ({k: v.copy() for k, v in t.model.parameters().items()}, opt["exp_avg"], opt["exp_avg_sq"])


_full = {}


def full_run(kind, tmp_path_factory):
    if kind not in _full:
        t = trainer(kind, tmp_path_factory.mktemp(f"full-{kind}"))
        t.run()
        _full[kind] = (final_state(t), [(r["step"], r.get("loss"), r.get("val_loss")) for r in t.history])
    return _full[kind]


def interrupt(how):
    if how == "signal":  # what Ctrl-C does: SIGINT to this process
        os.kill(os.getpid(), signal.SIGINT)
    elif how == "kernel":  # Ctrl-C inside a Numba call: the dispatcher wraps it in a SystemError
        raise SystemError("CPUDispatcher(kernel) returned a result with an exception set") from KeyboardInterrupt()
    else:                # a KeyboardInterrupt raised in the code itself
        raise KeyboardInterrupt


class Hooks:
    """Interrupt on the n-th call of one phase of the training step."""

    def __init__(self, t, phase, how, monkeypatch, n):
        self.calls, self.n, self.how = 0, n, how
        if phase == "optimizer update":  # a few parameters into the update of step 3
            self.n = 2 * len(t.model.parameters()) + 3

        def fire():
            self.calls += 1
            if self.calls == self.n:
                interrupt(how)

        def wrap(fn, before=False):
            def inner(*a, **k):
                if phase == "forward" and not t.model.training:  # evaluation's forwards do not count
                    return fn(*a, **k)
                if before:
                    fire()
                out = fn(*a, **k)
                if not before:
                    fire()
                return out
            return inner

        if phase == "data drawn":
            t.stream.next_batch = wrap(t.stream.next_batch)
        elif phase == "forward":
            t.model.forward = wrap(t.model.forward, before=True)
        elif phase == "backward":
            t.model.backward = wrap(t.model.backward)
        elif phase == "clipping":
            monkeypatch.setattr(train, "clip_grad_norm", wrap(train.clip_grad_norm))
        elif phase == "optimizer update":  # after a few of the parameters were updated
            monkeypatch.setattr(optim, "adam_update", wrap(optim.adam_update))
            monkeypatch.setattr(optim, "_adam_update_numba", wrap(optim._adam_update_numba))
        elif phase == "evaluation":
            t.evaluate = wrap(t.evaluate, before=True)
        elif phase == "checkpoint writing":  # the optimizer file is written, the rest not yet
            monkeypatch.setattr(train, "save_file", wrap(train.save_file))
        else:
            raise AssertionError(phase)


PHASES = ["data drawn", "forward", "backward", "clipping", "optimizer update", "evaluation", "checkpoint writing"]
CALL = {"data drawn": 5, "forward": 5, "backward": 6, "clipping": 4, "optimizer update": 30,
        "evaluation": 2, "checkpoint writing": 2}


@pytest.mark.parametrize("how", ["signal", "exception", "kernel"])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_interrupt_at_every_phase_resumes_bit_exactly(kind, phase, how, tmp_path, tmp_path_factory, monkeypatch):
    (weights, m, v), full_rows = full_run(kind, tmp_path_factory)
    t = trainer(kind, tmp_path)
    hooks = Hooks(t, phase, how, monkeypatch, CALL[phase])
    res = t.run()
    assert hooks.calls >= hooks.n and res["interrupted"]
    monkeypatch.undo()
    ck = latest_checkpoint(tmp_path)
    if phase == "optimizer update" and how == "exception":
        # parameters half-updated: nothing is saved, the previous checkpoint is the resume point
        assert res["saved"] is False and int(ck.name[5:]) < res["step"] + 1
    else:
        assert int(ck.name[5:]) == res["step"]
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == int(ck.name[5:])
    again = trainer(kind, tmp_path, model=RUNS[kind]()[0].__class__(t.model.config, seed=77))
    again.resume()
    again.run()
    assert again.step == STEPS
    for a, b in zip((weights, m, v), final_state(again)):
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows] == full_rows  # each step once, in order
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_drops_metrics_rows_after_the_checkpoint(tmp_path):
    """A run killed (no checkpoint at its last steps) leaves rows beyond the checkpoint: resuming drops
    them, so no step appears twice; a torn last line is dropped too."""
    t = trainer("gpt2", tmp_path)
    t.cfg.save_every = 4
    t.cfg.max_steps = 5   # checkpoint at 4, then step 5 logged and a final checkpoint we remove
    t.run()
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000005")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    again = trainer("gpt2", tmp_path)
    assert again.resume() == 4
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 4
    again.run()
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_fresh_trainer_refuses_a_folder_with_an_earlier_runs_metrics(tmp_path):
    """A run that failed before its first checkpoint left metrics.jsonl: a fresh run never appends to it."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    t = trainer("gpt2", tmp_path)
    with pytest.raises(ValueError, match="earlier run.*metrics.jsonl"):
        t.run()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'
    assert not (tmp_path / "checkpoints").exists()


def test_resuming_a_finished_run_adds_no_rows(tmp_path):
    """Ctrl-C after the last step (while the final model is saved), then --resume: nothing repeats."""
    trainer("gpt2", tmp_path).run()
    rows = (tmp_path / "metrics.jsonl").read_text()
    again = trainer("gpt2", tmp_path)
    assert again.resume() == STEPS
    res = again.run()
    assert (tmp_path / "metrics.jsonl").read_text() == rows and "val_loss" in res
