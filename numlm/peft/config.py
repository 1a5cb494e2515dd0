"""Adapter configs: peft's LoraConfig (with rsLoRA, DoRA and bias), IA3Config, PromptTuningConfig, PrefixTuningConfig and AdapterHub's
bottleneck configs (SeqBnConfig = Pfeiffer, DoubleSeqBnConfig = Houlsby), with the field names and
defaults of peft 0.21 and adapters 1.3, read from and written to their adapter_config.json."""
import dataclasses
import math
import re
from typing import Optional, Union

TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM", "FEATURE_EXTRACTION")
# the heads peft trains for a new task (its modules_to_save per task type)
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}
# peft's default LoRA targets per model type
LORA_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
                "gpt2": ["c_attn"], "openai-gpt": ["c_attn"]}
# peft's default IA3 targets and feedforward modules (GPT-1, which peft does not list, as GPT-2);
# names match by suffix, so BERT's "output.dense" is attention.output.dense too
IA3_TARGETS = {"bert": ["key", "output.dense", "value"], "roberta": ["key", "output.dense", "value"],
               "distilbert": ["q_lin", "v_lin", "lin2"], "gpt2": ["c_attn", "mlp.c_proj"],
               "openai-gpt": ["c_attn", "mlp.c_proj"]}
IA3_FEEDFORWARD = {"bert": ["output.dense"], "roberta": ["output.dense"], "distilbert": ["lin2"],
                   "gpt2": ["mlp.c_proj"], "openai-gpt": ["mlp.c_proj"]}
LORA_BIAS = ("none", "lora_only", "all")


def _task(task_type):
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type {task_type!r} is not supported; numlm supports {TASK_TYPES} or None")


def _positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclasses.dataclass
class LoraConfig:
    """y = x W + b + s * dropout(x) A^T B^T on every module named in target_modules; s = lora_alpha / r,
    or lora_alpha / sqrt(r) with use_rslora. use_dora: DoRA's magnitude vector on top (numlm.peft.ops.
    dora_linear_forward). bias: "lora_only" trains the target layers' biases, "all" every bias."""

    peft_type = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list, str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list] = None
    bias: str = "none"
    task_type: Optional[str] = None
    init_lora_weights: Union[bool, str] = True
    use_rslora: bool = False
    use_dora: bool = False
    layers_to_transform: Optional[Union[list, int]] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None

    def __post_init__(self):
        if self.use_rslora and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0):
            raise ValueError(f"use_rslora scales by lora_alpha / sqrt(r): r must be a positive integer, got {self.r!r}")
        _positive_int("r", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not 0 < self.lora_alpha < float("inf"):
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        self.target_modules = _module_names("target_modules", self.target_modules)
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is empty: name the modules LoRA adapts (e.g. ['query', 'value'])")
        if self.bias not in LORA_BIAS:
            raise ValueError(f"LoRA bias={self.bias!r} is not supported; peft's are {LORA_BIAS}")
        for k in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"{k} must be True or False, got {getattr(self, k)!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} is not supported; "
                             "numlm supports True (peft's default), False and 'gaussian'")
        if self.layers_to_transform is not None:
            raise ValueError("layers_to_transform is not supported; adapt every layer or use a regex "
                             "in target_modules")
        _save_names(self.modules_to_save)
        _task(self.task_type)

    @property
    def scaling(self):
        """s = lora_alpha / r (peft), lora_alpha / sqrt(r) with use_rslora (Kalajdzievski 2023)."""
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r


def _module_names(name, v):
    """A list of module names (a set or tuple sorted, as peft saves them) or a regex string, or None."""
    if isinstance(v, (tuple, set)):
        v = sorted(v)
    if v is not None and not isinstance(v, (list, str)):
        raise ValueError(f"{name} must be a list of module names or a regex string, got {type(v).__name__}")
    if isinstance(v, list) and not all(isinstance(n, str) for n in v):
        raise ValueError(f"{name} must hold module names (str), got {v!r}")
    if isinstance(v, str):
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"{name} {v!r} is not a regular expression: {e}") from None
    return v


def _save_names(v):
    """modules_to_save: None or a list of module names"""
    if v is not None and not (isinstance(v, list) and all(isinstance(n, str) for n in v)):
        raise ValueError(f"modules_to_save must be a list of module names, got {v!r}")
    return v


@dataclasses.dataclass
class IA3Config:
    """(IA)^3 (Liu et al. 2022): a learned vector l rescales each target module's output,
    y = (x W + b) * l, or its input for a feed-forward module, y = (x * l) W + b; l starts at 1."""

    peft_type = "IA3"
    target_modules: Optional[Union[list, str]] = None
    feedforward_modules: Optional[Union[list, str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list] = None
    init_ia3_weights: bool = True
    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None

    def __post_init__(self):
        self.target_modules = _module_names("target_modules", self.target_modules)
        self.feedforward_modules = _module_names("feedforward_modules", self.feedforward_modules)
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is empty: name the modules IA3 rescales (e.g. ['key', 'value'])")
        t, f = self.target_modules, self.feedforward_modules
        if isinstance(t, list) and isinstance(f, list) and not set(f) <= set(t):
            raise ValueError(f"feedforward_modules {sorted(set(f) - set(t))} are not in target_modules {t}: "
                             "peft requires feedforward_modules to be a subset of target_modules")
        _save_names(self.modules_to_save)
        if self.init_ia3_weights not in (True, False):
            raise ValueError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        _task(self.task_type)


# peft's; get_peft_model initialises RANDOM and TEXT, a folder made with any of them loads
PROMPT_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclasses.dataclass
class PromptTuningConfig:
    """num_virtual_tokens learned embeddings (n, C) prepended to the word embeddings."""

    peft_type = "PROMPT_TUNING"
    num_virtual_tokens: int = 20
    task_type: Optional[str] = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None  # TEXT's, kept so a loaded folder is saved as peft reads it
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None

    def __post_init__(self):
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if self.prompt_tuning_init not in PROMPT_INITS:
            raise ValueError(f"prompt_tuning_init must be one of {list(PROMPT_INITS)}, got {self.prompt_tuning_init!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError("num_transformer_submodules must be 1 (encoder-only or decoder-only models)")
        _save_names(self.modules_to_save)
        _task(self.task_type)


@dataclasses.dataclass
class PrefixTuningConfig:
    """num_virtual_tokens learned keys and values per layer, (n, L*2*C), no reparameterization."""

    peft_type = "PREFIX_TUNING"
    num_virtual_tokens: int = 20
    task_type: Optional[str] = None
    prefix_projection: bool = False
    encoder_hidden_size: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None

    def __post_init__(self):
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if self.prefix_projection:
            raise ValueError("prefix_projection=True (the MLP reparameterization) is not supported; "
                             "numlm implements prefix tuning without projection")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError("num_transformer_submodules must be 1 (encoder-only or decoder-only models)")
        _save_names(self.modules_to_save)
        _task(self.task_type)


ACTIVATIONS = ("swish", "silu", "relu", "gelu", "gelu_new", "tanh")


@dataclasses.dataclass
class BnConfig:
    """AdapterHub's bottleneck adapter: a = r + scaling * up(act(down(z))), see numlm.peft.ops.bottleneck_forward."""

    architecture = "bottleneck"
    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: Union[float, int] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = False  # adapters' BnConfig default; SeqBnConfig (Pfeiffer) sets True
    original_ln_after: bool = True
    residual_before_ln: Union[bool, str] = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    is_parallel: bool = False
    scaling: Union[float, str] = 1.0
    use_gating: bool = False
    dropout: float = 0.0
    leave_out: list = dataclasses.field(default_factory=list)
    phm_layer: bool = False
    inv_adapter: Optional[str] = None
    cross_adapter: bool = False
    stochastic_depth: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)  # AdapterHub fields numlm keeps but does not use

    def __post_init__(self):
        r = self.reduction_factor
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
            raise ValueError(f"reduction_factor must be a positive number, got {r!r}")
        if isinstance(r, dict):
            raise ValueError("a per-layer reduction_factor dict is not supported")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in ACTIVATIONS:
            raise ValueError(f"adapter non_linearity {self.non_linearity!r} is not supported; numlm supports "
                             f"{ACTIVATIONS}")
        if self.residual_before_ln not in (True, False):
            raise ValueError(f"residual_before_ln={self.residual_before_ln!r} is not supported (True or False)")
        unknown = [k for k, bad in (("ln_before", self.ln_before), ("ln_after", self.ln_after),
                                    ("is_parallel", self.is_parallel), ("use_gating", self.use_gating),
                                    ("phm_layer", self.phm_layer), ("inv_adapter", self.inv_adapter),
                                    ("cross_adapter", self.cross_adapter),
                                    ("stochastic_depth", self.stochastic_depth)) if bad]
        if unknown:
            raise ValueError(f"adapter config options {unknown} are not supported; numlm implements "
                             "sequential bottleneck adapters (seq_bn, double_seq_bn)")
        if isinstance(self.scaling, (str, bool)) or not isinstance(self.scaling, (int, float)) \
                or not math.isfinite(self.scaling):
            raise ValueError(f"adapter scaling={self.scaling!r} is not supported; give a finite number")
        if not isinstance(self.leave_out, (list, tuple)):
            raise ValueError(f"adapter leave_out must be a list of layer indices, got {self.leave_out!r}")
        if self.dropout != 0.0:
            raise ValueError(f"adapter dropout={self.dropout!r} is not supported; numlm's adapters use 0.0")
        if self.init_weights not in ("bert", "mam_adapter"):
            raise ValueError(f"adapter init_weights={self.init_weights!r} is not supported ('bert', 'mam_adapter')")

    def bottleneck(self, hidden_size):
        """The bottleneck width m = C / reduction_factor; C must be divisible by it."""
        m = hidden_size / self.reduction_factor
        if m != int(m) or m < 1:
            raise ValueError(f"reduction_factor {self.reduction_factor} does not divide the hidden size "
                             f"{hidden_size}")
        return int(m)

    def to_dict(self):
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        d["architecture"] = self.architecture
        return d

    @property
    def peft_type(self):
        return "BOTTLENECK"


@dataclasses.dataclass
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (2020): one adapter after the feed-forward sub-layer, the block's LayerNorm before it."""

    reduction_factor: Union[float, int] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = True


@dataclasses.dataclass
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (2019): adapters after the attention and after the feed-forward sub-layers."""

    mh_adapter: bool = True
    original_ln_before: bool = False
    non_linearity: str = "swish"


def bn_config_from_dict(d):
    """A BnConfig from AdapterHub's adapter_config.json "config" dict (unknown options refused)."""
    if not isinstance(d, dict):
        raise ValueError(f"adapter config must be a dict, got {type(d).__name__}")
    if d.get("architecture") not in (None, "bottleneck"):  # adapters: None is BnConfig's
        raise ValueError(f"adapter architecture {d.get('architecture')!r} is not supported; numlm supports "
                         "bottleneck adapters (seq_bn, double_seq_bn)")
    names = {f.name for f in dataclasses.fields(BnConfig)} - {"extra"}
    known = {k: v for k, v in d.items() if k in names}
    # options AdapterHub writes that matter only when their switch (phm_layer, ...) is on
    extra = {k: v for k, v in d.items() if k not in names and k != "architecture"}
    if known.get("residual_before_ln") == "post_add":
        raise ValueError("residual_before_ln='post_add' is not supported")
    known.setdefault("mh_adapter", False)
    return BnConfig(**known, extra=extra)
