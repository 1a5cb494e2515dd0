"""Checkpoint folders as transformers writes them: bfloat16 weights, both keys of a tied pair stored,
weights only as pickles."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import numlm
from numlm.io import load_safetensors

CFG = dict(vocab_size=40, n_positions=20, n_embd=16, n_layer=2, n_head=4)


def _to_bfloat16_values(a):
    """a's float32 values cut to bfloat16's 8-bit mantissa: exactly representable in both"""
    return (np.asarray(a, np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)


def _write_bfloat16(state, f):
    """a safetensors file of {key: float32 array} stored as bfloat16, written by hand (numpy has no bfloat16)"""
    header, blobs, at = {}, [], 0
    for k, v in state.items():
        raw = (np.ascontiguousarray(v, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_bfloat16_weights_load_exactly(tmp_path):
    """a bfloat16 checkpoint loads as the float32 values it holds: the same logits as the float32 file of
    those values"""
    model = numlm.GPT2LMHeadModel(numlm.GPT2Config(**CFG), seed=1)
    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    model.save_pretrained(f32)
    state = {k: _to_bfloat16_values(v) for k, v in load_file(str(f32 / "model.safetensors")).items()}
    save_file(state, str(f32 / "model.safetensors"))
    model.save_pretrained(bf16)
    _write_bfloat16(state, bf16 / "model.safetensors")
    got = load_safetensors(bf16)
    assert set(got) == set(state) and all(np.array_equal(got[k], state[k]) for k in state)
    ids = np.array([[1, 5, 9, 3, 7]])
    a = numlm.from_pretrained(bf16, dtype="float64")(ids).logits
    b = numlm.from_pretrained(f32, dtype="float64")(ids).logits
    np.testing.assert_array_equal(a, b)


def test_a_garbled_file_still_names_itself(tmp_path):
    model = numlm.GPT2LMHeadModel(numlm.GPT2Config(**CFG), seed=1)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError, match="cannot read safetensors file .*model.safetensors"):
        numlm.from_pretrained(tmp_path)


def _with_alias(tmp_path, model, alias, source, change):
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state[alias] = state[source] + change
    save_file(state, str(tmp_path / "model.safetensors"))
    return state


def test_a_tied_pair_stored_twice_must_agree(tmp_path):
    """both keys of a tied pair with one value load; with two, numlm (which ties them) refuses to pick one,
    and tie_word_embeddings=False gives the head the stored lm_head.weight"""
    model = numlm.GPT2LMHeadModel(numlm.GPT2Config(**CFG), seed=1, dtype="float64").eval()
    _with_alias(tmp_path, model, "lm_head.weight", "transformer.wte.weight", 0.0)
    ids = np.array([[1, 5, 9, 3, 7]])
    np.testing.assert_array_equal(numlm.from_pretrained(tmp_path, dtype="float64")(ids).logits, model(ids).logits)
    state = _with_alias(tmp_path, model, "lm_head.weight", "transformer.wte.weight", 0.5)
    with pytest.raises(ValueError, match="tied pair transformer.wte.weight and lm_head.weight with different values"):
        numlm.from_pretrained(tmp_path)
    untied = numlm.from_pretrained(tmp_path, dtype="float64", tie_word_embeddings=False)
    h = untied.transformer(ids).last_hidden_state
    np.testing.assert_allclose(untied(ids).logits, h @ state["lm_head.weight"].T, rtol=1e-12, atol=1e-12)


def test_bert_decoder_bias_stored_twice_must_agree(tmp_path):
    cfg = numlm.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=24, max_position_embeddings=20)
    model = numlm.BertForMaskedLM(cfg, seed=1)
    _with_alias(tmp_path, model, "cls.predictions.decoder.bias", "cls.predictions.bias", 1.0)
    with pytest.raises(ValueError, match="cls.predictions.bias and cls.predictions.decoder.bias"):
        numlm.from_pretrained(tmp_path)


def test_a_folder_of_pickles_gets_the_conversion(tmp_path):
    """weights only as pytorch_model.bin: the error names it and converts in place with the model's own class
    (its config's architectures)"""
    numlm.BertForMaskedLM(numlm.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=24), seed=1).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")  # not a pickle: never opened
    with pytest.raises(ValueError, match=r"only as pickles \(pytorch_model.bin\).*\n.*AutoConfig.from_pretrained\(n\)"
                                         r".architectures") as e:
        numlm.from_pretrained(tmp_path)
    assert f"n = '{tmp_path}'" in str(e.value) and f"save_pretrained('{tmp_path}', safe_serialization=True)" in str(e.value)


def test_a_tied_pair_stored_twice_with_one_nan_loads_with_the_warning(tmp_path):
    """one array under both keys, NaN included, is one value: it loads, and the NaN is named"""
    model = numlm.GPT2LMHeadModel(numlm.GPT2Config(**CFG), seed=1)
    model.transformer.wte.params["weight"][3, 2] = np.nan
    _with_alias(tmp_path, model, "lm_head.weight", "transformer.wte.weight", 0.0)
    with pytest.warns(numlm.io.NonFiniteWeightsWarning, match="transformer.wte.weight"):
        numlm.from_pretrained(tmp_path)


def test_bfloat16_beside_unsigned_and_unknown_types(tmp_path):
    """a bfloat16 file's other tensors keep their types (uint32 too); a type numpy has no kind for is named"""
    f = tmp_path / "model.safetensors"
    _write_bfloat16({"w": np.array([1.5, -2.0], np.float32)}, f)
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    for dtype, want in (("U32", np.array([7, 2 ** 32 - 1], np.uint32)), ("F8_E4M3", None)):
        extra = want.tobytes() if want is not None else b"\x01\x02"
        h = dict(header, u={"dtype": dtype, "shape": [2], "data_offsets": [len(data), len(data) + len(extra)]})
        text = json.dumps(h).encode()
        f.write_bytes(len(text).to_bytes(8, "little") + text + data + extra)
        if want is None:
            with pytest.raises(ValueError, match="tensor 'u' is F8_E4M3, a type numlm does not read"):
                load_safetensors(tmp_path)
        else:
            got = load_safetensors(tmp_path)
            np.testing.assert_array_equal(got["u"], want)
            np.testing.assert_array_equal(got["w"], [1.5, -2.0])


def test_a_tied_pair_of_two_shapes_is_named_as_such(tmp_path):
    model = numlm.GPT2LMHeadModel(numlm.GPT2Config(**CFG), seed=1)
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    w = state["transformer.wte.weight"]
    state["lm_head.weight"] = np.concatenate([w, w[:3]])
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"with different shapes \(40, 16\) and \(43, 16\)"):
        numlm.from_pretrained(tmp_path)
