"""GPT-1 / GPT-2 against transformers' own numbers (fixtures), the KV cache, loading and input checks."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from safetensors.numpy import load_file, save_file

import numlm
from numlm.kernels import set_numba
from numlm.models.gpt import (GPT2Config, OpenAIGPTConfig, GPT2Model, GPT2LMHeadModel,
                              GPT2ForSequenceClassification, GPT2DoubleHeadsModel, OpenAIGPTModel,
                              OpenAIGPTLMHeadModel, OpenAIGPTDoubleHeadsModel)

HF = Path(__file__).parent / "fixtures" / "hf"
VARIANTS = {"gpt2-tiny": GPT2LMHeadModel, "openai-gpt-tiny": OpenAIGPTLMHeadModel,
            "gpt2-tiny-seqcls": GPT2ForSequenceClassification}


def rel(a, ref):
    """max abs difference / max abs reference"""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def ref(name):
    return np.load(HF / name / "reference.npz", allow_pickle=False)


# ------------------------------------------------------------------------------------ fixtures

@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_float64_matches_transformers(name, numba):
    prev = set_numba(numba)
    try:
        r = ref(name)
        model = numlm.from_pretrained(HF / name, dtype="float64")
        assert type(model) is VARIANTS[name]
        out = model(r["input_ids"], attention_mask=r["attention_mask"], labels=r["labels"],
                    output_hidden_states=True, output_attentions=True)
        assert out.loss.dtype == np.float64 and out.logits.dtype == np.float64
        assert rel(out.logits, r["logits"]) < 1e-10
        assert abs(out.loss - r["loss"]) / abs(r["loss"]) < 1e-10
        assert len(out.hidden_states) == len(r["hidden_states"])
        for h, h_ref in zip(out.hidden_states, r["hidden_states"]):
            assert rel(h, h_ref) < 1e-10
        for a, a_ref in zip(out.attentions, r["attentions"]):
            assert rel(a, a_ref) < 1e-10
        model.zero_grad()
        model.backward()
        grads = model.gradients()
        keys = sorted(k[5:] for k in r.files if k.startswith("grad/"))
        assert sorted(grads) == keys  # every state_dict key, tied lm_head.weight included
        for k in keys:
            assert rel(grads[k], r["grad/" + k]) < 1e-10, k
    finally:
        set_numba(prev)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_float32_matches_transformers_float32(name):
    r = ref(name)
    model = numlm.from_pretrained(HF / name, dtype="float32")
    out = model(r["input_ids"], attention_mask=r["attention_mask"], labels=r["labels"])
    assert out.logits.dtype == np.float32 and out.loss.dtype == np.float32
    assert rel(out.logits, r["logits_f32"]) < 1e-5
    assert abs(float(out.loss) - float(r["loss_f32"])) / abs(float(r["loss_f32"])) < 1e-5
    if "token_logits_f32" in r.files:
        h = model.transformer(r["input_ids"], attention_mask=r["attention_mask"]).last_hidden_state
        token_logits = h @ model.state_dict()["score.weight"].T
        assert rel(token_logits, r["token_logits_f32"]) < 1e-5


def test_seqcls_pools_rightmost_non_pad_token():
    r = ref("gpt2-tiny-seqcls")
    model = numlm.from_pretrained(HF / "gpt2-tiny-seqcls", dtype="float64")
    out = model(r["input_ids"], attention_mask=r["attention_mask"], output_hidden_states=True)
    h = out.hidden_states[-1]
    token_logits = h @ model.state_dict()["score.weight"].T  # (B, T, K)
    assert rel(token_logits, r["token_logits"]) < 1e-10
    assert rel(out.logits, token_logits[np.arange(len(h)), r["pooled_index"]]) < 1e-12


def test_bare_backbone_loads_task_checkpoint():
    r = ref("gpt2-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tied lm_head is absent: nothing to warn about
        model = GPT2Model.from_pretrained(HF / "gpt2-tiny", dtype="float64")
    out = model(r["input_ids"], attention_mask=r["attention_mask"])
    assert rel(out.last_hidden_state, r["last_hidden_state"]) < 1e-10
    assert "wte.weight" in model.state_dict()
    # backward(grad) of the main output: d loss / d last_hidden_state from the reference
    model.backward(r["grad_hidden_states"][-1])
    g = model.gradients()
    assert rel(g["h.0.attn.c_attn.weight"], r["grad/transformer.h.0.attn.c_attn.weight"]) < 1e-10


def test_lm_backward_with_logits_gradient_equals_loss_backward():
    r = ref("openai-gpt-tiny")
    model = numlm.from_pretrained(HF / "openai-gpt-tiny", dtype="float64")
    out = model(r["input_ids"], attention_mask=r["attention_mask"], labels=r["labels"])
    model.zero_grad()
    model.backward()
    g_loss = model.gradients()
    # d loss / d logits written out independently: softmax - onehot over shifted, non-ignored targets
    logits, labels = out.logits, r["labels"]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    d = np.zeros_like(p)
    tgt = labels[:, 1:]
    valid = tgt != -100
    d[:, :-1][valid] = p[:, :-1][valid]
    b, t = np.nonzero(valid)
    d[b, t, tgt[b, t]] -= 1
    d /= valid.sum()
    model.zero_grad()
    model(r["input_ids"], attention_mask=r["attention_mask"])
    model.backward(d)
    g = model.gradients()
    for k in g_loss:
        assert rel(g[k], g_loss[k]) < 1e-12, k


# ------------------------------------------------------------------------------------ KV cache

def tiny(cls, seed=0, **kw):
    """A random float64 model in eval mode."""
    base = dict(vocab_size=31, n_positions=24, n_embd=16, n_layer=2, n_head=2)
    cfg_cls = OpenAIGPTConfig if "OpenAI" in cls.__name__ else GPT2Config
    return cls(cfg_cls(**{**base, **kw}), seed=seed, dtype="float64").eval()


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2 ** 16), prefill=st.integers(1, 6), left_pad=st.integers(0, 2),
       openai=st.booleans())
def test_kv_cache_steps_equal_full_forward(seed, prefill, left_pad, openai):
    cls = OpenAIGPTLMHeadModel if openai else GPT2LMHeadModel
    model = tiny(cls)
    rng = np.random.default_rng(seed)
    B, T = 2, 9
    ids = rng.integers(0, 31, (B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, :left_pad] = 0  # row 1 left-padded
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
    steps = [out.logits]
    past = out.past_key_values
    assert len(past) == 2 and past[0][0].shape == (B, 2, prefill, 8)
    for t in range(prefill, T):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits)
    inc = np.concatenate(steps, axis=1)
    real = mask.astype(bool)  # left-padded query rows differ by design (uniform over all T keys)
    assert rel(inc[real], full[real]) < 1e-12


def test_kv_cache_with_explicit_positions_and_length_check():
    model = tiny(GPT2LMHeadModel)
    ids = np.arange(12).reshape(1, 12) % 31
    pos = np.arange(12)[None] + 3
    full = model(ids, position_ids=pos).logits
    out = model(ids[:, :5], position_ids=pos[:, :5], use_cache=True)
    out2 = model(ids[:, 5:], position_ids=pos[:, 5:], past_key_values=out.past_key_values, use_cache=True)
    assert rel(np.concatenate([out.logits, out2.logits], 1), full) < 1e-12
    with pytest.raises(ValueError, match="n_positions"):
        model(np.zeros((1, 13), dtype=np.int64), past_key_values=out2.past_key_values)


# ------------------------------------------------------------------------------------ loading

def _write(path, cfg, state):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, str(path / "model.safetensors"))


def test_checkpoint_without_prefix_and_with_old_buffers(tmp_path):
    r = ref("gpt2-tiny")
    state = load_file(str(HF / "gpt2-tiny" / "model.safetensors"))
    bare = {k[len("transformer."):]: v for k, v in state.items()}
    for i in range(2):  # buffers old releases saved
        bare[f"h.{i}.attn.bias"] = np.tril(np.ones((64, 64), np.float32))[None, None]
        bare[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    cfg = json.loads((HF / "gpt2-tiny" / "config.json").read_text())
    _write(tmp_path / "bare", cfg, bare)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = numlm.from_pretrained(tmp_path / "bare", dtype="float64")
    out = model(r["input_ids"], attention_mask=r["attention_mask"], labels=r["labels"])
    assert rel(out.logits, r["logits"]) < 1e-10
    # an untied-looking checkpoint that does store lm_head.weight loads too
    state2 = dict(state, **{"lm_head.weight": state["transformer.wte.weight"]})
    _write(tmp_path / "with_head", cfg, state2)
    out2 = numlm.from_pretrained(tmp_path / "with_head", dtype="float64")(r["input_ids"])
    assert rel(out2.logits, model(r["input_ids"]).logits) < 1e-15


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_pretrained_round_trip_and_shards(tmp_path, name):
    r = ref(name)
    model = numlm.from_pretrained(HF / name, dtype="float64")
    model.save_pretrained(tmp_path / "one")
    keys = set(load_file(str(tmp_path / "one" / "model.safetensors")))
    assert "lm_head.weight" not in keys
    assert keys == set(load_file(str(HF / name / "model.safetensors")))
    model.save_pretrained(tmp_path / "shards", max_shard_bytes=20_000)
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    for d in ("one", "shards"):
        again = numlm.from_pretrained(tmp_path / d, dtype="float64")
        assert type(again) is type(model)
        a, b = again.state_dict(), model.state_dict()
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        drop = ("dtype", "architectures")  # save_pretrained writes the model's dtype and class
        assert ({k: v for k, v in again.config.to_dict().items() if k not in drop}
                == {k: v for k, v in model.config.to_dict().items() if k not in drop})
        out = again(r["input_ids"], attention_mask=r["attention_mask"])
        assert rel(out.logits, r["logits"]) < 1e-10


# config.json layouts of the hub checkpoints (field names from transformers' docs), tiny sizes
HUB_CONFIGS = {
    "gpt2": {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
             "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
             "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 16, "n_embd": 16, "n_head": 2,
             "n_layer": 2, "n_positions": 16, "resid_pdrop": 0.1, "summary_activation": None,
             "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
             "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True,
                                                                                    "max_length": 50}},
             "vocab_size": 37},
    "distilgpt2": {"_num_labels": 1, "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
                   "attn_pdrop": 0.1, "bos_token_id": 36, "embd_pdrop": 0.1, "eos_token_id": 36,
                   "id2label": {"0": "LABEL_0"}, "initializer_range": 0.02, "label2id": {"LABEL_0": 0},
                   "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 16, "n_embd": 16, "n_head": 2,
                   "n_layer": 1, "n_positions": 16, "resid_pdrop": 0.1, "summary_activation": None,
                   "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
                   "summary_use_proj": True, "vocab_size": 37},
    "openai-gpt": {"afn": "gelu", "architectures": ["OpenAIGPTLMHeadModel"], "attn_pdrop": 0.1, "embd_pdrop": 0.1,
                   "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "openai-gpt",
                   "n_ctx": 16, "n_embd": 16, "n_head": 2, "n_layer": 2, "n_positions": 16, "n_special": 0,
                   "predict_special_tokens": True, "resid_pdrop": 0.1, "summary_activation": None,
                   "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
                   "summary_use_proj": True, "vocab_size": 37},
}


@pytest.mark.parametrize("hub", sorted(HUB_CONFIGS))
def test_hub_config_layouts_load(tmp_path, hub):
    cfg = HUB_CONFIGS[hub]
    cls = {"gpt2": GPT2LMHeadModel, "distilgpt2": GPT2LMHeadModel, "openai-gpt": OpenAIGPTLMHeadModel}[hub]
    src = cls(dict(cfg), seed=3, dtype="float32").eval()
    # the hub files are bare backbones (no prefix) with the old causal buffers
    state = {k[len("transformer."):]: v for k, v in src.state_dict().items() if k != "lm_head.weight"}
    for i in range(cfg["n_layer"]):
        state[f"h.{i}.attn.bias"] = np.ones((1, 1, 16, 16), np.float32)
    _write(tmp_path, cfg, state)
    model = numlm.from_pretrained(tmp_path, dtype="float64")
    assert type(model) is cls and model.config.n_layer == cfg["n_layer"]
    assert model.config.extra["n_ctx"] == 16  # unknown fields are kept
    ids = np.array([[1, 5, 9, 36]])
    a = model(ids).logits
    b = src.astype("float64")(ids).logits
    assert rel(a, b) < 1e-14


def test_seqcls_from_lm_checkpoint_warns_new_head():
    with pytest.warns(UserWarning, match="score.weight"):
        model = GPT2ForSequenceClassification.from_pretrained(HF / "gpt2-tiny", num_labels=4)
    assert model.state_dict()["score.weight"].shape == (4, 32)


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    cfg = json.loads((HF / "gpt2-tiny" / "config.json").read_text())
    state = load_file(str(HF / "gpt2-tiny" / "model.safetensors"))
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "config.json").write_text(json.dumps(cfg))
    data = (HF / "gpt2-tiny" / "model.safetensors").read_bytes()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        numlm.from_pretrained(tmp_path / "trunc")
    _write(tmp_path / "shape", dict(cfg, n_embd=16, n_head=2), state)
    with pytest.raises(ValueError, match="shape"):
        numlm.from_pretrained(tmp_path / "shape")
    missing = {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.weight"}
    _write(tmp_path / "missing", cfg, missing)
    with pytest.raises(ValueError, match="h.1.mlp.c_fc.weight"):
        numlm.from_pretrained(tmp_path / "missing")
    _write(tmp_path / "family", dict(cfg, model_type="openai-gpt", architectures=["OpenAIGPTLMHeadModel"]), state)
    with pytest.raises(ValueError):
        numlm.from_pretrained(tmp_path / "family")


# ------------------------------------------------------------------------------------ init

def test_gpt2_random_init_as_transformers():
    cfg = GPT2Config(vocab_size=200, n_positions=64, n_embd=96, n_layer=4, n_head=4)
    model = GPT2LMHeadModel(cfg, seed=7)
    sd = model.state_dict()
    resid = 0.02 / np.sqrt(2 * 4)
    for k, v in sd.items():
        if k.endswith("c_proj.weight"):
            assert abs(v.std() / resid - 1) < 0.1, k
        elif k.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight", "lm_head.weight")):
            assert abs(v.std() / 0.02 - 1) < 0.1, k
            assert abs(v.mean()) < 0.003
        elif k.endswith("ln_1.weight") or k.endswith("ln_2.weight") or k == "transformer.ln_f.weight":
            assert np.all(v == 1)
        else:
            assert np.all(v == 0), k  # biases, LayerNorm biases
    same = GPT2LMHeadModel(cfg, seed=7).state_dict()
    other = GPT2LMHeadModel(cfg, seed=8).state_dict()
    assert all(np.array_equal(sd[k], same[k]) for k in sd)
    assert not np.array_equal(sd["transformer.wte.weight"], other["transformer.wte.weight"])
    assert sd["lm_head.weight"] is not None and np.array_equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    # OpenAI GPT: plain normal(0, 0.02) everywhere, c_proj included
    gpt1 = OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=200, n_positions=64, n_embd=96, n_layer=4, n_head=4))
    assert abs(gpt1.state_dict()["transformer.h.0.mlp.c_proj.weight"].std() / 0.02 - 1) < 0.1


# ------------------------------------------------------------------------------------ bad input

def test_bad_inputs_raise_clear_errors():
    lm = tiny(GPT2LMHeadModel)
    ids = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match="input_ids must lie in"):
        lm(np.array([[1, 31]]))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        lm(np.array([[-1, 2]]))
    with pytest.raises(ValueError, match="n_positions"):
        lm(np.zeros((1, 25), dtype=np.int64))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        lm(ids, attention_mask=np.ones((1, 4)))
    with pytest.raises(ValueError, match="attention_mask must hold only"):
        lm(ids, attention_mask=np.array([[1, 2, 1]]))
    with pytest.raises(ValueError, match="labels must have the shape"):
        lm(ids, labels=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="labels must lie in"):
        lm(ids, labels=np.array([[1, 2, 99]]))
    with pytest.raises(ValueError, match="token_type_ids"):
        lm(ids, token_type_ids=np.zeros((1, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="position_ids must lie in"):
        lm(ids, position_ids=np.array([[0, 1, 24]]))
    with pytest.raises(ValueError, match="input_ids must hold integers"):
        lm(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="past_key_values"):
        lm(ids, past_key_values=((np.zeros((1, 2, 3, 8)), np.zeros((1, 2, 3, 8))),))
    with pytest.raises(ValueError, match="backward"):
        tiny(GPT2LMHeadModel).backward()
    lm(ids)
    with pytest.raises(ValueError, match="labels"):
        lm.backward()
    with pytest.raises(ValueError, match="gradient of logits must have shape"):
        lm.backward(np.zeros((1, 3, 5)))
    with pytest.raises(ValueError, match="activation_function"):
        GPT2Config(activation_function="swishy").validate()
    with pytest.raises(ValueError, match="afn"):
        OpenAIGPTConfig.from_dict({"afn": "silu"})
    with pytest.raises(ValueError, match="n_embd"):
        GPT2Config.from_dict({"n_embd": 10, "n_head": 3})
    cls_nopad = tiny(GPT2ForSequenceClassification, num_labels=3)
    with pytest.raises(ValueError, match="batch sizes > 1"):
        cls_nopad(np.ones((2, 4), dtype=np.int64))
    out = cls_nopad(np.ones((1, 4), dtype=np.int64), output_hidden_states=True)  # batch 1 pools T - 1
    h = out.hidden_states[-1]
    assert rel(out.logits, h[:, -1] @ cls_nopad.state_dict()["score.weight"].T) < 1e-14
    with pytest.raises(ValueError, match="labels must have shape"):
        cls_nopad(np.ones((1, 4), dtype=np.int64), labels=np.array([[1]]))
    dh = tiny(GPT2DoubleHeadsModel)
    with pytest.raises(ValueError, match="num_choices"):
        dh(ids)
    with pytest.raises(ValueError, match="mc_token_ids must lie in"):
        dh(ids[None], mc_token_ids=np.array([[3]]))
    with pytest.raises(ValueError, match="mc_labels must have shape"):
        dh(ids[None], mc_labels=np.array([[0]]))


@pytest.mark.parametrize("openai", [False, True])
def test_logits_to_keep_slices_logits_and_backward(openai):
    """logits_to_keep=k computes only the last k positions; backward through them equals a full
    backward whose logits gradient is zero elsewhere."""
    cls = OpenAIGPTLMHeadModel if openai else GPT2LMHeadModel
    model = tiny(cls, seed=3).eval()
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 7))
    full = model(ids).logits
    kept = model(ids, logits_to_keep=2).logits
    assert kept.shape == (2, 2, model.config.vocab_size)
    np.testing.assert_array_equal(kept, full[:, -2:])
    g = np.random.default_rng(1).standard_normal(kept.shape)
    model.zero_grad()
    model(ids, logits_to_keep=2)
    model.backward(g)
    part = model.gradients()
    gfull = np.zeros_like(full)
    gfull[:, -2:] = g
    model.zero_grad()
    model(ids)
    model.backward(gfull)
    for k, v in model.gradients().items():
        np.testing.assert_allclose(part[k], v, rtol=1e-12, atol=1e-14, err_msg=k)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)
