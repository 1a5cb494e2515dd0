"""The profiler: its rows cover the step exactly, name every layer and count every op call, and
profiling changes no number. (Times themselves are never asserted.)"""
import numpy as np
import pytest

import numlm
from numlm import ops
from numlm.cli import main
from numlm.optim import AdamW
from numlm.profile import OUTSIDE, Profile, _layer_of, profile_training


def tiny_gpt(L=2):
    cfg = numlm.GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=L, n_head=2,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = numlm.GPT2LMHeadModel(cfg, seed=0, dtype="float64").train()
    ids = np.random.default_rng(0).integers(0, 40, (2, 7))
    return model, dict(input_ids=ids, labels=ids)


def tiny_bert(L=3):
    cfg = numlm.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=L, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=16,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = numlm.BertForPreTraining(cfg, seed=0, dtype="float64").train()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, (2, 9))
    labels = np.where(rng.random((2, 9)) < 0.3, ids, -100)
    labels[:, 1] = ids[:, 1]
    return model, dict(input_ids=ids, labels=labels, next_sentence_label=np.array([0, 1]))


def test_layer_of_cuts_at_the_first_list_index():
    assert _layer_of("transformer.h.3.attn.c_attn") == "transformer.h.3"
    assert _layer_of("bert.encoder.layer.11.output.dense") == "bert.encoder.layer.11"
    assert _layer_of("transformer.ln_f") == "transformer.ln_f"
    assert _layer_of("") == "(model)"


@pytest.mark.parametrize("make, L, blocks, clock", [(tiny_gpt, 2, "transformer.h.{}", "wall"),
                                                    (tiny_bert, 3, "bert.encoder.layer.{}", "cpu")])
def test_shares_sum_to_the_step_and_every_layer_appears(make, L, blocks, clock):
    model, batch = make()
    steps = 2
    prof = profile_training(model, batch, steps=steps, warmup=1, clock=clock)
    rows = prof.rows()
    total = prof.total()
    # the rows partition the phases' wall time: their sum is the step, to rounding
    assert total == pytest.approx(sum(prof.phase_time.values()), rel=1e-9)
    assert all(s >= 0 for *_, s in rows)
    assert set(prof.phase_time) == {"zero_grad", "forward", "backward", "optimizer"}
    layers = {layer for _, layer, _, _ in rows}
    for i in range(L):
        assert blocks.format(i) in layers
    # every module holding parameters is reached by forward (directly or inside its layer)
    param_layers = {_layer_of(p) for p, m in model.modules() if m.params}
    assert param_layers <= layers
    table = prof.table(steps=steps)
    for layer in param_layers:
        assert f"\n{layer} " in table
    assert OUTSIDE in table


def test_op_calls_are_counted_per_step():
    model, batch = tiny_gpt(L=2)
    prof = profile_training(model, batch, steps=3, warmup=0)
    # GPT-2: ln_1, ln_2 per block and ln_f;  one attention per block;  one cross-entropy
    assert prof.calls[("forward", "layernorm_forward")] == 3 * (2 * 2 + 1)
    assert prof.calls[("backward", "layernorm_backward")] == 3 * (2 * 2 + 1)
    assert prof.calls[("forward", "attention_forward")] == 3 * 2
    assert prof.calls[("backward", "attention_backward")] == 3 * 2
    assert prof.calls[("forward", "cross_entropy_forward")] == 3

    assert prof.calls[("forward", "gelu_tanh_forward")] == 3 * 2  # GPT-2's tanh GELU


def test_an_op_is_named_by_its_own_function():
    """BERT's erf GELU runs gelu_backward, which ops also exports as gelu_tanh_backward: the row names
    the function, not whichever alias came last"""
    model, batch = tiny_bert(L=2)
    prof = profile_training(model, batch, steps=1, warmup=0)
    calls = 2 + 1  # each layer's and the MLM head's transform
    assert prof.calls[("forward", "gelu_forward")] == calls and prof.calls[("backward", "gelu_backward")] == calls
    assert not [k for k in prof.calls if "tanh" in k[1] and "gelu" in k[1]]


def test_profiling_changes_no_number_and_uninstalls_itself():
    before = {n: getattr(ops, n) for n in dir(ops) if n.endswith(("_forward", "_backward"))}
    runs = []
    for profiled in (False, True):
        model, batch = tiny_gpt()
        opt = AdamW(model.parameters(), lr=1e-2)
        prof = Profile(model)
        for _ in range(2):
            model.zero_grad()
            if profiled:
                with prof, prof.phase("forward"):
                    loss = model(**batch).loss
                with prof, prof.phase("backward"):
                    model.backward()
            else:
                loss = model(**batch).loss
                model.backward()
            opt.step(model.grad_arrays())
        runs.append((loss, {k: v.copy() for k, v in model.parameters().items()}))
        if profiled:
            assert not any("forward" in vars(m) or "backward" in vars(m) for _, m in model.modules())
    assert runs[0][0] == runs[1][0]
    for k in runs[0][1]:
        np.testing.assert_array_equal(runs[0][1][k], runs[1][1][k])
    assert {n: getattr(ops, n) for n in before} == before
    assert numlm.nn.layers.linear_forward is ops.linear_forward


def test_nested_phases_and_unknown_clocks_are_refused():
    model, _ = tiny_gpt()
    with pytest.raises(ValueError, match="clock must be one of wall, cpu"):
        Profile(model, clock="gpu")
    prof = Profile(model)
    with pytest.raises(ValueError, match="inside phase"):
        with prof.phase("forward"), prof.phase("backward"):
            pass


def test_cli_profile_prints_every_layer(tmp_path, capsys):
    model, _ = tiny_gpt(L=2)
    model.save_pretrained(tmp_path / "m")
    assert main(["profile", str(tmp_path / "m"), "--steps", "1", "--batch", "2", "--seq", "6"]) == 0
    out = capsys.readouterr().out
    for layer in ("transformer.h.0", "transformer.h.1", "transformer.wte", "transformer.ln_f"):
        assert f"\n{layer} " in out
    assert main(["profile", str(tmp_path / "m"), "--steps", "1", "--generate", "3", "--seq", "4"]) == 0
    assert "attention_forward" in capsys.readouterr().out
    assert main(["profile", str(tmp_path / "nothing")]) == 2
    assert "neither a workload" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--batch", "0"), ("--seq", "0"), ("--top", "-1"), ("--top", "0"),
                                        ("--steps", "0"), ("--warmup", "-1"), ("--generate", "0"),
                                        ("--batch", "nan")])
def test_cli_profile_refuses_a_size_it_would_replace(tmp_path, capsys, flag, value):
    """--batch 0 and --seq 0 were replaced by the defaults, --top -1 dropped the last row, silently."""
    model, _ = tiny_gpt(L=1)
    model.save_pretrained(tmp_path / "m")
    assert main(["profile", str(tmp_path / "m"), "--steps", "1", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"numlm profile: error: argument {flag}: must be an integer")
    assert main(["profile", "gpt-mini", "--batch", "2"]) == 2
    assert "the workload gpt-mini has its own" in capsys.readouterr().err


@pytest.mark.parametrize("maker", [tiny_gpt, tiny_bert])
@pytest.mark.parametrize("extra, said", [([], "--seq 128 (the default)"), (["--seq", "17"], "--seq 17")])
def test_cli_profile_names_a_seq_beyond_the_models_positions(maker, extra, said, tmp_path, capsys):
    """A model of 16 positions failed inside its forward ('sequence length 128 ... exceeds n_positions'),
    naming no flag; the default --seq is 128."""
    model, _ = maker()
    model.save_pretrained(tmp_path / "m")
    assert main(["profile", str(tmp_path / "m"), "--steps", "1", "--batch", "1"] + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{said} is above the model's 16 positions; pass --seq 16 or less" in err, err
    assert main(["profile", str(tmp_path / "m"), "--steps", "1", "--warmup", "0", "--batch", "1", "--seq", "16"]) == 0


@pytest.mark.parametrize("kind", ["roberta", "distilbert"])
def test_cli_profile_counts_the_positions_a_roberta_or_distilbert_sequence_may_use(kind, tmp_path, capsys):
    """RoBERTa's positions count from pad_token_id + 1: of 18 rows, 16 hold tokens. profile compared --seq
    with all 18 and refused these MLM models by class name after the check."""
    if kind == "roberta":
        cfg = numlm.RobertaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=18, pad_token_id=1)
        model = numlm.RobertaForMaskedLM(cfg, seed=0)
    else:
        cfg = numlm.DistilBertConfig(vocab_size=50, dim=8, n_layers=1, n_heads=2, hidden_dim=16,
                                     max_position_embeddings=16)
        model = numlm.DistilBertForMaskedLM(cfg, seed=0)
    assert cfg.max_tokens == 16
    model.save_pretrained(tmp_path / "m")
    assert main(["profile", str(tmp_path / "m"), "--steps", "1", "--batch", "1", "--seq", "17"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seq 17 is above the model's 16 positions; pass --seq 16 or less" in err, err
    assert main(["profile", str(tmp_path / "m"), "--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "16"]) == 0
    assert f"{type(model).__name__} training step, batch 2 x 16" in capsys.readouterr().out
