"""Training and checkpoints: a refused resume changes nothing, a resume never silently changes the
optimisation settings, and a failed or killed checkpoint write leaves a clear error and no clutter."""
import numpy as np
import pytest

from numlm.data import TokenStream
from numlm.models import GPT2LMHeadModel
from numlm.models.gpt import GPT2Config
from numlm.train import Trainer, TrainConfig

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

