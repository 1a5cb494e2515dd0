"""numlm.peft against peft 0.21.2 and AdapterHub where a fault pass found them apart: saves that fail
part-way, missing head tensors, modules_to_save matching, targets inside the head, prompt folders made
with a text init, the base model's path and AdapterHub names (fixtures: tests/fixtures/peft/interop-*,
made by tests/fixtures/make/peft_interop.py)."""
import json
import resource
import signal
import warnings

import numpy as np
import pytest

import numlm
from numlm import peft
from numlm.peft import LoraConfig, get_peft_model

from conftest import FIXTURES

HF = FIXTURES / "hf"
INTEROP = FIXTURES / "peft"


def base(name, dtype="float64"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a head newly initialised
        return numlm.from_pretrained(HF / name, dtype=dtype)


def randomized(pm, seed):
    rng = np.random.default_rng(seed)
    for v in pm.parameters().values():
        v[...] = rng.standard_normal(v.shape)
    return pm


def folder_bytes(d):
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


# ---------------------------------------------------------------------------------------- 1. saving together
@pytest.mark.parametrize("cfg", [LoraConfig(r=2, lora_alpha=32, target_modules=["query"], task_type="SEQ_CLS"),
                                 peft.SeqBnConfig(reduction_factor=4)])
def test_save_that_fails_part_way_leaves_the_folder_as_it_was(tmp_path, cfg):
    """config and tensors are renamed in together: a full disk while writing the tensors keeps the old adapter"""
    a = randomized(get_peft_model(base("bert-tiny-seqcls"), LoraConfig(r=2, lora_alpha=8, target_modules=["query"],
                                                                       task_type="SEQ_CLS")), 0)
    a.save_pretrained(tmp_path)
    before = folder_bytes(tmp_path)
    b = randomized(get_peft_model(base("bert-tiny-seqcls"), cfg), 1)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1500, old_limit[1]))  # room for a config, not for the tensors
    try:
        with pytest.raises(Exception):
            b.save_pretrained(tmp_path)
        with pytest.raises(Exception):  # a folder it makes goes too
            b.save_pretrained(tmp_path / "new")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert not (tmp_path / "new").exists() and folder_bytes(tmp_path) == before


# ---------------------------------------------------------------------------------------- 2. a missing head
def test_peft_folder_without_its_modules_to_save_tensors_is_refused(tmp_path):
    """peft raises KeyError for a missing classifier; numlm loaded the base model's untrained one silently"""
    from safetensors.numpy import load_file, save_file
    src = INTEROP / "lora-bert-tiny-seqcls" / "adapter"
    (tmp_path / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    state = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v for k, v in state.items() if "classifier" not in k}, str(tmp_path / "adapter_model.safetensors"))
    m = base("bert-tiny-seqcls")
    before = {k: v.copy() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="lacks 'base_model.model.classifier"):
        peft.PeftModel.from_pretrained(m, tmp_path)
    assert m._peft is None and all(np.array_equal(v, before[k]) for k, v in m.state_dict().items())


def check_logits(name, hf, pm):
    r = np.load(INTEROP / name / "reference.npz")
    got = pm.eval()(r["input_ids"], attention_mask=r["attention_mask"]).logits
    mask = r["attention_mask"].astype(bool)  # padded positions: anything (prompt tuning's n first are kept)
    keep = np.concatenate([np.ones((len(mask), got.shape[1] - mask.shape[1]), bool), mask], 1) if got.ndim == 3 \
        else slice(None)
    np.testing.assert_allclose(got[keep], r["logits"][keep], rtol=1e-9, atol=1e-9)


def refused_unchanged(m, call, match):
    """call(m) raises a ValueError matching `match` and leaves the model as it was"""
    before = {k: v.copy() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        call(m)
    assert getattr(m, "_peft", None) is None
    assert all(np.array_equal(v, before[k]) for k, v in m.state_dict().items())


# ---------------------------------------------------------------------------------------- 3, 4. tied modules
@pytest.mark.parametrize("name, module, why", [("interop-wte-gpt2-tiny", "wte", "ties to lm_head.weight"),
                                               ("interop-lmhead-gpt2-tiny", "lm_head", "ties to transformer.wte")])
def test_modules_to_save_naming_one_of_a_tied_pair_is_refused_by_name(name, module, why):
    """peft trains an untied copy (the other side stays on the original table); numlm's tied tensor would
    move both (wte) or nothing (lm_head, no parameters of its own): refused, with the reason, both ways"""
    refused_unchanged(base("gpt2-tiny"), lambda m: peft.PeftModel.from_pretrained(m, INTEROP / name / "adapter"),
                      f"modules_to_save names .*{module}.*{why}.*untied copy")
    cfg = LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=[module], task_type="CAUSAL_LM")
    refused_unchanged(base("gpt2-tiny"), lambda m: get_peft_model(m, cfg), f"{module}.*{why}")


def test_bert_mlm_word_embeddings_in_modules_to_save_is_refused():
    cfg = LoraConfig(r=2, target_modules=["query"], modules_to_save=["word_embeddings"])
    refused_unchanged(base("bert-tiny"), lambda m: get_peft_model(m, cfg), "ties to cls.predictions.decoder")


# ---------------------------------------------------------------------------------------- 5. peft's suffix match
def test_distilbert_seqcls_trains_and_saves_pre_classifier_as_peft(tmp_path):
    """peft matches modules_to_save by key.endswith(name), no dot: "classifier" takes pre_classifier too"""
    from safetensors.numpy import load_file
    name = "interop-distilbert-tiny-seqcls"
    check_logits(name, "distilbert-tiny-seqcls",
                 peft.PeftModel.from_pretrained(base("distilbert-tiny-seqcls"), INTEROP / name / "adapter"))
    pm = get_peft_model(base("distilbert-tiny-seqcls"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_lin", "v_lin"],
                                                                   task_type="SEQ_CLS"))
    assert "base_model.model.pre_classifier.weight" in pm.parameters()
    pm.save_pretrained(tmp_path)
    assert sorted(load_file(str(tmp_path / "adapter_model.safetensors"))) == sorted(
        load_file(str(INTEROP / name / "adapter" / "adapter_model.safetensors")))


# ---------------------------------------------------------------------------------------- 6. targets in the head
@pytest.mark.parametrize("hf, targets", [("bert-tiny-seqcls", ["query", "classifier"]),
                                         ("roberta-tiny-seqcls", ["query", "out_proj"])])
def test_a_target_inside_the_task_head_is_skipped_as_peft_skips_it(tmp_path, hf, targets):
    from safetensors.numpy import load_file
    name = f"interop-headtarget-{hf}"
    check_logits(name, hf, peft.PeftModel.from_pretrained(base(hf), INTEROP / name / "adapter"))
    pm = get_peft_model(base(hf), LoraConfig(r=2, lora_alpha=4, target_modules=targets, task_type="SEQ_CLS"))
    pm.save_pretrained(tmp_path)
    assert sorted(load_file(str(tmp_path / "adapter_model.safetensors"))) == sorted(
        load_file(str(INTEROP / name / "adapter" / "adapter_model.safetensors")))


# ---------------------------------------------------------------------------------------- 7. TEXT-initialised prompts
def test_prompt_folder_made_with_text_init_loads_and_saves_back_as_peft_reads_it(tmp_path):
    """the prompt is in the file: loading needs no initialisation; a save keeps peft's TEXT fields"""
    name = "interop-prompt-text-gpt2-tiny"
    pm = peft.PeftModel.from_pretrained(base("gpt2-tiny"), INTEROP / name / "adapter")
    check_logits(name, "gpt2-tiny", pm)
    pm.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    want = json.loads((INTEROP / name / "adapter" / "adapter_config.json").read_text())
    assert {k: d[k] for k in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path")} == \
        {k: want[k] for k in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path")}
    check_logits(name, "gpt2-tiny", peft.PeftModel.from_pretrained(base("gpt2-tiny"), tmp_path))


def test_text_init_is_peft_s_and_sample_vocab_is_refused_by_name():
    """TEXT: the init text's word embeddings, repeated to num_virtual_tokens (peft's own prompt in the folder)"""
    from safetensors.numpy import load_file
    name = "interop-prompt-text-gpt2-tiny"
    d = json.loads((INTEROP / name / "adapter" / "adapter_config.json").read_text())
    cfg = peft.PromptTuningConfig(num_virtual_tokens=d["num_virtual_tokens"], task_type="CAUSAL_LM",
                                  prompt_tuning_init="TEXT", prompt_tuning_init_text=d["prompt_tuning_init_text"],
                                  tokenizer_name_or_path=str(INTEROP / name / "tokenizer"))
    pm = get_peft_model(base("gpt2-tiny"), cfg)
    want = load_file(str(INTEROP / name / "adapter" / "adapter_model.safetensors"))["prompt_embeddings"]
    np.testing.assert_array_equal(pm.parameters()["prompt_embeddings"], want)
    cfg = peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM", prompt_tuning_init="SAMPLE_VOCAB")
    refused_unchanged(base("gpt2-tiny"), lambda m: get_peft_model(m, cfg),
                      "prompt_tuning_init='SAMPLE_VOCAB' is not supported")


# ---------------------------------------------------------------------------------------- 8. the base model's path
def test_saved_adapter_records_the_folder_its_base_was_loaded_from(tmp_path):
    """peft writes base_model_name_or_path (the folder or Hub name as given); numlm wrote null"""
    folder = str(HF / "gpt2-tiny")
    for load in (numlm.from_pretrained, numlm.GPT2LMHeadModel.from_pretrained):
        pm = get_peft_model(load(folder), LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM"))
        pm.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == folder
    given = LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM", base_model_name_or_path="org/name")
    assert get_peft_model(numlm.from_pretrained(folder), given).peft_config.base_model_name_or_path == "org/name"


# ---------------------------------------------------------------------------------------- 9. AdapterHub names
def test_adapterhub_name_with_a_hyphen_loads_and_adapter_name_renames_it(tmp_path):
    """AdapterHub's adapters live in a torch ModuleDict: any name without a dot ("sst-2") is a key part"""
    from safetensors.numpy import load_file, save_file
    src = INTEROP / "adapter-bert-tiny-seqcls"
    cfg = json.loads((src / "adapter" / "adapter_config.json").read_text())
    old, cfg["name"] = cfg["name"], "sst-2"
    d = tmp_path / "hub"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    state = load_file(str(src / "adapter" / "adapter.safetensors"))
    save_file({k.replace(f".adapters.{old}.", ".adapters.sst-2."): v for k, v in state.items()},
              str(d / "adapter.safetensors"))
    for f in ("head_config.json", "model_head.safetensors"):
        if (src / "adapter" / f).is_file():
            (d / f).write_bytes((src / "adapter" / f).read_bytes())
    r = np.load(src / "reference.npz")
    for name in (None, "sst2"):
        pm = peft.PeftModel.from_pretrained(base("bert-tiny-seqcls"), d, adapter_name=name)
        got = pm.eval()(r["input_ids"], attention_mask=r["attention_mask"]).logits
        np.testing.assert_allclose(got, r["logits"], rtol=1e-9, atol=1e-9)
    pm.save_pretrained(tmp_path / "again")
    assert all(".adapters.sst2." in k for k in load_file(str(tmp_path / "again" / "adapter.safetensors")))
    with pytest.raises(ValueError, match="without dots"):
        get_peft_model(base("bert-tiny-seqcls"), peft.SeqBnConfig(), adapter_name="a.b")
