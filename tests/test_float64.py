"""float64 round trips with weights float32 cannot hold (1 + 2**-40 and noise of that size): numlm's
own checkpoints, the Trainer's checkpoints and PEFT adapters load back bit for bit."""
import warnings

import numpy as np
import pytest

import numlm
from numlm import peft
from numlm.train import Trainer, TrainConfig, latest_checkpoint, load_checkpoint
from numlm.optim import AdamW

from conftest import FIXTURES

PEFT = FIXTURES / "peft"
FAMILIES = {"gpt2-tiny": numlm.GPT2LMHeadModel, "bert-tiny-seqcls": numlm.BertForSequenceClassification,
            "openai-gpt-tiny": numlm.OpenAIGPTLMHeadModel}


def off_float32(shape, rng):
    """Values 1 + k * 2**-40 (k odd): float32 rounds every one of them to 1."""
    return 1.0 + (2 * rng.integers(0, 1000, shape) + 1) * 2.0 ** -40


def perturb(arrays, rng):
    """Each array scaled by 1 + k * 2**-40 (zeros first set to 0.01): values no float32 can hold."""
    for v in arrays.values():
        v[...] = np.where(v == 0, 0.01, v) * off_float32(v.shape, rng)
    for v in arrays.values():
        assert not np.array_equal(v.astype(np.float32).astype(np.float64), v)  # the test's premise
    return arrays


def load(name, dtype="float64"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a classifier newly initialised
        return FAMILIES[name].from_pretrained(FIXTURES / "hf" / name, dtype=dtype)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_float64_checkpoint_loads_bit_for_bit(name, tmp_path):
    model = load(name)
    perturb(model.parameters(), np.random.default_rng(0))
    want = model.state_dict()
    model.save_pretrained(tmp_path)
    back = FAMILIES[name].from_pretrained(tmp_path, dtype="float64").state_dict()
    assert back.keys() == want.keys()
    for k in want:
        assert back[k].dtype == np.float64 and np.array_equal(back[k], want[k]), k
    also = numlm.from_pretrained(tmp_path, dtype="float64").state_dict()  # by config.json's architectures
    assert all(np.array_equal(also[k], want[k]) for k in want)
    f32 = FAMILIES[name].from_pretrained(tmp_path, dtype="float32").state_dict()
    for k in want:  # float32: each weight rounded to nearest once, from the file's float64
        assert f32[k].dtype == np.float32 and np.array_equal(f32[k], want[k].astype(np.float32)), k


def test_one_plus_two_to_the_minus_40_survives(tmp_path):
    model = load("gpt2-tiny")
    model.parameters()["transformer.ln_f.weight"][...] = 1 + 2.0 ** -40
    model.save_pretrained(tmp_path)
    back = numlm.GPT2LMHeadModel.from_pretrained(tmp_path, dtype="float64")
    assert np.all(back.parameters()["transformer.ln_f.weight"] - 1 == 2.0 ** -40)


def test_trainer_checkpoint_of_a_float64_model_resumes_bit_for_bit(tmp_path):
    model = load("gpt2-tiny")
    perturb(model.parameters(), np.random.default_rng(1))
    rng = np.random.default_rng(2)
    ids = rng.integers(0, model.config.vocab_size, (2, 8))

    class Fixed:
        def next_batch(self):
            return {"input_ids": ids, "labels": ids}

        def state_dict(self):
            return {}

        def load_state_dict(self, s):
            pass

    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=2, lr=1e-9, warmup=0, save_every=2, progress=False)
    Trainer(model, Fixed(), cfg).run()
    want = model.state_dict()
    fresh = load("gpt2-tiny")
    load_checkpoint(latest_checkpoint(tmp_path), fresh, AdamW(fresh.parameters()))
    got = fresh.state_dict()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def _adapted(name, method):
    configs = {"lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                       task_type="CAUSAL_LM"),
               "prompt": peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
               "prefix": peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
               "adapter": peft.DoubleSeqBnConfig(reduction_factor=4)}
    return peft.get_peft_model(load(name), configs[method])


@pytest.mark.parametrize("method,name", [("lora", "gpt2-tiny"), ("prompt", "gpt2-tiny"), ("prefix", "gpt2-tiny"),
                                         ("adapter", "bert-tiny-seqcls")])
def test_a_float64_adapter_loads_bit_for_bit(method, name, tmp_path):
    pm = _adapted(name, method)
    perturb(pm.parameters(), np.random.default_rng(3))
    want = pm.state_dict()
    ids = np.random.default_rng(4).integers(0, pm.config.vocab_size, (2, 6))
    logits = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(load(name), tmp_path)
    got = back.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == np.float64 and np.array_equal(got[k], want[k]), k
    assert np.array_equal(back(input_ids=ids).logits, logits)


def test_the_library_float64_adapters_load_bit_for_bit():
    """peft's and AdapterHub's float64 files (tests/fixtures/peft) reach the parameters unchanged."""
    from safetensors.numpy import load_file
    for name, hf in (("lora-gpt2-tiny", "gpt2-tiny"), ("prefix-gpt2-tiny", "gpt2-tiny"),
                     ("adapter-bert-tiny-seqcls", "bert-tiny-seqcls")):
        d = PEFT / name / "adapter"
        f = d / ("adapter.safetensors" if name.startswith("adapter") else "adapter_model.safetensors")
        file = load_file(str(f))
        assert any(not np.array_equal(v.astype(np.float32).astype(np.float64), v) for v in file.values())
        got = peft.PeftModel.from_pretrained(load(hf), d).state_dict()
        for k, v in file.items():
            assert v.dtype == np.float64 and np.array_equal(got[k], v), (name, k)


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny"])
def test_float64_files_written_by_transformers(name):
    """tests/fixtures/hf-float64: transformers' save_pretrained of float64 weights none of which
    float32 can hold. Every tensor reaches numlm bit for bit, and the logits match transformers'
    float64 logits to 1e-12 (a load through float32 is ~1e-7 off)."""
    from safetensors.numpy import load_file
    d = FIXTURES / "hf-float64" / name
    file = load_file(str(d / "model.safetensors"))
    assert all(v.dtype == np.float64 and not np.any(v.astype(np.float32) == v) for v in file.values())
    model = numlm.from_pretrained(d, dtype="float64")
    sd = model.state_dict()
    for k, v in file.items():
        assert np.array_equal(sd[k], v), k
    for alias, source in model.tied.items():
        assert np.array_equal(sd[alias], file[source]), alias
    ref = np.load(d / "reference.npz")
    logits = model(**{k: ref[k] for k in ref.files if k != "logits"}).logits
    assert np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max() < 1e-12
