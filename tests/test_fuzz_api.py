"""Fuzzing the public Python API with bad values (wrong types, ranges, NaN and infinity, empty and
binary files, damaged checkpoints): each one must be a ValueError naming the argument or file, and
must leave every file as it was."""
import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import numlm
from numlm.data import Tokenizer, TokenStream, read_texts
from numlm.decoding import generate
from numlm.gradchecking import gradcheck
from numlm.models import GPT2LMHeadModel
from numlm.models.gpt import GPT2Config
from numlm.ops import layernorm_forward
from numlm.optim import Adam, AdamW
from numlm.train import Trainer, TrainConfig, CheckpointError, CheckpointWarning

V = 24
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

NAN, INF = float("nan"), float("inf")
# values that are wrong for every count and every rate: non-finite, negative, or not a number at all
ALWAYS_BAD = [NAN, INF, -INF, -1, -0.5, "1", None, True, [1], np.float64(NAN)]
always_bad = st.one_of(st.sampled_from(ALWAYS_BAD),
                       st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not math.isfinite(v) or v < 0))


def tiny_gpt(seed=0):
    cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    return GPT2LMHeadModel(cfg, seed=seed)


MODEL = tiny_gpt().eval()


# ---- generate -------------------------------------------------------------------------------------------
BAD_GENERATE = {
    "temperature": [NAN, INF, -1.0, 0.0, "1", None, True],
    "top_p": [NAN, 0.0, 1.5, -INF, "0.9", None],
    "top_k": [0, -3, 2.5, "5", True],
    "repetition_penalty": [NAN, 0.0, -1.0, INF, None],
    "length_penalty": [NAN, INF, -INF, "1", None],
    "pad_token_id": [-1, V, 10 ** 9, 1.5, "0", True],
    "eos_token_id": [-1, 1.5, "x", [2, -5]],
    "seed": [-1, 1.5, "0", True],
    "rng": [0, "rng", np.random.RandomState(0)],
    "attention_mask": [np.array([[1, 2, 1]]), np.array([[0.5, 1, 1]]), np.array([["a", "b", "c"]]),
                       np.array([[1, 1]]), np.array([[0, 0, 0]])],
    "max_new_tokens": [0, -1, 2.5, NAN, "3"],
    "num_beams": [0, -1, 1.5, NAN],
    "do_sample": ["yes", 1, None],
    "input_ids": [[[1.5, 2.0]], [[V, 1]], [[-1, 2]], [[]], "abc", [[1, 2], [3]]],
}


@FEW
@given(arg=st.sampled_from(sorted(BAD_GENERATE)), data=st.data(), beams=st.sampled_from([1, 2]),
       sample=st.booleans())
def test_generate_refuses_bad_arguments_by_name(arg, data, beams, sample):
    value = data.draw(st.sampled_from(BAD_GENERATE[arg]))
    kw = dict(max_new_tokens=3, num_beams=beams, do_sample=sample, seed=0, pad_token_id=0)
    kw[arg] = value
    ids = kw.pop("input_ids", [[1, 2, 3]])
    name = arg if arg != "input_ids" else "input_ids"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=name):
            generate(MODEL, ids, **kw)


def test_length_penalty_nan_in_beam_search_is_refused():
    """Before: beam search with length_penalty=nan returned the prompt alone."""
    with pytest.raises(ValueError, match="length_penalty must be a finite number, got nan"):
        generate(MODEL, [[1, 2, 3]], max_new_tokens=3, num_beams=2, length_penalty=NAN, pad_token_id=0)


def test_greedy_with_a_sampling_argument_warns():
    with pytest.warns(UserWarning, match=r"do_sample is False, so temperature=0.7, top_p=0.9 only matter when "
                                         r"sampling"):
        out = generate(MODEL, [[1, 2, 3]], max_new_tokens=2, temperature=0.7, top_p=0.9, pad_token_id=0)
    with pytest.warns(UserWarning, match=r"do_sample is False, so top_k=5 only matters when sampling"):
        generate(MODEL, [[1, 2, 3]], max_new_tokens=2, top_k=5, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(out, generate(MODEL, [[1, 2, 3]], max_new_tokens=2, pad_token_id=0))


# ---- TrainConfig, optimizers, ops, gradcheck --------------------------------------------------------------
TRAIN_FIELDS = ["max_steps", "grad_accum", "lr", "weight_decay", "eps", "warmup", "clip", "eval_every",
                "save_every", "keep_last", "log_every", "betas[0]", "betas[1]"]


@FEW
@given(field=st.sampled_from(TRAIN_FIELDS), value=always_bad)
def test_train_config_refuses_bad_numbers_by_name(field, value):
    if field.startswith("betas"):
        betas = [0.9, 0.999]
        betas[int(field[6])] = value
        cfg = TrainConfig(betas=tuple(betas))
    else:
        cfg = TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        cfg.validate()


@FEW
@given(field=st.sampled_from(["lr", "eps", "weight_decay", "betas"]), value=always_bad, decoupled=st.booleans())
def test_optimizer_refuses_bad_hyperparameters_by_name(field, value, decoupled):
    params = {"w": np.zeros(3)}
    kw = {field: (value, 0.999) if field == "betas" else value}
    with pytest.raises(ValueError, match=field):
        (AdamW if decoupled else Adam)(params, **kw)


@FEW
@given(eps=st.one_of(always_bad, st.just(0.0), st.just(-1e-12)))
def test_layernorm_refuses_a_bad_eps(eps):
    """Before: eps <= 0 gave all-NaN output on constant rows."""
    x = np.ones((2, 4))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        layernorm_forward(x, np.ones(4), np.zeros(4), eps=eps)


def square_forward(x, w):
    return x * x * w, (x, w)


def square_backward(dy, cache):
    x, w = cache
    return 2 * x * w * dy, x * x * dy


@FEW
@given(arg=st.sampled_from(["eps", "max_entries", "seed"]), data=st.data())
def test_gradcheck_refuses_bad_arguments_by_name(arg, data):
    """Before: max_entries=0 reported a perfect score having checked nothing; eps=0 divided by zero."""
    bad = {"eps": ALWAYS_BAD + [0.0], "max_entries": [0, -1, 1.5, True, "2", NAN], "seed": [-1, 1.5, "0", None]}
    value = data.draw(st.sampled_from(bad[arg]))
    x = np.random.default_rng(0).standard_normal((2, 3))
    with pytest.raises(ValueError, match=arg):
        gradcheck(square_forward, (x, x + 1), square_backward, **{arg: value})


def test_gradcheck_refuses_a_backward_with_too_few_gradients_and_an_empty_check():
    x = np.random.default_rng(0).standard_normal((2, 3))
    with pytest.raises(ValueError, match=r"backward returned 1 gradient\(s\) for 2 floating-point input\(s\) \(x, w\)"):
        gradcheck(square_forward, (x, x + 1), lambda dy, c: square_backward(dy, c)[0])
    with pytest.raises(ValueError, match="nothing to check"):
        gradcheck(lambda ids: (ids * 2, None), (np.arange(3),), lambda dy, c: ())
    assert max(gradcheck(square_forward, (x, x + 1), square_backward, max_entries=1).values()) < 1e-8


# ---- tokenizer trainer and corpora -------------------------------------------------------------------------
@FEW
@given(texts=st.lists(st.sampled_from(["", " ", "\n", "\t \n"]), max_size=4), kind=st.sampled_from(["bpe", "wordpiece"]))
def test_tokenizer_trainer_refuses_a_corpus_without_text(texts, kind):
    train = Tokenizer.train_bpe_from_iterator if kind == "bpe" else Tokenizer.train_wordpiece_from_iterator
    with pytest.raises(ValueError, match="texts is empty"):
        train(texts, 300)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=64), suffix=st.sampled_from([".txt", ".md"]))
def test_corpus_file_is_read_strictly(data, suffix):
    """A named file: valid UTF-8 without NUL bytes is read exactly, as Python's text mode reads it (line
    ends as LF, no byte-order mark); anything else is refused, naming the file (and the byte offset of a
    bad byte). Nothing is ever replaced by U+FFFD."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / f"doc{suffix}"
        f.write_bytes(data)
        try:
            text = data.decode("utf-8")
            ok = "\0" not in text
        except UnicodeDecodeError as e:
            ok, offset = False, e.start
        if ok:
            text = f.read_text(encoding="utf-8-sig")  # Python's text mode: universal newlines
        if ok and text.strip():
            got = read_texts(f, strip_md=False)
            assert got == [text]
        else:
            with pytest.raises(ValueError) as err:
                read_texts(f)
            msg = str(err.value)
            assert str(f) in msg
            if b"\0" in data:
                assert f"NUL byte at offset {data.index(0)}" in msg
            elif not ok:
                assert f"at offset {offset}" in msg
        assert f.read_bytes() == data


@settings(max_examples=15, deadline=None)
@given(data=st.binary(min_size=1, max_size=32).filter(lambda b: b"\0" in b))
def test_binary_file_in_a_folder_is_skipped_with_a_warning(data):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "a.txt").write_text("real text")
        (Path(d) / "b.txt").write_bytes(data)
        with pytest.warns(UserWarning, match=r"b.txt' is a binary file \(NUL byte at offset"):
            assert read_texts(d) == ["real text"]


# ---- damaged checkpoints -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz-run")
    cfg = TrainConfig(out_dir=str(out), max_steps=2, save_every=1, keep_last=5, log_every=1, progress=False,
                      warmup=1, eval_every=10)
    Trainer(tiny_gpt(), stream(), cfg).run()
    return out


def stream():
    return TokenStream(np.random.default_rng(1).integers(0, V, 400), 8, 2, rng=np.random.default_rng(0))


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json"]),
       how=st.sampled_from(["truncate", "flip", "replace", "delete"]), where=st.floats(0, 1), junk=st.binary(max_size=40))
def test_a_damaged_checkpoint_is_named_and_the_one_before_it_is_used(run_dir, name, how, where, junk):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        shutil.copytree(run_dir / "checkpoints", out / "checkpoints")
        f = out / "checkpoints" / "step-0000002" / name
        data = f.read_bytes()
        i = min(int(where * len(data)), len(data) - 1)
        if how == "truncate":
            f.write_bytes(data[:i])
        elif how == "flip":
            f.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:])
        elif how == "replace":
            f.write_bytes(junk)
        else:
            f.unlink()
        before = snapshot(out)
        t = Trainer(tiny_gpt(seed=5), stream(), TrainConfig(out_dir=str(out), max_steps=2, warmup=1,
                                                            progress=False))
        with pytest.raises(ValueError) as err:   # named explicitly: refused, naming the checkpoint
            t.resume(out / "checkpoints" / "step-0000002")
        assert "step-0000002" in str(err.value)
        assert snapshot(out) == before
        with pytest.warns(CheckpointWarning, match="step-0000002"):
            assert t.resume() == 1


# ---- models --------------------------------------------------------------------------------------------------
BAD_MODEL_INPUTS = {
    "input_ids": [np.array([[1.5, 2, 3]]), np.array([[V, 2, 3]]), np.array([[-1, 2, 3]]), np.zeros((1, 0), int),
                  "abc", np.ones((1, 40), int), [[1, 2], [3]]],
    "attention_mask": [np.array([[1, 2, 1]]), np.array([[1, np.nan, 1]]), np.array([[1, 1]])],
    "labels": [np.array([[V, 1, 1]]), np.array([[1.5, 1, 1]]), np.array([[1, 1]])],
    "position_ids": [np.array([[0, 1, 99]]), np.array([[0, -2, 1]])],
}


@FEW
@given(arg=st.sampled_from(sorted(BAD_MODEL_INPUTS)), data=st.data(), arch=st.sampled_from(["gpt2", "bert"]))
def test_models_refuse_bad_inputs(arg, data, arch):
    from numlm.models import BertForPreTraining
    from numlm.models.bert import BertConfig
    model = MODEL if arch == "gpt2" else BertForPreTraining(
        BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                   max_position_embeddings=16), seed=0)
    kw = {"input_ids": np.array([[1, 2, 3]]), arg: data.draw(st.sampled_from(BAD_MODEL_INPUTS[arg]))}
    with pytest.raises(ValueError):
        model(**kw)
