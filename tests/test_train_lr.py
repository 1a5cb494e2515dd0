"""The learning rate the Trainer hands the optimizer at every step, against the schedule written out
here (transformers' lr_lambda formulas) and numlm.optim's: warmup, decay, accumulation, resume."""
import json
import math

import numpy as np
import pytest

from numlm.data import TokenStream
from numlm.models import GPT2LMHeadModel
from numlm.models.gpt import GPT2Config
from numlm.optim import AdamW, get_schedule
from numlm.train import Trainer, TrainConfig

V, T, B, LR, WARMUP, STEPS = 30, 8, 2, 0.1, 3, 10


def factor(name, t):
    """transformers' get_*_schedule_with_warmup lr_lambda at optimizer step t (0-based)."""
    if name == "constant":
        return 1.0
    if t < WARMUP:
        return t / WARMUP
    if name == "constant_with_warmup":
        return 1.0
    p = (t - WARMUP) / (STEPS - WARMUP)
    return max(0.0, 1 - p) if name == "linear" else max(0.0, 0.5 * (1 + math.cos(math.pi * p)))


class Recording(AdamW):
    """AdamW that notes the lr of each update."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.seen = []

    def step(self, grads, lr=None):
        self.seen.append(lr)
        return super().step(grads, lr=lr)


class Stopping:
    """A stream that raises KeyboardInterrupt when asked for batch number `at` (Ctrl-C)."""

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


def trainer(tmp_path, schedule, grad_accum=1, stop_at=None):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=8, n_layer=1, n_head=2), seed=0)
    s = TokenStream(np.random.default_rng(1).integers(0, V, 500), T, B, rng=np.random.default_rng(0))
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=STEPS, lr=LR, warmup=WARMUP, schedule=schedule,
                      grad_accum=grad_accum, save_every=100, eval_every=100, log_every=1, progress=False)
    return Trainer(model, Stopping(s, stop_at) if stop_at else s, cfg,
                   optimizer=Recording(model.parameters(), lr=LR))


@pytest.mark.parametrize("schedule,grad_accum", [("linear", 1), ("linear", 2), ("cosine", 2),
                                                 ("constant_with_warmup", 1), ("constant", 1)])
def test_the_lr_of_every_step_is_the_schedule_at_that_step(schedule, grad_accum, tmp_path):
    tr = trainer(tmp_path, schedule, grad_accum)
    tr.run()
    want = [LR * factor(schedule, t) for t in range(STEPS)]
    assert len(tr.optimizer.seen) == STEPS  # one update per grad_accum batches
    assert tr.optimizer.seen == pytest.approx(want, rel=1e-15, abs=0)
    f = get_schedule(schedule, WARMUP, STEPS)
    assert tr.optimizer.seen == [LR * f(t) for t in range(STEPS)]
    if schedule != "constant":
        assert tr.optimizer.seen[0] == 0.0 and tr.optimizer.seen[WARMUP] == LR  # warmup from 0, peak after it
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert logged == {t + 1: lr for t, lr in enumerate(tr.optimizer.seen)}  # row of step s: the lr of update s


@pytest.mark.parametrize("stop_at", [2, 5])
def test_a_resumed_run_continues_the_schedule(stop_at, tmp_path):
    cut = trainer(tmp_path, "linear", grad_accum=2, stop_at=2 * stop_at + 1)  # Ctrl-C in step stop_at + 1
    assert cut.run()["step"] == stop_at
    again = trainer(tmp_path, "linear", grad_accum=2)
    assert again.resume() == stop_at
    again.run()
    seen = cut.optimizer.seen + again.optimizer.seen
    assert seen == pytest.approx([LR * factor("linear", t) for t in range(STEPS)], rel=1e-15, abs=0)
