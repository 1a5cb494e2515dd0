"""Configs: dataclasses with transformers' field names and defaults, read from and written to its
config.json, and checked when they are built (directly or from a dict)."""
import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..ops import ACTIVATIONS

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
SUMMARY_TYPES = ("last", "first", "mean", "cls_index")
OPENAI_AFN = {"gelu": "gelu_new", "relu": "relu"}  # modeling_openai.ACT_FNS: its "gelu" is the tanh form
GPT2_EOS = 50256  # <|endoftext|> in GPT-2's tokenizer


class _Fitting:
    """Default of GPT2Config's bos/eos ids: GPT-2's 50256 when the vocabulary holds it, else None."""

    def __repr__(self):
        return "GPT2_EOS if it fits"


FITTING = _Fitting()


@dataclasses.dataclass
class Config:
    """Base: subclasses declare transformers' field names with their defaults. Fields numlm does not
    use are kept in `extra` and written back, so a saved config.json round-trips."""

    model_type = ""

    def __post_init__(self):
        self.validate()  # direct construction is checked as from_dict is

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        if "num_labels" not in d and isinstance(d.get("id2label"), dict):
            d = {**d, "num_labels": len(d["id2label"])}  # transformers derives num_labels from id2label
        if d.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"config model_type {d.get('model_type')!r} does not match {cls.model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in d.items() if k not in names and k != "model_type"}
        fields = {k: v for k, v in d.items() if k in names}
        # shrunk hub checkpoints keep GPT-2's bos/eos 50256 with a small vocabulary: such an id can never
        # be produced, so it loads (with a warning) rather than refusing the checkpoint
        V = fields.get("vocab_size", getattr(cls, "vocab_size", None))
        outside = {k: fields.pop(k) for k in ("bos_token_id", "eos_token_id")
                   if isinstance(fields.get(k), int) and isinstance(V, int) and not 0 <= fields[k] < V}
        cfg = cls(**fields, **{k: None for k in outside}, extra=extra)
        for k, v in outside.items():
            warnings.warn(f"config {k} {v} lies outside the vocabulary [0, {V}): no token can be it")
            setattr(cfg, k, v)
        return cfg

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self):
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        d["model_type"] = self.model_type
        n = d.get("num_labels")
        if n is not None and not (isinstance(d.get("id2label"), dict) and len(d["id2label"]) == n):
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}  # what transformers writes
            d["label2id"] = {f"LABEL_{i}": i for i in range(n)}
        return d

    @property
    def max_tokens(self):
        """How many tokens a sequence may hold: the rows of the position table (RobertaConfig: fewer)"""
        return getattr(self, "max_position_embeddings", None) or self.n_positions

    # ---- checks ------------------------------------------------------------------------------
    def validate(self):
        """Refuse values numlm does not implement, with a clear error (subclasses extend)."""
        self._typed()
        self._positive("vocab_size", "num_labels")
        if getattr(self, "initializer_range", 0.0) < 0:
            raise ValueError(f"config initializer_range must be >= 0, got {self.initializer_range!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name, None)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size):
                raise ValueError(f"config {name} {v!r} must lie in [0, {self.vocab_size}) (vocab_size), or be None")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"config problem_type {self.problem_type!r} must be one of {PROBLEM_TYPES} or None")

    def _typed(self):
        """A field whose default is a bool takes True or False; one whose default is a float, a finite number."""
        for f in dataclasses.fields(self):
            v, d = getattr(self, f.name), f.default
            if isinstance(d, bool) and v is not None and (isinstance(v, (str, bytes)) or v not in (True, False)):
                raise ValueError(f"config {f.name} must be true or false, got {v!r}")
            if isinstance(d, float) and (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
                                         or not math.isfinite(v)):
                raise ValueError(f"config {f.name} must be a finite number, got {v!r}")

    def _positive(self, *names):
        for n in names:
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config {n} must be a positive integer, got {v!r}")

    def _probability(self, *names):
        for n in names:
            v = getattr(self, n)
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"config {n} must lie in [0, 1), got {v!r}")

    def _one_of(self, name, allowed, note=""):
        v = getattr(self, name)
        if v not in allowed:
            raise ValueError(f"config {name} {v!r} is not supported; numlm supports {sorted(allowed)}{note}")

    def _heads_divide(self, width, heads):
        C, H = getattr(self, width), getattr(self, heads)
        if C % H:
            raise ValueError(f"config {width} {C} is not a multiple of {heads} {H}")

    def _eps(self, name):
        if not getattr(self, name) > 0:
            raise ValueError(f"config {name} must be positive, got {getattr(self, name)!r}")


@dataclasses.dataclass
class BertConfig(Config):
    """transformers' BertConfig fields and defaults (bert-base-uncased)."""

    model_type = "bert"
    # grouped by what they size; the paper's symbols at the right
    vocab_size: int = 30522; type_vocab_size: int = 2; max_position_embeddings: int = 512  # V, segments, T max
    hidden_size: int = 768; num_hidden_layers: int = 12; num_attention_heads: int = 12  # C, L, H
    intermediate_size: int = 3072; hidden_act: str = "gelu"  # the FFN: I, act
    hidden_dropout_prob: float = 0.1; attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12; initializer_range: float = 0.02
    pad_token_id: Optional[int] = 0; tie_word_embeddings: bool = True
    position_embedding_type: str = "absolute"; is_decoder: bool = False; add_cross_attention: bool = False
    classifier_dropout: Optional[float] = None; num_labels: int = 2; problem_type: Optional[str] = None
    extra: dict = dataclasses.field(default_factory=dict)

    def validate(self):
        self._positive("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "type_vocab_size")
        super().validate()
        self._probability("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")
        self._heads_divide("hidden_size", "num_attention_heads")
        self._one_of("hidden_act", ACTIVATIONS)
        self._one_of("position_embedding_type", ("absolute",), " (only absolute positions)")
        if self.is_decoder or self.add_cross_attention:
            raise ValueError("config is_decoder / add_cross_attention: BERT as a decoder or with "
                             "cross-attention is not supported")
        self._eps("layer_norm_eps")


@dataclasses.dataclass
class _GPTConfig(Config):
    """Fields GPT-1 and GPT-2 share (names and defaults as transformers)."""

    # grouped by what they size; the paper's symbols at the right
    vocab_size: int = 50257; n_positions: int = 1024  # V, T max
    n_embd: int = 768; n_layer: int = 12; n_head: int = 12  # C, L, H
    resid_pdrop: float = 0.1; embd_pdrop: float = 0.1; attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5; initializer_range: float = 0.02
    # the multiple-choice head (transformers' SequenceSummary)
    summary_type: str = "cls_index"; summary_use_proj: bool = True; summary_activation: Optional[str] = None
    summary_proj_to_labels: bool = True; summary_first_dropout: float = 0.1
    tie_word_embeddings: bool = True; pad_token_id: Optional[int] = None
    num_labels: int = 2; problem_type: Optional[str] = None

    @property
    def hidden_size(self):
        return self.n_embd

    def validate(self):
        self._positive("n_positions", "n_embd", "n_layer", "n_head")
        super().validate()
        self._probability("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout")
        self._heads_divide("n_embd", "n_head")
        self._eps("layer_norm_epsilon")
        self._one_of("summary_type", SUMMARY_TYPES)
        if self.summary_activation is not None:
            self._one_of("summary_activation", ACTIVATIONS)


@dataclasses.dataclass
class GPT2Config(_GPTConfig):
    """transformers' GPT2Config fields and defaults (gpt2, 124M). bos/eos default to 50256 when the
    vocabulary holds it (a smaller vocabulary has no GPT-2 <|endoftext|>: None)."""

    model_type = "gpt2"
    n_inner: Optional[int] = None; activation_function: str = "gelu_new"  # the MLP: I (None: 4 C), act
    scale_attn_weights: bool = True; scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False  # an fp16 stability trick; float32/float64 math is unchanged
    add_cross_attention: bool = False; use_cache: bool = True
    bos_token_id: Optional[int] = FITTING; eos_token_id: Optional[int] = FITTING
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) is FITTING:
                setattr(self, name, GPT2_EOS if isinstance(self.vocab_size, int) and self.vocab_size > GPT2_EOS
                        else None)
        super().__post_init__()

    def validate(self):
        super().validate()
        self._one_of("activation_function", ACTIVATIONS)
        if self.n_inner is not None:
            self._positive("n_inner")
        if self.add_cross_attention:
            raise ValueError("config add_cross_attention=True: GPT-2 with cross-attention is not supported")

    @property
    def inner_size(self):
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


@dataclasses.dataclass
class OpenAIGPTConfig(_GPTConfig):
    """transformers' OpenAIGPTConfig fields and defaults (openai-gpt)."""

    model_type = "openai-gpt"
    vocab_size: int = 40478
    n_positions: int = 512
    afn: str = "gelu"
    extra: dict = dataclasses.field(default_factory=dict)

    def validate(self):
        super().validate()
        self._one_of("afn", OPENAI_AFN, " (OpenAI GPT's 'gelu' is the tanh form)")

    @property
    def inner_size(self):
        return 4 * self.n_embd

    @property
    def activation_function(self):
        return OPENAI_AFN[self.afn]


@dataclasses.dataclass
class RobertaConfig(BertConfig):
    """transformers' RobertaConfig: BertConfig's fields, RoBERTa's vocabulary and special ids (pad 1,
    the padding row of both the token and the position table; positions count from pad + 1)."""

    model_type = "roberta"
    vocab_size: int = 50265; pad_token_id: Optional[int] = 1
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def max_tokens(self):
        """the position table's rows after RoBERTa's first pad_token_id + 1, where its positions start"""
        return self.max_position_embeddings - self.pad_token_id - 1

    def validate(self):
        super().validate()
        if self.pad_token_id is None or self.pad_token_id + 1 >= self.max_position_embeddings:
            raise ValueError(f"config pad_token_id {self.pad_token_id!r}: RoBERTa counts positions from "
                             f"pad_token_id + 1 and needs it below max_position_embeddings - 1 "
                             f"({self.max_position_embeddings - 1})")


@dataclasses.dataclass
class DistilBertConfig(Config):
    """transformers' DistilBertConfig fields and defaults (distilbert-base-uncased)."""

    model_type = "distilbert"
    # grouped by what they size; the paper's symbols at the right
    vocab_size: int = 30522; max_position_embeddings: int = 512; sinusoidal_pos_embds: bool = False  # V, T max
    dim: int = 768; n_layers: int = 6; n_heads: int = 12  # C, L, H
    hidden_dim: int = 3072; activation: str = "gelu"  # the FFN: I, act
    dropout: float = 0.1; attention_dropout: float = 0.1; qa_dropout: float = 0.1; seq_classif_dropout: float = 0.2
    initializer_range: float = 0.02; pad_token_id: Optional[int] = 0; tie_word_embeddings: bool = True
    num_labels: int = 2; problem_type: Optional[str] = None
    extra: dict = dataclasses.field(default_factory=dict)

    layer_norm_eps = 1e-12  # hard-coded in modeling_distilbert

    # transformers' attribute_map: the names the rest of numlm (and peft) read
    @property
    def hidden_size(self):
        return self.dim

    @property
    def num_hidden_layers(self):
        return self.n_layers

    @property
    def num_attention_heads(self):
        return self.n_heads

    def validate(self):
        self._positive("dim", "n_layers", "n_heads", "hidden_dim", "max_position_embeddings")
        super().validate()
        self._probability("dropout", "attention_dropout", "qa_dropout", "seq_classif_dropout")
        self._heads_divide("dim", "n_heads")
        self._one_of("activation", ACTIVATIONS)
        if self.sinusoidal_pos_embds:
            raise ValueError("config sinusoidal_pos_embds=True (fixed sinusoidal positions) is not supported; "
                             "numlm supports DistilBERT's learned positions")
