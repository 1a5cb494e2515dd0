"""Adapter folders both ways, never a pickle:
- peft: adapter_config.json + adapter_model.safetensors (keys `base_model.model.<path>.lora_A.weight`,
  `prompt_embeddings`, heads `base_model.model.classifier.weight` / `base_model.classifier.weight`);
- AdapterHub: adapter_config.json + adapter.safetensors (+ head_config.json + model_head.safetensors).
"""
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..io.checkpoint import write_folder, _load_file
from .config import LoraConfig, IA3Config, PromptTuningConfig, PrefixTuningConfig, bn_config_from_dict

PEFT_WEIGHTS, PEFT_PICKLE = "adapter_model.safetensors", "adapter_model.bin"
HUB_WEIGHTS, HUB_PICKLE = "adapter.safetensors", "pytorch_adapter.bin"
HUB_HEAD, HUB_HEAD_PICKLE, HUB_HEAD_CONFIG = "model_head.safetensors", "pytorch_model_head.bin", "head_config.json"
CONFIG = "adapter_config.json"
PEFT_VERSION, ADAPTERS_VERSION = "0.21.2", "adapters.1.3.0"

PEFT_CONFIGS = {"LORA": LoraConfig, "IA3": IA3Config, "PROMPT_TUNING": PromptTuningConfig, "PREFIX_TUNING": PrefixTuningConfig}
# adapter_config.json fields that never change the adapted model's function (bookkeeping, or
# initialisation only); any other field numlm does not implement is refused unless null / false / empty
PEFT_IGNORED = {"peft_version", "revision", "auto_mapping", "megatron_core", "qalora_group_size",
                "tokenizer_name_or_path", "tokenizer_kwargs", "prompt_tuning_init_text", "init_weights",
                "loftq_config", "eva_config", "corda_config", "lora_ga_config"}

CONVERT = ("numlm never unpickles; convert it once with torch installed:\n"
           "  python -c \"import torch; from safetensors.torch import save_file; "
           "save_file(torch.load('{src}', map_location='cpu'), '{dst}')\"")


def _folder(path):
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"adapter folder {str(path)!r} does not exist or is not a directory")
    return path


def folder_kind(path):
    """"peft" or "adapterhub" from the files present; pickle-only folders are refused, saying how to convert."""
    path = _folder(path)
    if (path / PEFT_WEIGHTS).is_file():
        return "peft"
    if (path / HUB_WEIGHTS).is_file():
        return "adapterhub"
    for pickle, dst in ((PEFT_PICKLE, PEFT_WEIGHTS), (HUB_PICKLE, HUB_WEIGHTS)):
        if (path / pickle).is_file():
            src = path / pickle
            raise ValueError(f"adapter folder {str(path)!r} holds only a pickle ({pickle}), which can run code "
                             "when loaded. " + CONVERT.format(src=src, dst=path / dst))
    raise ValueError(f"adapter folder {str(path)!r} has neither {PEFT_WEIGHTS} (peft) nor {HUB_WEIGHTS} (AdapterHub)")


def read_json(f):
    if not f.is_file():
        raise ValueError(f"no {f.name} in {str(f.parent)!r}")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(f)!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{str(f)!r} must hold a JSON object")
    return d


def peft_config_from_dict(d, where="adapter_config.json"):
    """A numlm config from peft's adapter_config.json; unknown methods and options are refused."""
    kind = d.get("peft_type")
    if kind not in PEFT_CONFIGS:
        raise ValueError(f"{where}: peft_type {kind!r} is not supported; numlm supports {sorted(PEFT_CONFIGS)}")
    cls = PEFT_CONFIGS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k, v in d.items() if k not in names and k != "peft_type" and k not in PEFT_IGNORED
               and v not in (None, False, {}, [])]
    if unknown:
        raise ValueError(f"{where}: options {sorted(unknown)} ({kind}) are not supported by numlm")
    kwargs = {k: v for k, v in d.items() if k in names}
    return cls(**kwargs)


# peft 0.21's adapter_config.json fields at their defaults, so a saved file has every field peft writes
PEFT_DEFAULTS = {
    "LORA": {"alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
             "bias": "none", "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
             "exclude_modules": None, "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
             "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_bias": False,
             "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
             "monteclora_config": None, "qalora_group_size": 16, "rank_pattern": {}, "revision": None,
             "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
             "use_qalora": False, "use_rslora": False, "velora_config": None},
    "PROMPT_TUNING": {"auto_mapping": None, "prompt_tuning_init_text": None, "revision": None,
                      "tokenizer_kwargs": None, "tokenizer_name_or_path": None},
    "PREFIX_TUNING": {"auto_mapping": None, "init_weights": None, "revision": None},
    "IA3": {"auto_mapping": None, "exclude_modules": None, "revision": None},
}


def peft_config_to_dict(config):
    d = dict(PEFT_DEFAULTS[config.peft_type])
    d.update({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    d["peft_type"] = config.peft_type
    d["peft_version"] = PEFT_VERSION
    for k in ("target_modules", "feedforward_modules"):  # peft keeps them as sets and saves them sorted
        if isinstance(d.get(k), (set, tuple, list)):
            d[k] = sorted(d[k])
    return d


# AdapterHub's own defaults for the bottleneck options numlm keeps at their off values
HUB_DEFAULTS = {"adapter_residual_before_ln": False, "cross_adapter": False, "factorized_phm_W": True,
                "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform",
                "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None,
                "learn_phm": True, "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4,
                "phm_init_range": 0.0001, "phm_layer": False, "phm_rank": 1, "shared_W_phm": False,
                "shared_phm_rule": True}
HUB_FIELDS = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before",
              "original_ln_after", "residual_before_ln", "ln_before", "ln_after", "init_weights", "is_parallel",
              "scaling", "use_gating", "dropout", "leave_out", "stochastic_depth")


def hub_config_to_dict(config):
    d = dict(HUB_DEFAULTS)
    d.update({k: v for k, v in config.extra.items()})
    for k in HUB_FIELDS:
        d[k] = getattr(config, k)
    return dict(sorted(d.items()))


def hub_config_from_dict(d, where="adapter_config.json"):
    cfg = d.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: no 'config' object (an AdapterHub adapter_config.json has one)")
    try:  # unknown switches (phm_layer, use_gating, ...) are refused by the config itself
        return bn_config_from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def load_tensors(f):
    """{key: array}; bfloat16 tensors (peft's file of a bfloat16 model) as float32, as a model's are read"""
    return _load_file(f)


def tensors_writer(tensors):
    """write(tmp) for write_folder: the tensors as a safetensors file"""
    return lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)


def json_writer(d):
    """write(tmp) for write_folder: d as JSON, its text made now (a value JSON cannot hold fails before
    anything is written)"""
    try:
        text = json.dumps(d, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"the adapter config cannot be written as JSON: {e}") from None

    def w(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    return w


def write_files(path, named):
    """{file name: write(tmp)} into folder path, renamed in together with what an earlier save left that
    this one does not write (another library's weights, which folder_kind would read, or a head the new
    adapter has not) removed: a failure at any point leaves the folder as it was. Returns path."""
    others = (PEFT_WEIGHTS, PEFT_PICKLE, HUB_WEIGHTS, HUB_PICKLE, HUB_HEAD, HUB_HEAD_PICKLE, HUB_HEAD_CONFIG)
    write_folder(path, named, remove=[path / name for name in others if name not in named])
    return path


def head_fits_class(head_config, model_class, where):
    """AdapterHub's rule: a head loads only onto the model class it was saved from (a sequence
    classifier's classifier is no token classifier's, whatever their shapes). As its load_adapter
    does, another class's head is left out with a warning and the adapter still loads."""
    saved = head_config.get("model_class")
    if saved is None or saved == model_class:
        return True
    warnings.warn(f"{str(where)!r}: Model class '{saved}' of found prediction head does not match current "
                  f"model class ({model_class}); the head is not loaded, the adapter is")
    return False


def hub_label2id(model_config):
    """head_config.json's label2id, {name: id}: the model's labels as AdapterHub saves them (LABEL_i by default)"""
    id2label = model_config.to_dict().get("id2label") or {}
    return {str(name): int(i) for i, name in sorted(id2label.items(), key=lambda t: int(t[0]))}


def set_hub_labels(model_config, head_config):
    """The model's label names from a loaded head's label2id, as AdapterHub sets them (one name per label)"""
    l2i, n = head_config.get("label2id"), getattr(model_config, "num_labels", None)
    ids = list(l2i.values()) if isinstance(l2i, dict) else []
    if n and all(type(i) is int for i in ids) and sorted(ids) == list(range(n)):
        model_config.extra["id2label"] = {str(i): name for name, i in l2i.items()}
        model_config.extra["label2id"] = dict(l2i)
