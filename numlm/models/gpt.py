"""GPT-1 (transformers' OpenAI GPT) and GPT-2: causal decoders with LM, sequence-classification and
multiple-choice heads, forward and backward by hand, with transformers' keys and numbers.

GPT-1 (post-LN, no final LayerNorm):  h0 = U We + Wp;  n = LN(h + attn(h));  h = LN(n + mlp(n))
GPT-2 (pre-LN, final ln_f):           h0 = U We + Wp;  h = h + attn(ln_1(h));  h = h + mlp(ln_2(h))
LM head (tied):                       logits = h We^T
Both use Conv1D linears (weight (C_in, C_out), no transpose) and a fused c_attn = [q | k | v].
"""
import dataclasses
import math
from typing import Optional

import numpy as np

from ..nn import Module, ModuleList, Linear, Embedding, LayerNorm, Dropout, Activation, Attention
from ..ops import (ACTIVATIONS, embedding_forward, embedding_backward, cross_entropy_forward,
                   cross_entropy_backward, mse_forward, mse_backward)
from ..ops._check import ids_in_range
from .base import ModelOutput, PreTrainedModel, register, as_ids, check_grad
from .config import Config

IGNORE_INDEX = -100
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
SUMMARY_TYPES = ("last", "first", "mean", "cls_index")
OPENAI_AFN = {"gelu": "gelu_new", "relu": "relu"}  # modeling_openai.ACT_FNS: its "gelu" is the tanh form


# ---------------------------------------------------------------------------------------- configs

@dataclasses.dataclass
class _GPTConfigBase(Config):
    """Fields GPT-1 and GPT-2 share (names and defaults as transformers)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    summary_type: str = "cls_index"
    summary_use_proj: bool = True
    summary_activation: Optional[str] = None
    summary_proj_to_labels: bool = True
    summary_first_dropout: float = 0.1
    tie_word_embeddings: bool = True
    pad_token_id: Optional[int] = None
    num_labels: int = 2
    problem_type: Optional[str] = None

    @property
    def hidden_size(self):
        return self.n_embd

    def validate(self):
        self._positive("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "num_labels")
        self._probability("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout")
        if self.n_embd % self.n_head:
            raise ValueError(f"config n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"config layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
        if self.summary_type not in SUMMARY_TYPES:
            raise ValueError(f"config summary_type {self.summary_type!r} is not supported; numlm supports "
                             f"{SUMMARY_TYPES}")
        if self.summary_activation is not None and self.summary_activation not in ACTIVATIONS:
            raise ValueError(f"config summary_activation {self.summary_activation!r} is not supported; numlm "
                             f"supports {sorted(ACTIVATIONS)}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"config pad_token_id {self.pad_token_id} must lie in [0, {self.vocab_size})")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"config problem_type {self.problem_type!r} must be one of {PROBLEM_TYPES} or None")


@dataclasses.dataclass
class GPT2Config(_GPTConfigBase):
    """transformers' GPT2Config fields and defaults (gpt2, 124M)."""

    model_type = "gpt2"
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False  # an fp16 stability trick; float32/float64 math is unchanged
    add_cross_attention: bool = False
    use_cache: bool = True
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256
    extra: dict = dataclasses.field(default_factory=dict)

    def validate(self):
        super().validate()
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"config activation_function {self.activation_function!r} is not supported; "
                             f"numlm supports {sorted(ACTIVATIONS)}")
        if self.n_inner is not None:
            self._positive("n_inner")
        if self.add_cross_attention:
            raise ValueError("config add_cross_attention=True: GPT-2 with cross-attention is not supported")

    @property
    def inner_size(self):
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


@dataclasses.dataclass
class OpenAIGPTConfig(_GPTConfigBase):
    """transformers' OpenAIGPTConfig fields and defaults (openai-gpt)."""

    model_type = "openai-gpt"
    vocab_size: int = 40478
    n_positions: int = 512
    afn: str = "gelu"
    extra: dict = dataclasses.field(default_factory=dict)

    def validate(self):
        super().validate()
        if self.afn not in OPENAI_AFN:
            raise ValueError(f"config afn {self.afn!r} is not supported; numlm supports {sorted(OPENAI_AFN)} "
                             "(OpenAI GPT's 'gelu' is the tanh form)")

    @property
    def inner_size(self):
        return 4 * self.n_embd

    @property
    def activation_function(self):
        return OPENAI_AFN[self.afn]


# ---------------------------------------------------------------------------------------- blocks

class CausalSelfAttention(Module):
    """a = c_proj(softmax(q k^T * scale + causal/padding mask) v),  [q | k | v] = c_attn(x)
    x: (B, T, C) -> (B, T, C). Keys `attn.c_attn.*`, `attn.c_proj.*` (Conv1D layout)."""

    def __init__(self, config, scale, causal_fill=None):
        super().__init__()
        C = config.n_embd
        self.c_attn = Linear(C, 3 * C, torch_layout=False)
        self.c_proj = Linear(C, C, torch_layout=False)
        self.core = Attention(config.n_head, config.attn_pdrop, causal=True, causal_fill=causal_fill, scale=scale)
        self.resid_dropout = Dropout(config.resid_pdrop)

    def forward(self, x, attention_mask=None, past=None):
        C = x.shape[-1]
        qkv = self.c_attn(x)  # (B, T, 3C)
        y = self.core(qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:], attention_mask, past)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def backward(self, da):
        dy = self.c_proj.backward(self.resid_dropout.backward(da))
        dq, dk, dv = self.core.backward(dy)
        return self.c_attn.backward(np.concatenate([dq, dk, dv], axis=-1))  # (B, T, C)


class MLP(Module):
    """m = dropout(c_proj(act(c_fc(x))))      x: (B, T, C) -> (B, T, C), inner width I"""

    def __init__(self, config):
        super().__init__()
        C, inner = config.n_embd, config.inner_size
        self.c_fc = Linear(C, inner, torch_layout=False)
        self.act = Activation(config.activation_function)
        self.c_proj = Linear(inner, C, torch_layout=False)
        self.dropout = Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, I) inside

    def backward(self, dm):
        return self.c_fc.backward(self.act.backward(self.c_proj.backward(self.dropout.backward(dm))))


def _attn_scale(config, layer_idx):
    D = config.n_embd // config.n_head
    scale = 1.0 / math.sqrt(D) if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= layer_idx + 1
    return scale


class GPT2Block(Module):
    """pre-LN:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))"""

    def __init__(self, config, layer_idx):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps)
        self.attn = CausalSelfAttention(config, _attn_scale(config, layer_idx))
        self.ln_2 = LayerNorm(config.n_embd, eps)
        self.mlp = MLP(config)

    def forward(self, x, attention_mask=None, past=None):
        x = x + self.attn(self.ln_1(x), attention_mask, past)
        return x + self.mlp(self.ln_2(x))

    def backward(self, dout):
        # x2 = x1 + mlp(ln_2(x1)):  dx1 = dx2 + ln_2'(mlp'(dx2))
        dx1 = dout + self.ln_2.backward(self.mlp.backward(dout))
        # x1 = x + attn(ln_1(x)):   dx = dx1 + ln_1'(attn'(dx1))
        return dx1 + self.ln_1.backward(self.attn.backward(dx1))


class OpenAIGPTBlock(Module):
    """post-LN:  n = ln_1(x + attn(x));  h = ln_2(n + mlp(n)).  Future scores are replaced by -1e4."""

    def __init__(self, config):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.attn = CausalSelfAttention(config, 1.0 / math.sqrt(config.n_embd // config.n_head), causal_fill=-1e4)
        self.ln_1 = LayerNorm(config.n_embd, eps)
        self.mlp = MLP(config)
        self.ln_2 = LayerNorm(config.n_embd, eps)

    def forward(self, x, attention_mask=None, past=None):
        n = self.ln_1(x + self.attn(x, attention_mask, past))
        return self.ln_2(n + self.mlp(n))

    def backward(self, dh):
        # h = ln_2(n + mlp(n)):  dn = ds + mlp'(ds),  ds = ln_2'(dh)
        ds = self.ln_2.backward(dh)
        dn = ds + self.mlp.backward(ds)
        # n = ln_1(x + attn(x)): dx = dr + attn'(dr),  dr = ln_1'(dn)
        dr = self.ln_1.backward(dn)
        return dr + self.attn.backward(dr)


# ---------------------------------------------------------------------------------------- input checks

def _causal_lm_loss(logits, labels, vocab_size):
    """loss = mean over (b, t) with labels[b, t+1] != -100 of CE(logits[b, t], labels[b, t+1])
    transformers' shift, written as targets aligned with logits (the last position is ignored), so
    no (B, T-1, V) copy of the logits is made. In the logits' dtype."""
    labels = as_ids("labels", labels)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have the shape of input_ids {logits.shape[:-1]}, got {labels.shape}")
    ids_in_range("labels", labels, vocab_size, allow=IGNORE_INDEX)
    targets = np.full(labels.shape, IGNORE_INDEX, dtype=np.int64)
    targets[..., :-1] = labels[..., 1:]
    return cross_entropy_forward(logits, targets, IGNORE_INDEX)


# ---------------------------------------------------------------------------------------- backbones

class _GPTPreTrainedModel(PreTrainedModel):
    base_model_prefix = "transformer"
    ignore_on_load = (r"(^|\.)attn\.bias$", r"(^|\.)attn\.masked_bias$")  # old causal-mask buffers

    def __init__(self, config):
        if isinstance(config, dict):
            config = self.config_class.from_dict(config)
        if not isinstance(config, self.config_class):
            raise ValueError(f"config must be a {self.config_class.__name__} or a dict, got {type(config).__name__}")
        super().__init__(config)

    def _need_last(self):
        if self._last is None:
            raise ValueError("backward() needs a forward pass first")
        return self._last


class _GPTBackbone(_GPTPreTrainedModel):
    """The decoder both families share: token + position (+ token type) embeddings, L blocks.
    Subclasses name the embedding tables (GPT-2 `wte`/`wpe`, GPT-1 `tokens_embed`/`positions_embed`)
    and say whether a final `ln_f` exists. input_ids may be (B, T) or (B, N, T) (multiple choice:
    flattened to (B*N, T) as transformers does, outputs reshaped back)."""

    def _tables(self):
        raise NotImplementedError

    def _final_norm(self):
        return None

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, position_ids, past_key_values):
        cfg = self.config
        input_ids = as_ids("input_ids", input_ids)
        if input_ids.ndim < 2 or input_ids.shape[-1] == 0 or input_ids.size == 0:
            raise ValueError(f"input_ids must have shape (B, T) or (B, N, T) with T >= 1, got {input_ids.shape}")
        shape = input_ids.shape
        T = shape[-1]
        ids = input_ids.reshape(-1, T)  # (B, T)
        B = ids.shape[0]
        ids_in_range("input_ids", ids, cfg.vocab_size)
        past_len = self._check_past(past_key_values, B)
        if past_len + T > cfg.n_positions:
            raise ValueError(f"sequence length {past_len + T} (past {past_len} + input_ids {T}) exceeds "
                             f"n_positions {cfg.n_positions}")
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            want = shape[:-1] + (past_len + T,)
            if attention_mask.shape != want:
                raise ValueError(f"attention_mask must have shape {want} (input_ids {shape}, past length "
                                 f"{past_len}), got {attention_mask.shape}")
            if attention_mask.dtype != np.bool_ and not np.isin(attention_mask, (0, 1)).all():
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
            attention_mask = attention_mask.reshape(B, past_len + T).astype(bool)
            if attention_mask.all():
                attention_mask = None  # nothing masked: the plain causal mask
        if token_type_ids is not None:
            token_type_ids = as_ids("token_type_ids", token_type_ids)
            if token_type_ids.shape != shape:
                raise ValueError(f"token_type_ids must have the shape of input_ids {shape}, got {token_type_ids.shape}")
            token_type_ids = token_type_ids.reshape(B, T)
            ids_in_range("token_type_ids", token_type_ids, cfg.vocab_size)  # looked up in the token table
        if position_ids is None:
            position_ids = np.arange(past_len, past_len + T, dtype=np.int64)[None]  # padding does not shift
        position_ids = as_ids("position_ids", position_ids)
        if position_ids.shape[-1:] != (T,) or position_ids.size not in (T, B * T):
            raise ValueError(f"position_ids must have shape {shape}, {(1, T)} or {(T,)}, got {position_ids.shape}")
        position_ids = np.broadcast_to(position_ids.reshape(-1, T), (B, T))
        ids_in_range("position_ids", position_ids, cfg.n_positions)
        return shape, ids, attention_mask, token_type_ids, position_ids

    def _check_past(self, past, B):
        if past is None:
            return 0
        cfg = self.config
        H, D = cfg.n_head, cfg.n_embd // cfg.n_head
        if not isinstance(past, (tuple, list)) or len(past) != cfg.n_layer:
            raise ValueError(f"past_key_values must be a tuple of {cfg.n_layer} (key, value) pairs, got "
                             f"{type(past).__name__} of length {len(past) if hasattr(past, '__len__') else '?'}")
        Tp = None
        dtype = self._tables()[0].params["weight"].dtype  # (self.dtype walks every module)
        for i, kv in enumerate(past):
            if not isinstance(kv, (tuple, list)) or len(kv) != 2:
                raise ValueError(f"past_key_values[{i}] must be a (key, value) pair")
            for name, a in zip(("key", "value"), kv):
                if not isinstance(a, np.ndarray) or a.ndim != 4 or a.shape[:2] != (B, H) or a.shape[3] != D:
                    raise ValueError(f"past_key_values[{i}] {name} must have shape (B, H, T_past, D) = "
                                     f"({B}, {H}, T_past, {D}), got {getattr(a, 'shape', type(a).__name__)}")
                if a.dtype != dtype:
                    raise ValueError(f"past_key_values[{i}] {name} has dtype {a.dtype}, the model {dtype}")
                if Tp is None:
                    Tp = a.shape[2]
                elif a.shape[2] != Tp:
                    raise ValueError(f"past_key_values[{i}] {name} has T_past={a.shape[2]}, layer 0 has {Tp}")
        return Tp

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                past_key_values=None, use_cache=False, output_hidden_states=False, output_attentions=False,
                **unused):
        if unused:
            raise ValueError(f"{type(self).__name__} takes no {sorted(unused)}")
        shape, ids, mask, tt, pos = self._check_inputs(input_ids, attention_mask, token_type_ids,
                                                       position_ids, past_key_values)
        tok, posemb = self._tables()
        # h0 = U We + Wp (+ token types looked up in We)
        h = tok(ids) + posemb(pos)  # (B, T, C)
        self._tt_cache = None
        if tt is not None:
            e, self._tt_cache = embedding_forward(tt, tok.params["weight"])
            h = h + e
        h = self.drop(h)
        hidden = [h]
        for i, block in enumerate(self.h):
            h = block(h, mask, None if past_key_values is None else past_key_values[i])
            hidden.append(h)
        ln_f = self._final_norm()
        if ln_f is not None:
            h = ln_f(h)
            hidden[-1] = h  # transformers' last hidden state is ln_f(output of the last block)
        out_shape = shape + (h.shape[-1],)
        out = ModelOutput(last_hidden_state=h.reshape(out_shape))
        if use_cache:
            out.past_key_values = tuple(block.attn.core.present for block in self.h)
        if output_hidden_states:
            out.hidden_states = tuple(x.reshape(out_shape) for x in hidden)
        if output_attentions:
            out.attentions = tuple(block.attn.core.probs for block in self.h)  # (B, H, T, T_past + T)
        self._last = out
        return out

    def backward(self, grad=None):
        """grad = d last_hidden_state, same shape; accumulates every parameter's gradient."""
        last = self._need_last()
        if grad is None:
            raise ValueError(f"{type(self).__name__} has no loss; pass d last_hidden_state to backward(grad)")
        self.backward_from(check_grad("last_hidden_state", grad, last.last_hidden_state))

    def backward_from(self, dh):
        C = dh.shape[-1]
        dh = dh.reshape(-1, dh.shape[-2], C)  # (B, T, C)
        ln_f = self._final_norm()
        if ln_f is not None:
            dh = ln_f.backward(dh)
        for block in reversed(self.h):
            dh = block.backward(dh)
        dh = self.drop.backward(dh)
        tok, posemb = self._tables()
        tok.backward(dh)
        posemb.backward(dh)
        if self._tt_cache is not None and tok.requires_grad("weight"):
            tok.grads["weight"] += embedding_backward(dh, self._tt_cache)


@register
class GPT2Model(_GPTBackbone):
    """GPT-2 decoder: wte, wpe, pre-LN blocks h.0..h.{L-1}, final ln_f.
    Returns last_hidden_state (B, T, C) [+ past_key_values, hidden_states, attentions]."""

    config_class = GPT2Config
    token_table = "wte"

    def __init__(self, config, seed=0, dtype="float32", init=True):
        super().__init__(config)
        cfg = self.config
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = Dropout(cfg.embd_pdrop)
        self.h = ModuleList(GPT2Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        if init:
            self.post_init(seed, dtype)

    def _tables(self):
        return self.wte, self.wpe

    def _final_norm(self):
        return self.ln_f


@register
class OpenAIGPTModel(_GPTBackbone):
    """GPT-1 decoder: tokens_embed, positions_embed, post-LN blocks h.0..h.{L-1}, no final LayerNorm."""

    config_class = OpenAIGPTConfig
    token_table = "tokens_embed"

    def __init__(self, config, seed=0, dtype="float32", init=True):
        super().__init__(config)
        cfg = self.config
        self.tokens_embed = Embedding(cfg.vocab_size, cfg.n_embd)
        self.positions_embed = Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = Dropout(cfg.embd_pdrop)
        self.h = ModuleList(OpenAIGPTBlock(cfg) for _ in range(cfg.n_layer))
        if init:
            self.post_init(seed, dtype)

    def _tables(self):
        return self.tokens_embed, self.positions_embed


def _gpt2_init(model, rng):
    """transformers' GPT-2 init: normal(0, 0.02) everywhere, then the residual projections
    (attn.c_proj, mlp.c_proj weights) normal(0, 0.02 / sqrt(2 n_layer)) (GPT-2 paper, section 2.3)."""
    PreTrainedModel.init_weights(model, rng)
    std = model.config.initializer_range / math.sqrt(2 * model.config.n_layer)
    for name, m in model.modules():
        if name.endswith("c_proj"):
            m.params["weight"][...] = rng.normal(0.0, std, m.params["weight"].shape)


GPT2Model.init_weights = _gpt2_init


# ---------------------------------------------------------------------------------------- heads

class _TiedLMHead:
    """logits = h We^T with the token table We (V, C) itself (transformers ties lm_head.weight to it)."""

    @staticmethod
    def forward(h, table):
        W = table.params["weight"]
        return (h.reshape(-1, W.shape[1]) @ W.T).reshape(h.shape[:-1] + (W.shape[0],))  # (..., V)

    @staticmethod
    def backward(dlogits, h, table):
        # logits = h We^T:  dh = dlogits We,  dWe += dlogits^T h
        W = table.params["weight"]
        V, C = W.shape
        d2 = dlogits.reshape(-1, V)
        if table.requires_grad("weight"):
            table.grads["weight"] += d2.T @ h.reshape(-1, C)  # (V, C)
        return (d2 @ W).reshape(h.shape)  # (..., C)


class _LMHeadMixin:
    """The LM head: tied to the token table (default), or an untied nn.Linear `lm_head` without bias."""

    def _build_lm_head(self):
        cfg = self.config
        tok_key = self._backbone_class.token_table
        if cfg.tie_word_embeddings:
            self.lm_head = None
            self.tied = {"lm_head.weight": f"transformer.{tok_key}.weight"}
        else:
            self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def _lm_forward(self, h):
        if self.lm_head is None:
            return _TiedLMHead.forward(h, self._token_table())
        return self.lm_head(h)

    def _lm_backward(self, dlogits, h):
        if self.lm_head is None:
            return _TiedLMHead.backward(dlogits, h, self._token_table())
        return self.lm_head.backward(dlogits)

    def _token_table(self):
        return getattr(self.transformer, self._backbone_class.token_table)


class SequenceSummary(Module):
    """transformers' SequenceSummary (multiple-choice head): pick one hidden state per sequence
    (cls_index: at mc_token_ids; last; first; or the mean), dropout, Linear `summary`, activation.
    h: (B, N, T, C), idx: (B, N) -> (B, N, K) with K = num_labels (1) or C."""

    def __init__(self, config):
        super().__init__()
        self.summary_type = config.summary_type
        C = config.n_embd
        self.summary = None
        if config.summary_use_proj:
            K = config.num_labels if config.summary_proj_to_labels and config.num_labels > 0 else C
            self.summary = Linear(C, K)
        self.activation = Activation(config.summary_activation) if config.summary_activation else None
        self.first_dropout = Dropout(config.summary_first_dropout)
        self.last_dropout = Dropout(config.extra.get("summary_last_dropout", 0.0) or 0.0)

    def forward(self, h, cls_index=None):
        T = h.shape[-2]
        if self.summary_type == "mean":
            s = h.mean(axis=-2)  # (B, N, C)
        else:
            if self.summary_type == "cls_index":
                idx = np.full(h.shape[:-2], T - 1) if cls_index is None else cls_index
            else:
                idx = np.full(h.shape[:-2], T - 1 if self.summary_type == "last" else 0)
            s = np.take_along_axis(h, idx[..., None, None], axis=-2)[..., 0, :]  # (B, N, C)
            self._idx = idx
        self._hshape = h.shape
        s = self.first_dropout(s)
        if self.summary is not None:
            s = self.summary(s)
        if self.activation is not None:
            s = self.activation(s)
        return self.last_dropout(s)

    def backward(self, ds):  # (B, N, K) -> dh (B, N, T, C)
        ds = self.last_dropout.backward(ds)
        if self.activation is not None:
            ds = self.activation.backward(ds)
        if self.summary is not None:
            ds = self.summary.backward(ds)
        ds = self.first_dropout.backward(ds)
        T = self._hshape[-2]
        if self.summary_type == "mean":
            return np.broadcast_to(ds[..., None, :] / T, self._hshape).copy()
        dh = np.zeros(self._hshape, dtype=ds.dtype)
        np.put_along_axis(dh, self._idx[..., None, None], ds[..., None, :], axis=-2)
        return dh


class _CausalLM(_LMHeadMixin, _GPTPreTrainedModel):
    """backbone + tied LM head;  out.loss = causal-LM cross-entropy of labels (unshifted)."""

    def __init__(self, config, seed=0, dtype="float32", init=True):
        super().__init__(config)
        self._make(seed, dtype, init)

    def _make(self, seed, dtype, init):
        self.transformer = self._backbone_class(self.config, init=False)
        self._build_lm_head()
        if init:
            self.post_init(seed, dtype)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                past_key_values=None, use_cache=False, output_hidden_states=False, output_attentions=False,
                logits_to_keep=0):
        """logits_to_keep (transformers' name): 0 computes logits at every position, k > 0 only at the
        last k (generation needs the last one; the LM head is the largest matmul of a decoding step)."""
        if not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep needs labels=None: the loss uses the logits of every position")
        t = self.transformer(input_ids, attention_mask, token_type_ids, position_ids, past_key_values,
                             use_cache, output_hidden_states, output_attentions)
        h = t.last_hidden_state
        if logits_to_keep:
            h = h[..., -logits_to_keep:, :]
        logits = self._lm_forward(h)  # (B, T or logits_to_keep, V)
        out = ModelOutput()
        ce = None
        if labels is not None:
            out.loss, ce = _causal_lm_loss(logits, labels, self.config.vocab_size)
        out.logits = logits
        for k in ("past_key_values", "hidden_states", "attentions"):
            if t.get(k) is not None:
                out[k] = t[k]
        self._last = (out, h, ce)
        return out

    def backward(self, grad=None):
        """grad None: d out.loss; else grad = d logits."""
        out, h, ce = self._need_last()
        if grad is None:
            if ce is None:
                raise ValueError("backward() without a gradient needs a forward with labels (out.loss)")
            dlogits = cross_entropy_backward(1.0, ce)
        else:
            dlogits = check_grad("logits", grad, out.logits)
        dh = self._lm_backward(dlogits, h)
        full = self.transformer._last.last_hidden_state
        if dh.shape != full.shape:  # logits_to_keep: earlier positions get no gradient from the head
            dfull = np.zeros_like(full)
            dfull[..., -dh.shape[-2]:, :] = dh
            dh = dfull
        self.transformer.backward_from(dh)


class _DoubleHeads(_LMHeadMixin, _GPTPreTrainedModel):
    """backbone + tied LM head + multiple-choice head on (B, N, T) inputs.
    out.loss = LM loss, out.mc_loss = CE(mc_logits (B, N), mc_labels (B,)); backward() takes the
    gradient of lm_coef * loss + mc_loss (GPT-1's L3 = L2 + lambda L1)."""

    def __init__(self, config, seed=0, dtype="float32", init=True):
        super().__init__(config)
        self._make(seed, dtype, init)

    def _make(self, seed, dtype, init):
        self.config.num_labels = 1  # as transformers: the summary projects to one score per choice
        self.transformer = self._backbone_class(self.config, init=False)
        self._build_lm_head()
        self.multiple_choice_head = SequenceSummary(self.config)
        if init:
            self.post_init(seed, dtype)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                mc_token_ids=None, mc_labels=None, past_key_values=None, use_cache=False,
                output_hidden_states=False, output_attentions=False, lm_coef=1.0):
        ids = as_ids("input_ids", input_ids)
        if ids.ndim != 3:
            raise ValueError(f"input_ids must have shape (B, num_choices, T), got {ids.shape}")
        B, N, T = ids.shape
        if mc_token_ids is not None:
            mc_token_ids = as_ids("mc_token_ids", mc_token_ids)
            if mc_token_ids.shape != (B, N):
                raise ValueError(f"mc_token_ids must have shape {(B, N)}, got {mc_token_ids.shape}")
            ids_in_range("mc_token_ids", mc_token_ids, T)
        t = self.transformer(ids, attention_mask, token_type_ids, position_ids, past_key_values,
                             use_cache, output_hidden_states, output_attentions)
        h = t.last_hidden_state  # (B, N, T, C)
        logits = self._lm_forward(h)  # (B, N, T, V)
        s = self.multiple_choice_head(h, mc_token_ids)  # (B, N, K)
        mc_logits = s[..., 0] if s.shape[-1] == 1 else s  # squeeze(-1)
        out = ModelOutput()
        ce = mc = None
        if labels is not None:
            out.loss, ce = _causal_lm_loss(logits, labels, self.config.vocab_size)
        if mc_labels is not None:
            mc_labels = as_ids("mc_labels", mc_labels)
            if mc_labels.shape != (B,):
                raise ValueError(f"mc_labels must have shape {(B,)}, got {mc_labels.shape}")
            if mc_logits.shape != (B, N):
                raise ValueError(f"mc_loss needs one score per choice; the summary head gives {s.shape}")
            ids_in_range("mc_labels", mc_labels, N, allow=IGNORE_INDEX)
            out.mc_loss, mc = cross_entropy_forward(mc_logits, mc_labels, IGNORE_INDEX)
        out.logits = logits
        out.mc_logits = mc_logits
        for k in ("past_key_values", "hidden_states", "attentions"):
            if t.get(k) is not None:
                out[k] = t[k]
        self._last = (out, h, s.shape, ce, mc, float(lm_coef))
        return out

    def objective(self, out):
        """lm_coef * loss + mc_loss (either part absent without its labels): what backward() differentiates."""
        lm_coef = self._need_last()[5]
        if out.loss is None and out.mc_loss is None:
            return None
        return (0.0 if out.loss is None else lm_coef * out.loss) + (0.0 if out.mc_loss is None else out.mc_loss)

    def backward(self, grad=None, mc_grad=None):
        """No arguments: d (lm_coef * loss + mc_loss). Else grad = d logits and/or mc_grad = d mc_logits."""
        out, h, sshape, ce, mc, lm_coef = self._need_last()
        if grad is None and mc_grad is None:
            if ce is None and mc is None:
                raise ValueError("backward() without a gradient needs labels and/or mc_labels in the forward")
            dlogits = cross_entropy_backward(lm_coef, ce) if ce is not None else None
            dmc = cross_entropy_backward(1.0, mc) if mc is not None else None
        else:
            dlogits = None if grad is None else check_grad("logits", grad, out.logits)
            dmc = None if mc_grad is None else check_grad("mc_logits", mc_grad, out.mc_logits)
        dh = np.zeros_like(h) if dlogits is None else self._lm_backward(dlogits, h)
        if dmc is not None:
            dh += self.multiple_choice_head.backward(dmc.reshape(sshape))
        self.transformer.backward_from(dh)


@register
class GPT2LMHeadModel(_CausalLM):
    config_class = GPT2Config
    _backbone_class = GPT2Model
    init_weights = _gpt2_init


@register
class OpenAIGPTLMHeadModel(_CausalLM):
    config_class = OpenAIGPTConfig
    _backbone_class = OpenAIGPTModel


@register
class GPT2DoubleHeadsModel(_DoubleHeads):
    config_class = GPT2Config
    _backbone_class = GPT2Model
    init_weights = _gpt2_init


@register
class OpenAIGPTDoubleHeadsModel(_DoubleHeads):
    config_class = OpenAIGPTConfig
    _backbone_class = OpenAIGPTModel


@register
class GPT2ForSequenceClassification(_GPTPreTrainedModel):
    """logits = score(h[b, i_b]),  i_b = the rightmost position whose input id is not pad_token_id
    (transformers 5; T-1 when the config has no pad token, which then allows batch 1 only).
    score is an nn.Linear (C -> num_labels) without bias; out.loss by config.problem_type."""

    config_class = GPT2Config
    init_weights = _gpt2_init

    def __init__(self, config, seed=0, dtype="float32", init=True):
        super().__init__(config)
        self.transformer = GPT2Model(self.config, init=False)
        self.score = Linear(self.config.n_embd, self.config.num_labels, bias=False)
        if init:
            self.post_init(seed, dtype)

    def _pool_index(self, ids):
        ids = ids.reshape(-1, ids.shape[-1])
        B, T = ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if B != 1:
                raise ValueError(f"Cannot handle batch sizes > 1 if no padding token is defined "
                                 f"(config pad_token_id is None, batch {B})")
            return np.full(B, T - 1)
        return np.argmax(np.arange(T) * (ids != pad), axis=-1)  # rightmost non-pad; 0 for an all-pad row

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                past_key_values=None, use_cache=False, output_hidden_states=False, output_attentions=False):
        ids = as_ids("input_ids", input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {ids.shape}")
        t = self.transformer(ids, attention_mask, token_type_ids, position_ids, past_key_values,
                             use_cache, output_hidden_states, output_attentions)
        h = t.last_hidden_state  # (B, T, C)
        B = h.shape[0]
        idx = self._pool_index(ids)
        logits = self.score(h[np.arange(B), idx])  # (B, num_labels); score of the pooled rows only
        out = ModelOutput()
        lc = None
        if labels is not None:
            out.loss, lc = self._loss(logits, labels)
        out.logits = logits
        for k in ("past_key_values", "hidden_states", "attentions"):
            if t.get(k) is not None:
                out[k] = t[k]
        self._last = (out, h.shape, idx, lc)
        return out

    def _loss(self, logits, labels):
        cfg = self.config
        labels = np.asarray(labels)
        B, K = logits.shape
        if cfg.problem_type is None:  # transformers sets it on the first forward with labels
            if K == 1:
                cfg.problem_type = "regression"
            elif labels.dtype.kind in "iu":
                cfg.problem_type = "single_label_classification"
            else:
                cfg.problem_type = "multi_label_classification"
        if cfg.problem_type == "single_label_classification":
            labels = as_ids("labels", labels)
            if labels.shape != (B,):
                raise ValueError(f"labels must have shape {(B,)} for single-label classification, got {labels.shape}")
            ids_in_range("labels", labels, K, allow=IGNORE_INDEX)
            loss, c = cross_entropy_forward(logits, labels, IGNORE_INDEX)
            return loss, ("ce", c)
        if cfg.problem_type == "regression":
            if labels.size != B * K or labels.dtype.kind not in "fiu":
                raise ValueError(f"labels must hold {B * K} numbers for regression, got shape {labels.shape}")
            # transformers: MSE(logits.squeeze(), labels.squeeze())
            loss, c = mse_forward(logits.reshape(-1), labels.reshape(-1).astype(logits.dtype))
            return loss, ("mse", c)
        raise ValueError("problem_type 'multi_label_classification' (BCE loss) is not supported")

    def backward(self, grad=None):
        """grad None: d out.loss; else grad = d logits (B, num_labels)."""
        out, hshape, idx, lc = self._need_last()
        if grad is None:
            if lc is None:
                raise ValueError("backward() without a gradient needs a forward with labels (out.loss)")
            kind, c = lc
            dlogits = (cross_entropy_backward(1.0, c) if kind == "ce"
                       else mse_backward(1.0, c).reshape(out.logits.shape))
        else:
            dlogits = check_grad("logits", grad, out.logits)
        dpooled = self.score.backward(dlogits)  # (B, C)
        dh = np.zeros(hshape, dtype=dpooled.dtype)
        dh[np.arange(hshape[0]), idx] = dpooled
        self.transformer.backward_from(dh)
