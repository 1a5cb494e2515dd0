"""numlm.peft where a second fault pass found it apart from peft and AdapterHub: bfloat16 adapter files,
heads saved for another model class."""
import shutil
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file

import numlm
from numlm import peft

from conftest import FIXTURES
from test_checkpoint_files import _to_bfloat16_values, _write_bfloat16

HF, PEFT = FIXTURES / "hf", FIXTURES / "peft"


def base(name, cls, dtype="float32", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a head newly initialised
        return cls.from_pretrained(HF / name, dtype=dtype, **kw)


@pytest.mark.parametrize("fixture, weights", [("lora-bert-tiny-seqcls", "adapter_model.safetensors"),
                                              ("adapter-bert-tiny-seqcls", "adapter.safetensors")])
def test_a_bfloat16_adapter_file_loads_the_values_it_holds(tmp_path, fixture, weights):
    """peft saves an adapter trained in bfloat16 as bfloat16 (AdapterHub too); numlm reads such a model
    checkpoint, and reads the adapter too: every tensor equals the bfloat16 value the file holds."""
    d = tmp_path / "adapter"
    shutil.copytree(PEFT / fixture / "adapter", d)
    want = {k: _to_bfloat16_values(v.astype(np.float32)) for k, v in load_file(str(d / weights)).items()}
    _write_bfloat16(want, d / weights)
    pm = peft.PeftModel.from_pretrained(base("bert-tiny-seqcls", numlm.BertForSequenceClassification), d)
    got = pm.state_dict()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)


def test_an_adapterhub_head_saved_for_another_model_class_is_left_out():
    """head_config.json names the class the head was saved from: AdapterHub's load_adapter leaves another
    class's head out with a warning and loads the adapter (PredictionHeadLoader(error_on_missing=False)).
    A sequence classifier's head is not loaded into a token classifier's classifier of the same shape, and
    the adapter is not refused (6fb5b7b refused it, blocking the adapter's use on another task's model)."""
    model = base("bert-tiny", numlm.BertForTokenClassification, num_labels=3)
    head = {k: v.copy() for k, v in model.state_dict().items() if k.startswith("classifier.")}
    folder = PEFT / "adapter-bert-tiny-seqcls" / "adapter"
    with pytest.warns(UserWarning, match="Model class 'BertForSequenceClassification' of found prediction head "
                                         "does not match current model class .BertForTokenClassification."):
        pm = peft.PeftModel.from_pretrained(model, folder)
    for k, v in head.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)
    want = load_file(str(folder / "adapter.safetensors"))
    got = pm.state_dict()
    assert want and all(np.array_equal(got[k], v.astype(np.float32)) for k, v in want.items())  # loaded


def test_an_adapter_folder_with_nan_weights_is_refused_by_the_commands(tmp_path, capsys):
    """`numlm classify ADAPTER_DIR` checks the weights it would run, as it does a model folder's: a NaN in
    the adapter file (a diverged run) is an error naming the tensor, not a 'nan' score with exit 0."""
    from safetensors.numpy import save_file
    from numlm.cli import main
    from numlm.data.tokenizer import Tokenizer
    tok = Tokenizer.train_wordpiece_from_iterator(["the cat sat on the mat", "dogs sit on mats"] * 4, vocab_size=60,
                                                 min_frequency=1)
    cfg = numlm.BertConfig(vocab_size=tok.vocab_size, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                           intermediate_size=20, max_position_embeddings=24, num_labels=2)
    numlm.BertForSequenceClassification(cfg, seed=2, dtype="float32").save_pretrained(tmp_path / "base")
    tok.save(tmp_path / "base")
    pm = peft.get_peft_model(numlm.from_pretrained(tmp_path / "base"), peft.LoraConfig(r=2, task_type="SEQ_CLS"))
    pm.peft_config.base_model_name_or_path = str(tmp_path / "base")
    pm.save_pretrained(tmp_path / "adapter")
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.weight"
    state = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    state[key][1, 2] = np.nan
    save_file(state, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert main(["classify", str(tmp_path / "adapter"), "the cat sat"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == (
        f"numlm classify: error: the weights in {tmp_path / 'adapter'} hold NaN or inf ({key}); they cannot run")


def test_mam_adapter_init_is_adapterhubs():
    """AdapterHub's init_weights="mam_adapter": adapter_down.0.weight kaiming-uniform (a = sqrt(5): bound
    1 / sqrt(C)), every bias and adapter_up.weight zero (numlm had drawn the down bias at random)."""
    cfg = numlm.BertConfig(vocab_size=40, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                           intermediate_size=20, max_position_embeddings=24, num_labels=2)
    pm = peft.get_peft_model(numlm.BertForSequenceClassification(cfg, seed=1),
                             peft.DoubleSeqBnConfig(reduction_factor=2, init_weights="mam_adapter"))
    state = pm.state_dict()
    downs = [k for k in state if k.endswith("adapter_down.0.weight")]
    assert len(downs) == 4
    for k in downs:
        w = state[k]
        assert np.abs(w).max() <= 1 / np.sqrt(12) and np.abs(w).max() > 0.5 / np.sqrt(12)
        at = k[:-len("adapter_down.0.weight")]
        for zero in ("adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias"):
            assert not state[at + zero].any(), at + zero


@pytest.mark.parametrize("bad", [lambda shape: np.full(shape, "x"), lambda shape: np.full(shape, None, dtype=object)])
def test_load_state_dict_refuses_a_non_numeric_tensor_before_copying_anything(bad):
    """A tensor of text (or Nones) is refused by name, and the refused call copies nothing: every other
    tensor keeps its value (they had been copied up to the bad one; Nones became NaN silently)."""
    cfg = numlm.GPT2Config(vocab_size=40, n_embd=12, n_layer=2, n_head=3, n_positions=24)
    pm = peft.get_peft_model(numlm.GPT2LMHeadModel(cfg, seed=1), peft.LoraConfig(r=2, task_type="CAUSAL_LM",
                                                                               init_lora_weights=False))
    before = pm.state_dict()
    last = list(before)[-1]
    state = {k: v + 1 for k, v in before.items()}
    state[last] = bad(before[last].shape)
    with pytest.raises(ValueError, match=f"adapter tensor {last!r}"):
        pm.load_state_dict(state)
    for k, v in pm.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_bias_all_copies_of_a_nested_head_are_keyed_under_the_head_as_peft():
    """peft wraps the whole head (RoBERTa's classifier: dense, out_proj) in one ModulesToSaveWrapper, so
    bias="all" saves its biases again as classifier.modules_to_save.<sub>.bias and
    classifier.original_module.<sub>.bias (numlm wrote classifier.<sub>.modules_to_save.bias, and refused
    peft's own file as not fitting the model)."""
    cfg = numlm.RobertaConfig(vocab_size=40, hidden_size=12, num_hidden_layers=1, num_attention_heads=3,
                              intermediate_size=20, max_position_embeddings=24, num_labels=2)
    pm = peft.get_peft_model(numlm.RobertaForSequenceClassification(cfg, seed=1),
                             peft.LoraConfig(r=2, task_type="SEQ_CLS", bias="all"))
    at = "base_model.model.classifier."
    want = {at + f"{copy}{sub}.{k}" for copy in ("", "modules_to_save.", "original_module.")
            for sub in ("dense", "out_proj") for k in ("bias",) + (("weight",) if not copy else ())}
    sd = pm.state_dict()
    assert {k for k in sd if k.startswith(at)} == want
    state = {k: v + 1 for k, v in sd.items()}
    state[at + "modules_to_save.dense.bias"] = state[at + "dense.bias"]
    pm.load_state_dict(state)  # peft's file, every tensor changed: it loads
    np.testing.assert_array_equal(pm.state_dict()[at + "dense.bias"], sd[at + "dense.bias"] + 1)


def test_adapterhub_head_config_carries_the_models_label_names_both_ways(tmp_path):
    """AdapterHub saves a static head's label2id from the model's config and, loading it, sets the model's
    labels from it: numlm wrote LABEL_0 .. whatever the model's labels, and ignored the file's."""
    import json
    from numlm.inference import predict
    names = ["neg", "pos", "mixed"]
    cfg = numlm.BertConfig.from_dict(dict(vocab_size=40, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                                          intermediate_size=20, max_position_embeddings=24,
                                          id2label={str(i): n for i, n in enumerate(names)}))
    pm = peft.get_peft_model(numlm.BertForSequenceClassification(cfg, seed=1), peft.SeqBnConfig(reduction_factor=2))
    pm.save_pretrained(tmp_path / "adapter")
    head = json.loads((tmp_path / "adapter" / "head_config.json").read_text())
    assert head["label2id"] == {n: i for i, n in enumerate(names)}
    head["label2id"] = {"b": 1, "a": 0, "c": 2}
    (tmp_path / "adapter" / "head_config.json").write_text(json.dumps(head))
    plain = numlm.BertForSequenceClassification(numlm.BertConfig(**{k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "num_labels")}), seed=1)
    loaded = peft.PeftModel.from_pretrained(plain, tmp_path / "adapter")
    out = predict(loaded, np.array([[1, 5, 7, 2]]))
    assert out.label_names == [["a", "b", "c"][out.labels[0]]]


@pytest.mark.parametrize("kind, arg", [("gpt2", "labels"), ("bert", "token_type_ids"), ("bert-tokens", "labels")])
def test_prompt_tuning_per_token_inputs_of_the_wrong_shape_are_named_with_the_shapes_given(kind, arg):
    """Prompt tuning prefixes token types and per-token labels with n entries; a (B, T) input of another
    shape is refused naming the shapes the caller gave (numlm raised numpy's concatenate error, or named
    the shapes after n virtual tokens were put in front)."""
    ids = np.array([[1, 5, 7, 2], [3, 4, 6, 8]])
    if kind == "gpt2":
        cfg = numlm.GPT2Config(vocab_size=40, n_embd=12, n_layer=1, n_head=3, n_positions=24)
        model, task = numlm.GPT2LMHeadModel(cfg, seed=1), "CAUSAL_LM"
    else:
        cfg = numlm.BertConfig(vocab_size=40, hidden_size=12, num_hidden_layers=1, num_attention_heads=3,
                               intermediate_size=20, max_position_embeddings=24, num_labels=2)
        cls = numlm.BertForTokenClassification if kind == "bert-tokens" else numlm.BertForSequenceClassification
        model, task = cls(cfg, seed=1), "TOKEN_CLS" if kind == "bert-tokens" else "SEQ_CLS"
    pm = peft.get_peft_model(model, peft.PromptTuningConfig(num_virtual_tokens=3, task_type=task))
    with pytest.raises(ValueError, match=rf"^{arg} must have shape \(2, 4\) like input_ids, got \(1, 4\)$"):
        pm(input_ids=ids, **{arg: ids[:1] % 2})


def _prompt_learning(kind, method):
    if kind == "gpt2":
        cfg = numlm.GPT2Config(vocab_size=40, n_embd=12, n_layer=2, n_head=3, n_positions=24)
        model, task = numlm.GPT2LMHeadModel(cfg, seed=1, dtype="float64"), "CAUSAL_LM"
    else:
        cfg = numlm.BertConfig(vocab_size=40, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                               intermediate_size=20, max_position_embeddings=24, num_labels=2)
        cls, task = {"bert": (numlm.BertForSequenceClassification, "SEQ_CLS"),
                     "bert-features": (numlm.BertModel, "FEATURE_EXTRACTION")}[kind]
        model = cls(cfg, seed=1, dtype="float64")
    config = {"prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig}[method]
    return peft.get_peft_model(model, config(num_virtual_tokens=3, task_type=task)).eval()  # no dropout


@pytest.mark.parametrize("kind, method", [("gpt2", "prompt"), ("gpt2", "prefix"), ("bert-features", "prompt"),
                                          ("bert-features", "prefix")])
def test_token_types_peft_drops_for_prompt_learning_are_dropped_with_its_warning(kind, method):
    """peft's prompt learning drops token_type_ids for a causal LM and feature extraction, warning
    (_adjust_prompt_learning_kwargs): the outputs are those without them (numlm embedded them)."""
    pm = _prompt_learning(kind, method)
    ids = np.array([[1, 5, 7, 2, 9], [3, 4, 6, 8, 9]])
    given = np.array([[0, 3, 1, 2, 5]] * 2) % (2 if "bert" in kind else 40)
    out = "last_hidden_state" if kind == "bert-features" else "logits"
    want = getattr(pm(input_ids=ids), out)
    with pytest.warns(UserWarning, match="Token type ids are not supported for parameter efficient tuning"):
        got = getattr(pm(input_ids=ids, token_type_ids=given), out)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_position_ids_prefix_tuning_shifts_and_prompt_tuning_drops(kind):
    """peft's _adjust_prompt_learning_kwargs: prefix tuning shifts given position ids by n (the prefix is the
    past), prompt tuning drops them with a warning. 240ee06 took the position-id cases out of the test
    above and left none: 8e16fc9's dropping them for prefix tuning passed every test."""
    ids, pos = np.array([[1, 5, 7, 2, 9], [3, 4, 6, 8, 9]]), np.arange(5)[None].repeat(2, axis=0)
    pm = _prompt_learning(kind, "prefix")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same, moved = pm(input_ids=ids, position_ids=pos).logits, pm(input_ids=ids, position_ids=pos + 1).logits
    np.testing.assert_array_equal(same, pm(input_ids=ids).logits)  # 0.. shifted is the default n..
    assert not np.allclose(moved, same)
    pm = _prompt_learning(kind, "prompt")
    with pytest.warns(UserWarning, match="Position ids are not supported for parameter efficient tuning"):
        got = pm(input_ids=ids, position_ids=pos + 1).logits
    np.testing.assert_array_equal(got, pm(input_ids=ids).logits)


def test_init_lora_weights_false_draws_b_as_torchs_linear_default():
    """peft's init_lora_weights=False leaves lora_A and lora_B at nn.Linear's default, kaiming-uniform with
    a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = r for B (numlm drew B from U(-1, 1))."""
    cfg = numlm.GPT2Config(vocab_size=40, n_embd=12, n_layer=2, n_head=3, n_positions=24)
    r = 4
    pm = peft.get_peft_model(numlm.GPT2LMHeadModel(cfg, seed=1), peft.LoraConfig(r=r, task_type="CAUSAL_LM",
                                                                               init_lora_weights=False))
    for k, v in pm.state_dict().items():
        bound = 1 / np.sqrt(r if "lora_B" in k else v.shape[1])
        assert np.abs(v).max() <= bound and np.abs(v).max() > bound / 2, k


def test_an_adapterhub_config_without_original_ln_before_takes_adapterhubs_default(tmp_path):
    """adapters' BnConfig defaults original_ln_before to False (only SeqBnConfig, Pfeiffer, sets it True): a
    config.json without the field is the Houlsby fixture's, and gives its reference logits (numlm defaulted
    to True, applying the block's LayerNorm before the adapter too)."""
    import json
    d = tmp_path / "adapter"
    shutil.copytree(PEFT / "adapter-bert-tiny-seqcls" / "adapter", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["config"].pop("original_ln_before") is False
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    ref = np.load(PEFT / "adapter-bert-tiny-seqcls" / "reference.npz")
    pm = peft.PeftModel.from_pretrained(base("bert-tiny-seqcls", numlm.BertForSequenceClassification, "float64"), d)
    out = pm(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])
    np.testing.assert_allclose(out.logits, ref["logits"], rtol=1e-10, atol=0)
    assert peft.SeqBnConfig().original_ln_before and not peft.DoubleSeqBnConfig().original_ln_before


def test_bias_all_nested_head_copy_under_the_adapter_name_loads():
    """peft since its state-dict refactor removes the adapter name only before a key's last part, so a
    nested head's copy stays classifier.modules_to_save.default.dense.bias in its file: numlm reads it
    as the copy it is (equal to classifier.dense.bias, else refused by name), not as an unknown key."""
    cfg = numlm.RobertaConfig(vocab_size=40, hidden_size=12, num_hidden_layers=1, num_attention_heads=3,
                              intermediate_size=20, max_position_embeddings=24, num_labels=2)
    pm = peft.get_peft_model(numlm.RobertaForSequenceClassification(cfg, seed=1),
                             peft.LoraConfig(r=2, task_type="SEQ_CLS", bias="all"))
    at = "base_model.model.classifier."
    state = {k: v + 1 for k, v in pm.state_dict().items()}
    for sub in ("dense", "out_proj"):
        state[at + f"modules_to_save.default.{sub}.bias"] = state.pop(at + f"modules_to_save.{sub}.bias")
    pm.load_state_dict(state)
    np.testing.assert_array_equal(pm.state_dict()[at + "dense.bias"], state[at + "dense.bias"])
    state[at + "modules_to_save.default.dense.bias"] = state[at + "dense.bias"] + 1
    with pytest.raises(ValueError, match="'base_model.model.classifier.modules_to_save.default.dense.bias' differs"):
        pm.load_state_dict(state)


def test_an_adapterhub_config_with_architecture_null_is_a_bottleneck_adapter(tmp_path):
    """adapters maps "architecture": null to BnConfig (its AdapterConfig.architecture default): such a
    config loads as the bottleneck adapter it is (numlm refused it as an unsupported architecture)."""
    import json
    d = tmp_path / "adapter"
    shutil.copytree(PEFT / "adapter-bert-tiny-seqcls" / "adapter", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["config"]["architecture"] = None
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    ref = np.load(PEFT / "adapter-bert-tiny-seqcls" / "reference.npz")
    pm = peft.PeftModel.from_pretrained(base("bert-tiny-seqcls", numlm.BertForSequenceClassification, "float64"), d)
    out = pm(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])
    np.testing.assert_allclose(out.logits, ref["logits"], rtol=1e-10, atol=0)
