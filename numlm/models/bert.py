"""BERT as transformers defines it (modeling_bert.py, eager attention), forward and backward by hand.

Module attribute names are transformers' module names, so a parameter's dotted name is its
transformers state_dict key (`bert.encoder.layer.0.attention.self.query.weight`).

    h0 = Dropout(LN(word[ids] + position[pos] + token_type[tt]))               embeddings
    a  = LN(x + Dropout(Wo Attn(Wq x, Wk x, Wv x)))                            each of L post-LN layers
    x' = LN(a + Dropout(W2 act(W1 a)))
    pooled = tanh(Wp h_L[:, 0])                                                the pooler on [CLS]
    prediction_logits = LN(gelu(Wt h_L)) word^T + b                            MLM head (tied decoder)
"""
import dataclasses
from typing import Optional

import numpy as np

from ..nn import Module, ModuleList, Linear, Embedding, LayerNorm, Dropout, Activation, Attention
from ..ops import (ACTIVATIONS, cross_entropy_forward, cross_entropy_backward, mse_forward, mse_backward,
                   bce_with_logits_forward, bce_with_logits_backward)
from ..ops._check import ids_in_range
from .base import PreTrainedModel, ModelOutput, register, as_ids, check_grad
from .config import Config

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclasses.dataclass
class BertConfig(Config):
    """transformers' BertConfig fields and defaults (bert-base-uncased)."""

    model_type = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    position_embedding_type: str = "absolute"
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    classifier_dropout: Optional[float] = None
    num_labels: int = 2
    problem_type: Optional[str] = None
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.validate()  # direct construction is checked as from_dict is

    def validate(self):
        self._positive("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels")
        self._probability("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"config hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"config hidden_act {self.hidden_act!r} is not supported; numlm supports "
                             f"{sorted(ACTIVATIONS)}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"config position_embedding_type {self.position_embedding_type!r} is not "
                             "supported; numlm implements only 'absolute'")
        if self.is_decoder or self.add_cross_attention:
            raise ValueError("config is_decoder / add_cross_attention: BERT as a decoder or with "
                             "cross-attention is not supported")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"config pad_token_id {self.pad_token_id} must lie in [0, {self.vocab_size})")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"config problem_type {self.problem_type!r} must be one of {PROBLEM_TYPES} or None")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"config layer_norm_eps must be positive, got {self.layer_norm_eps!r}")


# ---------------------------------------------------------------------------------------- backbone

class BertEmbeddings(Module):
    """h0 = Dropout(LN(word[ids] + position[pos] + token_type[tt]))"""

    def __init__(self, config):
        super().__init__()
        C = config.hidden_size
        self.word_embeddings = Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.position_embeddings = Embedding(config.max_position_embeddings, C)
        self.token_type_embeddings = Embedding(config.type_vocab_size, C)
        self.LayerNorm = LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids):  # (B, T) ints each -> (B, T, C)
        e = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))  # position_ids may be (1, T): broadcasts over B
        self.cache = position_ids.shape[0]
        return self.dropout(self.LayerNorm(e))

    def backward(self, dout):  # (B, T, C)
        de = self.LayerNorm.backward(self.dropout.backward(dout))
        self.word_embeddings.backward(de)
        self.token_type_embeddings.backward(de)
        self.position_embeddings.backward(de if self.cache == de.shape[0] else de.sum(axis=0, keepdims=True))


class BertSelfAttention(Module):
    """ctx = softmax(q k^T / sqrt(D) + mask) v per head,  q, k, v = x Wq, x Wk, x Wv"""

    def __init__(self, config):
        super().__init__()
        C = config.hidden_size
        self.query = Linear(C, C)
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        # transformers' self.dropout on the probabilities lives inside the attention core
        self.core = Attention(config.num_attention_heads, dropout_p=config.attention_probs_dropout_prob)

    def forward(self, x, attention_mask):  # (B, T, C) -> (B, T, C)
        return self.core(self.query(x), self.key(x), self.value(x), attention_mask)

    def backward(self, dctx):
        dq, dk, dv = self.core.backward(dctx)
        return self.query.backward(dq) + self.key.backward(dk) + self.value.backward(dv)


class BertResidualOutput(Module):
    """y = LN(x + Dropout(h W + b)): transformers' BertSelfOutput and BertOutput (same structure)."""

    def __init__(self, c_in, config):
        super().__init__()
        self.dense = Linear(c_in, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, h, x):  # h: (B, T, c_in), x: (B, T, C) -> (B, T, C)
        return self.LayerNorm(self.dropout(self.dense(h)) + x)

    def backward(self, dy):  # -> dh, dx
        ds = self.LayerNorm.backward(dy)
        return self.dense.backward(self.dropout.backward(ds)), ds


class BertAttention(Module):
    """a = LN(x + Dropout(SelfAttention(x) Wo + bo))"""

    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualOutput(config.hidden_size, config)

    def forward(self, x, attention_mask):
        return self.output(self.self(x, attention_mask), x)

    def backward(self, da):
        dctx, dx = self.output.backward(da)
        return self.self.backward(dctx) + dx


class BertIntermediate(Module):
    """i = act(a W1 + b1)"""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = Activation(config.hidden_act)

    def forward(self, a):  # (B, T, C) -> (B, T, I)
        return self.intermediate_act_fn(self.dense(a))

    def backward(self, di):
        return self.dense.backward(self.intermediate_act_fn.backward(di))


class BertLayer(Module):
    """post-LN: a = LN(x + attn(x));  x' = LN(a + W2 act(W1 a))"""

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config.intermediate_size, config)

    def forward(self, x, attention_mask):  # (B, T, C) -> (B, T, C)
        a = self.attention(x, attention_mask)
        return self.output(self.intermediate(a), a)

    def backward(self, dout):
        di, da = self.output.backward(dout)
        return self.attention.backward(self.intermediate.backward(di) + da)


class BertEncoder(Module):
    def __init__(self, config):
        super().__init__()
        self.layer = ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, attention_mask):  # -> [h_1, ..., h_L] each (B, T, C)
        hs = []
        for layer in self.layer:
            x = layer(x, attention_mask)
            hs.append(x)
        return hs

    def backward(self, dout):
        for layer in reversed(self.layer.items):
            dout = layer.backward(dout)
        return dout


class BertPooler(Module):
    """pooled = tanh(h[:, 0] Wp + bp)"""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.activation = Activation("tanh")

    def forward(self, h):  # (B, T, C) -> (B, C)
        self.cache = h.shape
        return self.activation(self.dense(h[:, 0]))

    def backward(self, dpooled):  # (B, C) -> dh (B, T, C), non-zero only at position 0
        dh = np.zeros(self.cache, dtype=dpooled.dtype)
        dh[:, 0] = self.dense.backward(self.activation.backward(dpooled))
        return dh


# ---------------------------------------------------------------------------------------- checks

class BertPreTrainedModel(PreTrainedModel):
    config_class = BertConfig
    base_model_prefix = "bert"
    # non-persistent buffers that old checkpoints (sentence-transformers, transformers 4.x) still hold
    ignore_on_load = (r"(^|\.)embeddings\.position_ids$", r"(^|\.)embeddings\.token_type_ids$")

    def __init__(self, config):
        if isinstance(config, dict):
            config = BertConfig.from_dict(config)
        if not isinstance(config, BertConfig):
            raise ValueError(f"config must be a BertConfig or a dict, got {type(config).__name__}")
        super().__init__(config)

    def _need_last(self):
        if self._last is None:
            raise ValueError("backward() needs a forward pass first")
        return self._last

    def _classifier_dropout(self):
        p = self.config.classifier_dropout
        return self.config.hidden_dropout_prob if p is None else p


@register
class BertModel(BertPreTrainedModel):
    """The backbone: embeddings, L post-LN encoder layers, optional tanh pooler on [CLS].
    backward(grad): grad = d last_hidden_state, or a tuple (d last_hidden_state, d pooler_output)."""

    base_model_prefix = "bert"

    def __init__(self, config, add_pooling_layer=True, seed=0, dtype="float32", init=True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)
        self.pooler = BertPooler(self.config) if add_pooling_layer else None
        if init:
            self.post_init(seed, dtype)

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, position_ids):
        cfg = self.config
        input_ids = as_ids("input_ids", input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {input_ids.shape}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids must hold at least one token per row, got shape (B, 0)")
        if T > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has sequence length {T} > max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        ids_in_range("input_ids", input_ids, cfg.vocab_size)
        if token_type_ids is None:
            token_type_ids = np.zeros((B, T), dtype=np.int64)
        token_type_ids = as_ids("token_type_ids", token_type_ids)
        if token_type_ids.shape != (B, T):
            raise ValueError(f"token_type_ids must have shape {(B, T)} like input_ids, got {token_type_ids.shape}")
        ids_in_range("token_type_ids", token_type_ids, cfg.type_vocab_size)
        if position_ids is None:
            position_ids = np.arange(T, dtype=np.int64)[None]  # (1, T): padding does not shift positions
        position_ids = as_ids("position_ids", position_ids)
        if position_ids.ndim == 1:
            position_ids = position_ids[None]
        if position_ids.shape not in ((B, T), (1, T)):
            raise ValueError(f"position_ids must have shape {(B, T)}, {(1, T)} or {(T,)}, got {position_ids.shape}")
        ids_in_range("position_ids", position_ids, cfg.max_position_embeddings)
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask must have shape {(B, T)} like input_ids, got {attention_mask.shape}")
            if attention_mask.dtype != np.bool_ and not np.isin(attention_mask, (0, 1)).all():
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
            attention_mask = attention_mask.astype(bool)
            if attention_mask.all():
                attention_mask = None  # nothing masked: skip the mask entirely
        return input_ids, attention_mask, token_type_ids, position_ids

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False, output_attentions=False, **unused):
        if unused:
            raise ValueError(f"BertModel takes no labels; got {sorted(unused)}")
        input_ids, attention_mask, token_type_ids, position_ids = self._check_inputs(
            input_ids, attention_mask, token_type_ids, position_ids)
        h0 = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, C)
        hs = self.encoder(h0, attention_mask)  # L x (B, T, C)
        out = ModelOutput(last_hidden_state=hs[-1])
        if self.pooler is not None:
            out.pooler_output = self.pooler(hs[-1])  # (B, C)
        if output_hidden_states:
            out.hidden_states = tuple([h0] + hs)
        if output_attentions:
            out.attentions = tuple(layer.attention.self.core.probs for layer in self.encoder.layer)
        self._last = out
        return out

    def backward(self, grad=None):
        last = self._need_last()
        if grad is None:
            raise ValueError("BertModel has no loss; pass the gradient of last_hidden_state to backward(grad)")
        dpooled = None
        if isinstance(grad, tuple):
            grad, dpooled = grad
        self.backward_from(None if grad is None else check_grad("last_hidden_state", grad, last.last_hidden_state),
                           None if dpooled is None else check_grad("pooler_output", dpooled, last.pooler_output))

    def backward_from(self, dh=None, dpooled=None):
        """Backpropagate d last_hidden_state (B, T, C) and/or d pooler_output (B, C) to every parameter."""
        last = self._need_last()
        h = last.last_hidden_state
        d = np.zeros_like(h) if dh is None else dh
        if dpooled is not None:
            if self.pooler is None:
                raise ValueError("this BertModel has no pooler")
            d = d + self.pooler.backward(dpooled)
        self.embeddings.backward(self.encoder.backward(d))


def _backbone(config, add_pooling_layer):
    return BertModel(config, add_pooling_layer=add_pooling_layer, init=False)


# ---------------------------------------------------------------------------------------- heads

class BertPredictionHeadTransform(Module):
    """t = LN(act(h Wt + bt))"""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = Activation(config.hidden_act)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h):
        return self.LayerNorm(self.transform_act_fn(self.dense(h)))

    def backward(self, dt):
        return self.dense.backward(self.transform_act_fn.backward(self.LayerNorm.backward(dt)))


class BertLMPredictionHead(Module):
    """prediction_logits = t word^T + bias, t = transform(h); the decoder IS the word-embedding table."""

    def __init__(self, config, word_embeddings):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.add_param("bias", np.zeros(config.vocab_size))
        self._word = (word_embeddings,)  # a tuple, so the table is not discovered as a child a second time

    def forward(self, h):  # (B, T, C) -> (B, T, V)
        t = self.transform(h)
        W = self._word[0].params["weight"]  # (V, C)
        self.cache = t
        logits = t.reshape(-1, W.shape[1]) @ W.T  # one (B*T, C) @ (C, V) product
        logits += self.params["bias"]
        return logits.reshape(t.shape[:-1] + (W.shape[0],))  # (B, T, V)

    def backward(self, dlogits):  # (B, T, V) -> (B, T, C)
        t = self.cache
        emb = self._word[0]
        # forward: logits = t W^T + b;  so  dt = dlogits W,  dW = dlogits^T t,  db = sum dlogits
        V, C = emb.params["weight"].shape
        d2, t2 = dlogits.reshape(-1, V), t.reshape(-1, C)
        if emb.requires_grad("weight"):
            emb.grads["weight"] += d2.T @ t2  # (V, C), added to the lookup's gradient: the total
        if self.requires_grad("bias"):
            self.grads["bias"] += d2.sum(axis=0)
        return self.transform.backward((d2 @ emb.params["weight"]).reshape(t.shape))  # (B, T, C)


class BertOnlyMLMHead(Module):
    def __init__(self, config, word_embeddings):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)


class BertOnlyNSPHead(Module):
    def __init__(self, config):
        super().__init__()
        self.seq_relationship = Linear(config.hidden_size, 2)


class BertPreTrainingHeads(Module):
    def __init__(self, config, word_embeddings):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)
        self.seq_relationship = Linear(config.hidden_size, 2)


TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias"}


def _check_labels(name, labels, shape, n, allow=-100):
    labels = as_ids(name, labels)
    if labels.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {labels.shape}")
    return ids_in_range(name, labels, n, allow=allow)


def _ce(logits, labels, ignore_index=-100):
    """Cross-entropy over the flattened leading axes, one mean over non-ignored targets."""
    V = logits.shape[-1]
    loss, cache = cross_entropy_forward(logits.reshape(-1, V), labels.reshape(-1), ignore_index)
    return loss, cache


def _ce_grad(cache, shape):
    return cross_entropy_backward(1.0, cache).reshape(shape)


def _no_loss(name):
    raise ValueError(f"backward() without a gradient needs a loss: call the model with {name}")


def _forward_backbone(self, input_ids, attention_mask, token_type_ids, position_ids,
                      output_hidden_states, output_attentions):
    return self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     position_ids=position_ids, output_hidden_states=output_hidden_states,
                     output_attentions=output_attentions)


def _finish(out, base):
    """Append the backbone's outputs after the head's (transformers' order: loss, logits, hidden_states, attentions)."""
    for k in ("hidden_states", "attentions", "last_hidden_state", "pooler_output"):
        if base.get(k) is not None:
            out[k] = base[k]
    return out


@register
class BertForPreTraining(BertPreTrainedModel):
    """loss = CE(prediction_logits, labels) + CE(seq_relationship_logits, next_sentence_label).
    backward(grad): d prediction_logits, or a tuple (d prediction_logits, d seq_relationship_logits)."""

    def __init__(self, config, seed=0, dtype="float32"):
        super().__init__(config)
        if not self.config.tie_word_embeddings:
            raise ValueError("config tie_word_embeddings=False (an untied MLM decoder) is not supported")
        self.bert = _backbone(self.config, True)
        self.cls = BertPreTrainingHeads(self.config, self.bert.embeddings.word_embeddings)
        self.tied = dict(TIED)
        self.post_init(seed, dtype)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, output_hidden_states=False, output_attentions=False):
        base = _forward_backbone(self, input_ids, attention_mask, token_type_ids, position_ids,
                                 output_hidden_states, output_attentions)
        h, pooled = base.last_hidden_state, base.pooler_output
        B, T, _ = h.shape
        if labels is not None:
            labels = _check_labels("labels", labels, (B, T), self.config.vocab_size)
        if next_sentence_label is not None:
            next_sentence_label = _check_labels("next_sentence_label", next_sentence_label, (B,), 2)
        logits = self.cls.predictions(h)  # (B, T, V)
        seq = self.cls.seq_relationship(pooled)  # (B, 2)
        out = ModelOutput()
        caches = None
        if labels is not None and next_sentence_label is not None:
            mlm, c1 = _ce(logits, labels)
            nsp, c2 = _ce(seq, next_sentence_label)
            out.loss = mlm + nsp
            out.mlm_loss, out.nsp_loss = mlm, nsp
            caches = (c1, c2)
        out.prediction_logits, out.seq_relationship_logits = logits, seq
        self._last = (out, caches)
        return _finish(out, base)

    def backward(self, grad=None):
        out, caches = self._need_last()
        if grad is None:
            if caches is None:
                _no_loss("labels and next_sentence_label")
            dlogits = _ce_grad(caches[0], out.prediction_logits.shape)
            dseq = _ce_grad(caches[1], out.seq_relationship_logits.shape)
        else:
            dlogits, dseq = grad if isinstance(grad, tuple) else (grad, None)
            if dlogits is not None:
                dlogits = check_grad("prediction_logits", dlogits, out.prediction_logits)
            if dseq is not None:
                dseq = check_grad("seq_relationship_logits", dseq, out.seq_relationship_logits)
        dh = None if dlogits is None else self.cls.predictions.backward(dlogits)
        dpooled = None if dseq is None else self.cls.seq_relationship.backward(dseq)
        self.bert.backward_from(dh, dpooled)


@register
class BertForMaskedLM(BertPreTrainedModel):
    """loss = CE(logits, labels), ignore_index -100, one mean over the labelled tokens. No pooler."""

    def __init__(self, config, seed=0, dtype="float32"):
        super().__init__(config)
        if not self.config.tie_word_embeddings:
            raise ValueError("config tie_word_embeddings=False (an untied MLM decoder) is not supported")
        self.bert = _backbone(self.config, False)
        self.cls = BertOnlyMLMHead(self.config, self.bert.embeddings.word_embeddings)
        self.tied = dict(TIED)
        self.post_init(seed, dtype)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        base = _forward_backbone(self, input_ids, attention_mask, token_type_ids, position_ids,
                                 output_hidden_states, output_attentions)
        h = base.last_hidden_state
        if labels is not None:
            labels = _check_labels("labels", labels, h.shape[:2], self.config.vocab_size)
        logits = self.cls.predictions(h)  # (B, T, V)
        out = ModelOutput()
        cache = None
        if labels is not None:
            out.loss, cache = _ce(logits, labels)
        out.logits = logits
        self._last = (out, cache)
        return _finish(out, base)

    def backward(self, grad=None):
        out, cache = self._need_last()
        if grad is None:
            if cache is None:
                _no_loss("labels")
            dlogits = _ce_grad(cache, out.logits.shape)
        else:
            dlogits = check_grad("logits", grad, out.logits)
        self.bert.backward_from(self.cls.predictions.backward(dlogits))


@register
class BertForNextSentencePrediction(BertPreTrainedModel):
    """loss = CE(seq_relationship(pooled), labels); labels (B,) with 0 = B continues A, 1 = random B."""

    def __init__(self, config, seed=0, dtype="float32"):
        super().__init__(config)
        self.bert = _backbone(self.config, True)
        self.cls = BertOnlyNSPHead(self.config)
        self.post_init(seed, dtype)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, output_hidden_states=False, output_attentions=False):
        base = _forward_backbone(self, input_ids, attention_mask, token_type_ids, position_ids,
                                 output_hidden_states, output_attentions)
        labels = next_sentence_label if labels is None else labels  # transformers' old keyword
        B = base.last_hidden_state.shape[0]
        if labels is not None:
            labels = _check_labels("labels", labels, (B,), 2)
        logits = self.cls.seq_relationship(base.pooler_output)  # (B, 2)
        out = ModelOutput()
        cache = None
        if labels is not None:
            out.loss, cache = _ce(logits, labels)
        out.logits = logits
        self._last = (out, cache)
        return _finish(out, base)

    def backward(self, grad=None):
        out, cache = self._need_last()
        dlogits = _ce_grad(cache, out.logits.shape) if grad is None and cache is not None else None
        if grad is None and cache is None:
            _no_loss("labels")
        if grad is not None:
            dlogits = check_grad("logits", grad, out.logits)
        self.bert.backward_from(None, self.cls.seq_relationship.backward(dlogits))


@register
class BertForSequenceClassification(BertPreTrainedModel):
    """logits = Dropout(pooled) Wc + bc.  Loss by problem_type as transformers: regression -> MSE
    (num_labels == 1), single_label_classification -> CE, multi_label_classification -> BCE with logits."""

    def __init__(self, config, seed=0, dtype="float32"):
        super().__init__(config)
        self.num_labels = self.config.num_labels
        self.bert = _backbone(self.config, True)
        self.dropout = Dropout(self._classifier_dropout())
        self.classifier = Linear(self.config.hidden_size, self.num_labels)
        self.post_init(seed, dtype)

    def _problem_type(self, labels):
        if self.config.problem_type is None:  # transformers decides on the first labelled forward
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype.kind in "iu":
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        return self.config.problem_type

    def _loss(self, logits, labels):
        B, K = logits.shape
        labels = np.asarray(labels)
        kind = self._problem_type(labels)
        if kind == "single_label_classification":
            labels = _check_labels("labels", labels, (B,), K)
            loss, cache = _ce(logits, labels)
            return loss, ("ce", cache)
        if labels.dtype.kind not in "iuf":
            raise ValueError(f"labels must be numeric for {kind}, got dtype {labels.dtype}")
        y = labels.astype(logits.dtype)
        if kind == "regression":
            if K == 1:  # transformers squeezes both: (B, 1) or (B,) labels
                if y.shape not in ((B,), (B, 1)):
                    raise ValueError(f"labels must have shape {(B,)} or {(B, 1)} for regression, got {y.shape}")
                loss, cache = mse_forward(logits.reshape(B), y.reshape(B))
            else:
                if y.shape != (B, K):
                    raise ValueError(f"labels must have shape {(B, K)} for regression, got {y.shape}")
                loss, cache = mse_forward(logits, y)
            return loss, ("mse", cache)
        if y.shape != (B, K):
            raise ValueError(f"labels must have shape {(B, K)} for multi_label_classification, got {y.shape}")
        if ((y < 0) | (y > 1)).any():
            raise ValueError("labels for multi_label_classification must lie in [0, 1]")
        loss, cache = bce_with_logits_forward(logits, y)
        return loss, ("bce", cache)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        base = _forward_backbone(self, input_ids, attention_mask, token_type_ids, position_ids,
                                 output_hidden_states, output_attentions)
        logits = self.classifier(self.dropout(base.pooler_output))  # (B, K)
        out = ModelOutput()
        cache = None
        if labels is not None:
            out.loss, cache = self._loss(logits, labels)
        out.logits = logits
        self._last = (out, cache)
        return _finish(out, base)

    def backward(self, grad=None):
        out, cache = self._need_last()
        if grad is not None:
            dlogits = check_grad("logits", grad, out.logits)
        elif cache is None:
            _no_loss("labels")
        elif cache[0] == "ce":
            dlogits = _ce_grad(cache[1], out.logits.shape)
        elif cache[0] == "mse":
            dlogits = mse_backward(1.0, cache[1]).reshape(out.logits.shape)
        else:
            dlogits = bce_with_logits_backward(1.0, cache[1])
        dpooled = self.dropout.backward(self.classifier.backward(dlogits))
        self.bert.backward_from(None, dpooled)


@register
class BertForTokenClassification(BertPreTrainedModel):
    """logits = Dropout(h) Wc + bc per token; loss = CE(logits, labels), ignore_index -100. No pooler."""

    def __init__(self, config, seed=0, dtype="float32"):
        super().__init__(config)
        self.num_labels = self.config.num_labels
        self.bert = _backbone(self.config, False)
        self.dropout = Dropout(self._classifier_dropout())
        self.classifier = Linear(self.config.hidden_size, self.num_labels)
        self.post_init(seed, dtype)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        base = _forward_backbone(self, input_ids, attention_mask, token_type_ids, position_ids,
                                 output_hidden_states, output_attentions)
        h = base.last_hidden_state
        if labels is not None:
            labels = _check_labels("labels", labels, h.shape[:2], self.num_labels)
        logits = self.classifier(self.dropout(h))  # (B, T, K)
        out = ModelOutput()
        cache = None
        if labels is not None:
            out.loss, cache = _ce(logits, labels)
        out.logits = logits
        self._last = (out, cache)
        return _finish(out, base)

    def backward(self, grad=None):
        out, cache = self._need_last()
        if grad is not None:
            dlogits = check_grad("logits", grad, out.logits)
        elif cache is None:
            _no_loss("labels")
        else:
            dlogits = _ce_grad(cache, out.logits.shape)
        self.bert.backward_from(self.dropout.backward(self.classifier.backward(dlogits)))


@register
class BertForQuestionAnswering(BertPreTrainedModel):
    """start_logits, end_logits = split(h Wqa + bqa); loss = (CE(start) + CE(end)) / 2 with positions
    clamped to [0, T] and T ignored, as transformers. No pooler.
    backward(grad): grad = (d start_logits, d end_logits)."""

    def __init__(self, config, seed=0, dtype="float32"):
        super().__init__(config)
        self.num_labels = self.config.num_labels
        if self.num_labels != 2:
            raise ValueError(f"BertForQuestionAnswering needs config num_labels == 2, got {self.num_labels}")
        self.bert = _backbone(self.config, False)
        self.qa_outputs = Linear(self.config.hidden_size, 2)
        self.post_init(seed, dtype)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None, output_hidden_states=False, output_attentions=False):
        base = _forward_backbone(self, input_ids, attention_mask, token_type_ids, position_ids,
                                 output_hidden_states, output_attentions)
        h = base.last_hidden_state
        B, T, _ = h.shape
        logits = self.qa_outputs(h)  # (B, T, 2)
        start, end = logits[..., 0].copy(), logits[..., 1].copy()  # (B, T) each
        out = ModelOutput()
        caches = None
        if (start_positions is None) != (end_positions is None):
            raise ValueError("pass both start_positions and end_positions, or neither")
        if start_positions is not None:
            pos = []
            for name, p in (("start_positions", start_positions), ("end_positions", end_positions)):
                p = as_ids(name, p)
                if p.shape not in ((B,), (B, 1)):
                    raise ValueError(f"{name} must have shape {(B,)}, got {p.shape}")
                pos.append(np.clip(p.reshape(B), 0, T))  # out-of-range spans -> T, then ignored
            ls, c1 = _ce(start, pos[0], ignore_index=T)
            le, c2 = _ce(end, pos[1], ignore_index=T)
            out.loss = (ls + le) / 2
            caches = (c1, c2)
        out.start_logits, out.end_logits = start, end
        self._last = (out, caches)
        return _finish(out, base)

    def backward(self, grad=None):
        out, caches = self._need_last()
        if grad is None:
            if caches is None:
                _no_loss("start_positions and end_positions")
            ds = cross_entropy_backward(0.5, caches[0]).reshape(out.start_logits.shape)
            de = cross_entropy_backward(0.5, caches[1]).reshape(out.end_logits.shape)
        else:
            if not isinstance(grad, tuple) or len(grad) != 2:
                raise ValueError("BertForQuestionAnswering.backward(grad) takes (d start_logits, d end_logits)")
            ds = check_grad("start_logits", grad[0], out.start_logits)
            de = check_grad("end_logits", grad[1], out.end_logits)
        dlogits = np.stack([ds, de], axis=-1)  # (B, T, 2)
        self.bert.backward_from(self.qa_outputs.backward(dlogits))


__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering"]
