"""BERT, one file top to bottom (modeling_bert.py, eager attention): the encoder, the heads, the losses,
and the backward of each in reverse, every step quoting the forward line it differentiates. Inputs are
checked once, at each class's forward; below it everything trusts them.

    h0 = Dropout(LN(word[ids] + token_type[tt] + position[pos]))       embeddings
    a  = LN(x + Dropout(ctx Wo + bo)),  ctx = Attn(x Wq, x Wk, x Wv)    each of L layers (post-LN)
    y  = LN(a + Dropout(act(a W1 + b1) W2 + b2))
    pooled = tanh(h_L[:, 0] Wp + bp)                                    the pooler on [CLS]
    Attn(q, k, v) = Dropout(softmax(q k^T / sqrt(D) + M)) v  per head, M = finfo.min at padding keys

    BertModel                          last_hidden_state, pooler_output
    BertForPreTraining                 loss = CE(MLM logits, labels) + CE(NSP logits, next_sentence_label)
    BertForMaskedLM                    loss = CE(LN(gelu(h Wt)) We^T + b, labels), -100 ignored
    BertForNextSentencePrediction      loss = CE(pooled Wn, labels): 0 = B continues A, 1 = random B
    BertForSequenceClassification      logits = Dropout(pooled) Wc; loss by problem_type
    BertForTokenClassification         logits = Dropout(h) Wc per token; loss = CE, -100 ignored
    BertForQuestionAnswering           start, end = h Wqa; loss = (CE(start) + CE(end)) / 2

Attribute names are transformers', so a parameter's dotted name is its state_dict key
(`encoder.layer.0.attention.self.query.weight`). Linears are nn.Linear (stored transposed inside numlm).

Hooks for parameter-efficient fine-tuning (numlm.peft), each None unless set:
  - inputs_embeds replaces word[ids] (prompt tuning); its gradient is left in embeddings.inputs_embeds_grad.
  - past_key_values: per layer (k, v) (B, H, T_past, D) before the layer's own keys (prefix tuning),
    the mask covering T_past + T keys, positions from T_past; their gradients are left in `past_grads`.
  - attention.output.adapters / output.adapters: a module with forward(h, x, ln) -> y and
    backward(dy) -> (dh, dx) that replaces y = LN(x + h) (h: after the projection and dropout).
  - any Linear (query, key, value, dense) may be replaced by a module with the same forward/backward.
"""
from typing import NamedTuple

import numpy as np

from ..nn import Module, ModuleList, Linear, Embedding, LayerNorm, Dropout, Activation, Attention
from ..nn import lowest_needing_backward, OPS
from ..ops import (cross_entropy_forward, cross_entropy_backward,
                   attention_allowed, IGNORE_INDEX)
from ..ops.attention import MASKED  # a mask code: the key is hidden from the query
from ..kernels.matmul import mm_pair  # (a @ b, c @ d), one core each unless NUMLM_NUMBA=0
from .config import BertConfig
from .pretrained import (ModelOutput, PreTrainedModel, register, bert_inputs, labels_like, as_ids, no_loss,
                         output_grads, logits_grad, classification_labels)

TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias"}


# ---------------------------------------------------------------------------------------- the encoder
# The modules below hold parameters under transformers' names; BertLayer and BertModel run them.

class BertEmbeddings(Module):
    """h0 = Dropout(LN(word[ids] + token_type[tt] + position[pos])); DistilBERT's: no token_type, dropout p"""

    inputs_embeds_grad = None

    def __init__(self, config, token_types=True, p=None):
        super().__init__()
        C = config.hidden_size
        self.word_embeddings = Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.position_embeddings = Embedding(config.max_position_embeddings, C)
        if token_types:
            self.token_type_embeddings = Embedding(config.type_vocab_size, C)
        self.LayerNorm = LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob if p is None else p)


class BertSelfAttention(Module):
    """ctx = Attn(x Wq + bq, x Wk + bk, x Wv + bv), heads split and merged inside Attention"""

    def __init__(self, config):
        super().__init__()
        C = config.hidden_size
        self.query = Linear(C, C)
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        # transformers' self.dropout on the probabilities lives inside the attention core
        self.core = Attention(config.num_attention_heads, dropout_p=config.attention_probs_dropout_prob)


class BertResidualOutput(Module):
    """y = LN(x + Dropout(h W + b)): transformers' BertSelfOutput and BertOutput (same structure)."""

    def __init__(self, c_in, config):
        super().__init__()
        self.dense = Linear(c_in, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.adapters = None


class BertAttention(Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualOutput(config.hidden_size, config)


class BertIntermediate(Module):
    """i = act(a W1 + b1)"""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = Activation(config.hidden_act)


class BertLayer(Module):
    """post-LN:  a = LN(x + Dropout(Attn(x) Wo));  y = LN(a + Dropout(act(a W1) W2))"""

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config.intermediate_size, config)

    def forward(self, x, mask=None, past=None, packed=None):  # (B, T, C) -> (B, T, C)
        """packed = (rows, B, T): x (N, C) holds only these rows of the (B * T, C) tokens
        (BertModel.skip_padding); attention puts them back in place, the others zeros (padding: masked
        keys, outputs dropped)"""
        sa, ao, it, out = self.attention.self, self.attention.output, self.intermediate, self.output
        # ctx = Attn(x Wq + bq, x Wk + bk, x Wv + bv): one product [q | k | v] = x [Wq | Wk | Wv] + [bq | bk | bv]
        # unless peft replaced one of the three with a module of its own (kept: the backward follows it)
        joined = all(type(m) is Linear for m in (sa.query, sa.key, sa.value))
        self.cache = (joined, packed)
        if packed is not None:
            qkv = (sa.query(x, sa.key, sa.value) if joined
                   else np.concatenate([sa.query(x), sa.key(x), sa.value(x)], -1))
            qkv = np.split(unpack_rows(qkv, *packed), 3, axis=-1)
            ctx = sa.core(*qkv, mask, past).reshape(-1, x.shape[-1])[packed[0]]
        elif joined:
            ctx = sa.core(*np.split(sa.query(x, sa.key, sa.value), 3, axis=-1), mask, past)
        else:
            ctx = sa.core(sa.query(x), sa.key(x), sa.value(x), mask, past)
        # a = LN(x + h),  h = Dropout(ctx Wo + bo)   (an adapter slot replaces the step)
        h = ao.dropout(ao.dense(ctx))
        a = ao.LayerNorm(x + h) if ao.adapters is None else ao.adapters(h, x, ao.LayerNorm)
        # y = LN(a + m),  m = Dropout(act(a W1 + b1) W2 + b2)
        m = out.dropout(out.dense(it.intermediate_act_fn(it.dense(a))))  # (B, T, I) inside
        return out.LayerNorm(a + m) if out.adapters is None else out.adapters(m, a, out.LayerNorm)

    def backward(self, dy):
        sa, ao, it, out = self.attention.self, self.attention.output, self.intermediate, self.output
        # y = LN(a + m):  dm = da = LN'(dy)
        dm, da = (out.LayerNorm.backward(dy),) * 2 if out.adapters is None else out.adapters.backward(dy)
        # m = Dropout(act(a W1 + b1) W2 + b2)
        da = da + it.dense.backward(it.intermediate_act_fn.backward(out.dense.backward(out.dropout.backward(dm))))
        # a = LN(x + h):  dh = dx = LN'(da)
        dh, dx = (ao.LayerNorm.backward(da),) * 2 if ao.adapters is None else ao.adapters.backward(da)
        # h = Dropout(ctx Wo + bo),  ctx = Attn(x Wq + bq, x Wk + bk, x Wv + bv)
        dctx = ao.dense.backward(ao.dropout.backward(dh))
        joined, packed = self.cache
        if packed is not None:  # the padding rows' outputs were dropped: zero gradient
            C = dctx.shape[-1]
            dqkv = sa.core.backward(unpack_rows(dctx, *packed), joined=True).reshape(-1, 3 * C)[packed[0]]
            if joined:
                return dx + sa.query.backward(dqkv)
            dq, dk, dv = dqkv[:, :C], dqkv[:, C:2 * C], dqkv[:, 2 * C:]
        elif joined:  # the forward's one product [q | k | v] = x [Wq | Wk | Wv] + ...
            return dx + sa.query.backward(sa.core.backward(dctx, joined=True))
        else:
            dq, dk, dv = sa.core.backward(dctx)
        return dx + sa.query.backward(dq) + sa.key.backward(dk) + sa.value.backward(dv)

    def backward_on_rows(self, dy, rows, B, T):
        """backward of a forward on all B * T tokens for dy (N, C) of `rows` of them alone: the modules'
        caches cut to those rows (the attention's kept whole) for the packed path, put back after"""
        sa, ao, it, out = self.attention.self, self.attention.output, self.intermediate, self.output
        act, norms = it.intermediate_act_fn, (ao.LayerNorm, out.LayerNorm)
        linears = (sa.query, ao.dense, it.dense, out.dense)  # sa.query's holds the [q | k | v] product's x
        saved = [(m, m.cache) for m in (self, act, ao.dropout, out.dropout) + linears + norms]
        try:  # each cached (..., C) array as (B * T, C) tokens, `rows` of them
            for m in linears:  # (x, w, has_bias), joined
                (x, w, has_bias), joined = m.cache
                m.cache = ((x.reshape(-1, x.shape[-1])[rows], w, has_bias), joined)
            for m in norms:  # xhat, rstd, gamma
                xhat, rstd, gamma = m.cache
                m.cache = (xhat.reshape(-1, xhat.shape[-1])[rows], rstd.reshape(-1)[rows], gamma)
            for m in (ao.dropout, out.dropout):  # the scaled mask, or None
                m.cache = None if m.cache is None else m.cache.reshape(-1, m.cache.shape[-1])[rows]
            c = act.cache if isinstance(act.cache, tuple) else (act.cache,)  # arrays like x (x, y, x > 0), flags
            c = tuple(a.reshape(-1, a.shape[-1])[rows] if isinstance(a, np.ndarray) else a for a in c)
            act.cache = c if isinstance(act.cache, tuple) else c[0]
            self.cache = (True, (rows, B, T))
            return self.backward(dy)
        finally:
            for m, cache in saved:
                m.cache = cache


def unpack_rows(y, rows, B, T):
    """y (N, K), rows N of B * T -> (B, T, K): y's rows in place, zeros elsewhere"""
    out = np.zeros((B * T, y.shape[-1]), y.dtype)
    out[rows] = y
    return out.reshape(B, T, -1)


class EncodeCache(NamedTuple):
    embeds: bool        # inputs_embeds given (no word-embedding gradient; its gradient handed back)
    pos_rows: int       # rows of position ids: 1 when shared by the batch
    past: tuple         # per layer (k, v) before the layer's own keys, or None
    shape: tuple        # h's (B, T, C)
    dtype: object
    packed: tuple       # (rows, B, T) when the layers ran on the real tokens only, else None


def real_rows(layers, c, d):
    """(rows, B, T) of the real tokens when the layers' backward may run on them alone, else None.
    Real: a key some query may see (the mask codes every layer's attention read). Exact when d's other
    rows are 0: they stay 0 down every layer (no query sees their keys, and their queries' outputs
    have no gradient), so their products only add zeros. Taken when a tenth of the tokens or more are
    padding (below that, cutting the caches costs about what it saves); not with a past, nor with
    modules other than numlm's own (BertLayer.backward_on_rows cuts their caches)."""
    own = (Linear,) * 6 + (LayerNorm,) * 2 + (Dropout,) * 2 + (Activation, Attention)
    for layer in layers:  # numlm's own modules, no adapter, and one [q | k | v] product on all tokens
        sa, ao, it, out = layer.attention.self, layer.attention.output, layer.intermediate, layer.output
        mods = (sa.query, sa.key, sa.value, ao.dense, it.dense, out.dense, ao.LayerNorm, out.LayerNorm,
                ao.dropout, out.dropout, it.intermediate_act_fn, sa.core)
        if (tuple(type(m) for m in mods) != own or ao.adapters is not None or out.adapters is not None
                or layer.cache is None or layer.cache[0] is not True or layer.cache[1] is not None):
            return None
    codes = layers[0].attention.self.core.cache.codes  # (B|1, H|1, T, T) int8, or None (read once the types are ours)
    if codes is None or codes.shape[0] == 1 or c.past is not None:
        return None
    real = (codes != MASKED).any(axis=(1, 2)).reshape(-1)
    if 10 * real.sum() > 9 * real.size or d.reshape(-1, c.shape[-1])[~real].any():
        return None
    return np.flatnonzero(real), *c.shape[:2]


class BertEncoder(Module):
    def __init__(self, config):
        super().__init__()
        self.layer = ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(Module):
    """pooled = tanh(h[:, 0] Wp + bp)"""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.activation = Activation("tanh")


@register
class BertModel(PreTrainedModel):
    """The backbone: embeddings, L post-LN encoder layers, optional tanh pooler on [CLS].
    backward(grad): grad = d last_hidden_state, or a tuple (d last_hidden_state, d pooler_output)."""

    config_class = BertConfig
    base_model_prefix = "bert"
    # non-persistent buffers that old checkpoints (sentence-transformers, transformers 4.x) still hold
    ignore_on_load = (r"(^|\.)embeddings\.position_ids$", r"(^|\.)embeddings\.token_type_ids$")
    past_grads = None
    # True: the encoder layers compute the real tokens' rows only. The real tokens' outputs are
    # unchanged; the padding rows of the hidden states come out 0 and of the attentions differ, and
    # training draws dropout over the packed rows; gradients are unchanged when d h_L's padding rows
    # are 0 (heads on [CLS]). Not with a past, nor when a sequence's position 0 is padding.
    skip_padding = False

    def __init__(self, config, add_pooling_layer=True, seed=0, dtype="float32", init=True):
        self.add_pooling_layer = add_pooling_layer
        super().__init__(config, seed, dtype, init)

    def build(self):
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)
        self.pooler = BertPooler(self.config) if self.add_pooling_layer else None

    def encode(self, x):
        """x: the checked inputs (pretrained.bert_inputs) -> hidden states [h0, ..., hL] each (B, T, C),
        pooled (B, C) or None"""
        e, past = self.embeddings, x.past
        codes = attention_allowed(x.mask, x.B, x.T, x.past_len + x.T, False)  # once for every layer
        # h0 = Dropout(LN(word[ids] + token_type[tt] + position[pos]))
        word = e.word_embeddings(x.ids) if x.embeds is None else x.embeds
        h = e.dropout(e.LayerNorm(word + e.token_type_embeddings(x.token_types) + e.position_embeddings(x.pos)))
        packed = None
        # the layers see real tokens only, when every [CLS] (position 0, what the heads read) is one
        if self.skip_padding and past is None and x.mask is not None and x.mask[:, 0].all():
            packed = (np.flatnonzero(x.mask.reshape(-1)), x.B, x.T)
        self.cache = EncodeCache(x.embeds is not None, x.pos.shape[0], past, h.shape, h.dtype, packed)
        hs = [h]
        h = h if packed is None else h.reshape(-1, h.shape[-1])[packed[0]]
        # h_l = layer_l(h_{l-1})
        for i, layer in enumerate(self.encoder.layer.items):
            h = layer(h, codes, None if past is None else past[i], packed)
            hs.append(h if packed is None else unpack_rows(h, *packed))
        h = hs[-1]
        # pooled = tanh(h_L[:, 0] Wp + bp)
        p = self.pooler
        pooled = p.activation(p.dense(h[:, 0])) if p is not None else None
        return hs, pooled

    def encode_backward(self, dh=None, dpooled=None):
        """dh: d h_L (B, T, C), dpooled: d pooled (B, C) (either may be None) -> every parameter's gradient"""
        c = self.cache
        e, layers = self.embeddings, self.encoder.layer.items
        d = np.zeros(c.shape, dtype=c.dtype) if dh is None else dh
        # pooled = tanh(h_L[:, 0] Wp + bp)
        if dpooled is not None:
            d = d.copy() if dh is not None else d
            d[:, 0] += self.pooler.dense.backward(self.pooler.activation.backward(dpooled))
        # h_l = layer_l(h_{l-1}), down to the lowest layer that has a gradient to compute
        lo = lowest_needing_backward(e, c.embeds, layers, c.past)
        packed = c.packed if c.packed is not None or lo == len(layers) else real_rows(layers[lo:], c, d)
        if packed is not None and lo < len(layers):  # the real tokens' rows alone
            d = d.reshape(-1, c.shape[-1])[packed[0]]
        for layer in reversed(layers[lo:]):
            d = layer.backward(d) if packed is c.packed else layer.backward_on_rows(d, *packed)
        if packed is not None and lo < len(layers):
            d = unpack_rows(d, *packed)
        self.past_grads = None if c.past is None else tuple(
            layer.attention.self.core.dpast if i >= lo else None for i, layer in enumerate(layers))
        e.inputs_embeds_grad = None
        if lo > 0:
            return
        # h0 = Dropout(LN(word + token_type[tt] + position[pos]))
        de = e.LayerNorm.backward(e.dropout.backward(d))
        e.inputs_embeds_grad = de if c.embeds else None
        if not c.embeds:
            e.word_embeddings.backward(de)
        e.token_type_embeddings.backward(de)
        e.position_embeddings.backward(de if c.pos_rows == de.shape[0] else de.sum(axis=0, keepdims=True))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False, output_attentions=False, inputs_embeds=None, past_key_values=None):
        x = bert_inputs(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, past_key_values)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs, pooled = self.encode(x)
        self._last = (hs[-1], pooled)
        out = ModelOutput(last_hidden_state=hs[-1]) if pooled is None else \
            ModelOutput(last_hidden_state=hs[-1], pooler_output=pooled)
        if output_hidden_states or output_attentions:
            out.update(extras(self, hs, output_hidden_states, output_attentions))
        return out

    def backward(self, grad=None):
        """grad = d last_hidden_state, or a tuple (d last_hidden_state, d pooler_output)"""
        h, pooled = self._need_last()
        if grad is None:
            raise ValueError("BertModel has no loss; pass the gradient of last_hidden_state to backward(grad)")
        if isinstance(grad, tuple) and len(grad) > 1 and grad[1] is not None and pooled is None:
            raise ValueError("this BertModel has no pooler")
        self.encode_backward(*output_grads(grad, ("last_hidden_state", "pooler_output"), (h, pooled)))


def extras(bert, hs, output_hidden_states, output_attentions):
    """transformers' optional outputs: hidden_states, attentions (each only if asked)."""
    out = {}
    if output_hidden_states:
        out["hidden_states"] = tuple(hs)
    if output_attentions:
        out["attentions"] = tuple(layer.attention.self.core.probs for layer in bert.encoder.layer.items)
    return out


# ---------------------------------------------------------------------------------------- the heads

class BertPredictionHeadTransform(Module):
    """t = LN(act(h Wt + bt))"""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = Activation(config.hidden_act)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class TiedDecoder(Module):
    """logits = t We^T + bias: the MLM decoder IS the word-embedding table (BERT's, RoBERTa's and
    DistilBERT's heads; only `bias` is its own parameter)."""

    def __init__(self, vocab_size, word_embeddings):
        super().__init__()
        self.add_param("bias", np.zeros(vocab_size))
        self._word = (word_embeddings,)  # a tuple, so the table is not discovered as a child a second time

    def forward(self, t):  # (..., C) -> (..., V)
        logits, self.cache = OPS["linear"][0](t, self._word[0].params["weight"].T, self.params["bias"])
        return logits

    def backward(self, dlogits):  # (..., V) -> (..., C)
        word = self._word[0]
        # logits = t We^T + b:  dt = dlogits We,  db = sum dlogits,  dWe = dlogits^T t (added to the lookup's)
        if word.requires_grad("weight"):  # dt and dWe, one core each; dWe added into the table's gradient
            t, d2 = self.cache[0], dlogits.reshape(-1, dlogits.shape[-1])
            dt, _ = mm_pair(d2, word.params["weight"], d2.T, t.reshape(-1, t.shape[-1]), into=word.grads["weight"])
            dt, db = dt.reshape(t.shape), d2.sum(axis=0) if self.requires_grad("bias") else None
        else:
            dt, _, db = OPS["linear"][1](dlogits, self.cache, need_dw=False, need_db=self.requires_grad("bias"))
        if db is not None:
            self.add_grad("bias", db)
        return dt


class BertLMPredictionHead(TiedDecoder):
    """logits = t We^T + bias, t = LN(act(h Wt + bt)); the decoder IS the word-embedding table."""

    def __init__(self, config, word_embeddings):
        super().__init__(config.vocab_size, word_embeddings)
        self.transform = BertPredictionHeadTransform(config)

    def forward(self, h):  # (..., C) -> (..., V)
        tr = self.transform
        # logits = t We^T + b,  t = LN(act(h Wt + bt))
        return TiedDecoder.forward(self, tr.LayerNorm(tr.transform_act_fn(tr.dense(h))))

    def backward(self, dlogits):  # (..., V) -> (..., C)
        tr = self.transform
        # logits = t We^T + b
        dt = TiedDecoder.backward(self, dlogits)
        # t = LN(act(h Wt + bt))
        return tr.dense.backward(tr.transform_act_fn.backward(tr.LayerNorm.backward(dt)))


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


class BertTask(PreTrainedModel):
    """What every BERT task model shares: the backbone `bert`, the tied MLM decoder, the classifier dropout.
    RoBERTa's masked LM, token classification and QA are the classes below on its backbone `roberta`:
    those heads reach the backbone by name, getattr(self, self.base_model_prefix)."""

    config_class = BertConfig
    base_model_prefix = "bert"
    tied_keys = TIED
    ignore_on_load = BertModel.ignore_on_load
    output_hidden_states = output_attentions = False

    def _backbone(self, add_pooling_layer):
        self.bert = BertModel(self.config, add_pooling_layer=add_pooling_layer, init=False)

    def _tied_word_embeddings(self):
        if not self.config.tie_word_embeddings:
            raise ValueError("config tie_word_embeddings=False (an untied MLM decoder) is not supported")
        self.tied = dict(self.tied_keys)
        return getattr(self, self.base_model_prefix).embeddings.word_embeddings

    def _classifier_dropout(self):
        p = self.config.classifier_dropout
        return Dropout(self.config.hidden_dropout_prob if p is None else p)

    def _output(self, hs, pooled, output_hidden_states, output_attentions, **fields):
        """The head's fields (None ones left out), then the backbone's (hidden_states, attentions,
        last_hidden_state, pooler_output)."""
        out = ModelOutput({k: v for k, v in fields.items() if v is not None})
        if output_hidden_states or output_attentions:
            out.update(extras(getattr(self, self.base_model_prefix), hs, output_hidden_states, output_attentions))
        out.update(last_hidden_state=hs[-1])
        if pooled is not None:
            out.update(pooler_output=pooled)
        return out


@register
class BertForPreTraining(BertTask):
    """loss = CE(prediction_logits, labels) + CE(seq_relationship_logits, next_sentence_label).
    backward(grad): d prediction_logits, or a tuple (d prediction_logits, d seq_relationship_logits).
    In training (model.train()) with labels, the MLM head runs only at the labelled positions, as the
    original BERT: prediction_logits is then (M, V), one row per label != -100 in row-major order, and
    out.mlm_positions holds their flat indices b*T + t. Set mlm_on_labelled_only = False for the
    (B, T, V) logits in training too; eval mode and fill-mask always get them."""

    mlm_on_labelled_only = True

    def build(self):
        self._backbone(True)
        self.cls = BertPreTrainingHeads(self.config, self._tied_word_embeddings())

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, output_hidden_states=False, output_attentions=False, inputs_embeds=None, past_key_values=None):
        x = bert_inputs(self.bert, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        past_key_values)
        B, T = x.shape
        if labels is not None:
            labels = labels_like("labels", labels, (B, T), self.config.vocab_size)
        if next_sentence_label is not None:
            next_sentence_label = labels_like("next_sentence_label", next_sentence_label, (B,), 2)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs, pooled = self.bert.encode(x)
        h = hs[-1]
        rows = None
        if self.training and labels is not None and self.mlm_on_labelled_only:
            # the original BERT's MLM: the head only where a label is (15% of positions); the others'
            # logits would only be ignored by the loss
            rows = np.flatnonzero(labels.reshape(-1) != IGNORE_INDEX)  # (M,) flat positions b*T + t
            logits = self.cls.predictions(h.reshape(B * T, -1)[rows])  # (M, V)
            labels = labels.reshape(-1)[rows]  # (M,)
        else:
            logits = self.cls.predictions(h)  # (B, T, V)
        seq = self.cls.seq_relationship(pooled)  # (B, 2)
        loss = mlm = nsp = c1 = c2 = None
        if labels is not None and next_sentence_label is not None:
            # loss = CE(MLM) + CE(NSP)
            mlm, c1 = cross_entropy_forward(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            nsp, c2 = cross_entropy_forward(seq, next_sentence_label)
            loss = mlm + nsp
        self._last = (h, rows, logits, seq, c1, c2)
        return self._output(hs, pooled, output_hidden_states, output_attentions, loss=loss, mlm_loss=mlm, nsp_loss=nsp,
                            prediction_logits=logits, seq_relationship_logits=seq, mlm_positions=rows)

    def backward(self, grad=None):
        """d loss (grad None), or d prediction_logits and/or d seq_relationship_logits"""
        h, rows, logits, seq, c1, c2 = self._need_last()
        if grad is not None:
            dlogits, dseq = output_grads(grad, ("prediction_logits", "seq_relationship_logits"), (logits, seq))
        elif c1 is None:
            no_loss("labels and next_sentence_label")
        else:
            # loss = CE(MLM) + CE(NSP)
            dlogits = cross_entropy_backward(1.0, c1).reshape(logits.shape)
            dseq = cross_entropy_backward(1.0, c2)
        dh = self.cls.predictions.backward(dlogits) if dlogits is not None else None
        if dh is not None and rows is not None:  # h[rows] was the head's input: scatter back
            full = np.zeros((h.shape[0] * h.shape[1], h.shape[2]), dtype=dh.dtype)
            full[rows] = dh
            dh = full.reshape(h.shape)  # (B, T, C)
        dpooled = self.cls.seq_relationship.backward(dseq) if dseq is not None else None
        self.bert.encode_backward(dh, dpooled)


def token_loss_forward(logits, labels):
    """loss = CE(logits, labels) over the labelled tokens (ignore_index -100), one mean: masked LM and token
    classification (DistilBERT's too). logits (B, T, n), labels (B, T) checked (labels_like) or None -> loss,
    (its backward, its cache); None, None without labels"""
    if labels is None:
        return None, None
    n = logits.shape[-1]
    loss, c = cross_entropy_forward(logits.reshape(-1, n), labels.reshape(-1))
    return loss, (cross_entropy_backward, c)


@register
class BertForMaskedLM(BertTask):
    """loss = CE(logits, labels), ignore_index -100, one mean over the labelled tokens. No pooler."""

    def build(self):
        self._backbone(False)
        self.cls = BertOnlyMLMHead(self.config, self._tied_word_embeddings())

    def _mlm_head(self):
        """logits = head(h): cls.predictions (RoBERTa's: lm_head)"""
        return self.cls.predictions

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False, inputs_embeds=None, past_key_values=None):
        bert = getattr(self, self.base_model_prefix)  # self.bert (RoBERTa's: self.roberta)
        x = bert_inputs(bert, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, past_key_values)
        labels = None if labels is None else labels_like("labels", labels, x.shape, self.config.vocab_size)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs, pooled = bert.encode(x)
        logits = self._mlm_head()(hs[-1])  # (B, T, V)
        loss, loss_cache = token_loss_forward(logits, labels)  # loss = CE(logits, labels)
        self._last = (logits, loss_cache)
        return self._output(hs, pooled, output_hidden_states, output_attentions, loss=loss, logits=logits)

    def backward(self, grad=None):
        """d loss (grad None), or grad = d logits"""
        logits, loss = self._need_last()
        dlogits = logits_grad(grad, logits, loss)  # loss = CE(logits, labels)
        # logits = head(h)
        getattr(self, self.base_model_prefix).encode_backward(self._mlm_head().backward(dlogits))


@register
class BertForNextSentencePrediction(BertTask):
    """loss = CE(seq_relationship(pooled), labels); labels (B,) with 0 = B continues A, 1 = random B."""

    def build(self):
        self._backbone(True)
        self.cls = BertOnlyNSPHead(self.config)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, output_hidden_states=False, output_attentions=False, inputs_embeds=None,
                past_key_values=None):
        labels = next_sentence_label if labels is None else labels  # transformers' old keyword
        x = bert_inputs(self.bert, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        past_key_values)
        labels = None if labels is None else labels_like("labels", labels, (x.B,), 2)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs, pooled = self.bert.encode(x)
        logits = self.cls.seq_relationship(pooled)  # (B, 2)
        loss = ce = None
        if labels is not None:  # loss = CE(logits, labels)
            loss, ce = cross_entropy_forward(logits, labels)
        self._last = (logits, None if ce is None else (cross_entropy_backward, ce))
        return self._output(hs, pooled, output_hidden_states, output_attentions, loss=loss, logits=logits)

    def backward(self, grad=None):
        """d loss (grad None), or grad = d logits"""
        logits, loss = self._need_last()
        dlogits = logits_grad(grad, logits, loss)  # loss = CE(logits, labels)
        # logits = seq_relationship(pooled)
        self.bert.encode_backward(None, self.cls.seq_relationship.backward(dlogits))


@register
class BertForSequenceClassification(BertTask):
    """logits = Dropout(pooled) Wc + bc.  Loss by problem_type as transformers: regression -> MSE
    (num_labels == 1), single_label_classification -> CE, multi_label_classification -> BCE with logits."""

    per_token = False

    def build(self):
        self.num_labels = self.config.num_labels
        self._backbone(not self.per_token)
        self.dropout = self._classifier_dropout()
        self.classifier = Linear(self.config.hidden_size, self.num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False, inputs_embeds=None, past_key_values=None):
        bert = getattr(self, self.base_model_prefix)  # self.bert (RoBERTa's token classification: self.roberta)
        x = bert_inputs(bert, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, past_key_values)
        if labels is not None:
            labels = (labels_like("labels", labels, x.shape, self.num_labels) if self.per_token
                      else classification_labels(self.config, labels, x.B, self.classifier.params["weight"].dtype))
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs, pooled = bert.encode(x)
        logits = self.classifier(self.dropout(hs[-1] if self.per_token else pooled))  # (B, T, K) or (B, K)
        loss = loss_cache = None
        if labels is not None and self.per_token:  # loss = CE(logits, labels) over the labelled tokens
            loss, loss_cache = token_loss_forward(logits, labels)
        elif labels is not None:
            y, loss_forward, loss_backward = labels  # loss = MSE, CE or BCE with logits (classification_labels)
            loss, cache = loss_forward(logits, y)
            loss_cache = (loss_backward, cache)
        self._last = (logits, loss_cache)
        return self._output(hs, pooled, output_hidden_states, output_attentions, loss=loss, logits=logits)

    def backward(self, grad=None):
        """d loss (grad None), or grad = d logits"""
        logits, loss = self._need_last()
        dlogits = logits_grad(grad, logits, loss)  # loss = CE(logits, labels), or by problem_type
        # logits = classifier(dropout(pooled or h))
        dx = self.dropout.backward(self.classifier.backward(dlogits))
        getattr(self, self.base_model_prefix).encode_backward(*((dx, None) if self.per_token else (None, dx)))


@register
class BertForTokenClassification(BertForSequenceClassification):
    """logits = Dropout(h) Wc + bc per token; loss = CE(logits, labels), ignore_index -100. No pooler."""

    per_token = True


def span_positions(start_positions, end_positions, B):
    """QA's labels: both or neither, each (B,) or (B, 1) integers -> (start, end) (B,) or None"""
    if (start_positions is None) != (end_positions is None):
        raise ValueError("pass both start_positions and end_positions, or neither")
    if start_positions is None:
        return None
    pos = []
    for name, p in (("start_positions", start_positions), ("end_positions", end_positions)):
        p = as_ids(name, p)
        if p.shape not in ((B,), (B, 1)):
            raise ValueError(f"{name} must have shape {(B,)}, got {p.shape}")
        pos.append(p.reshape(B))
    return pos


def span_loss_forward(start, end, positions):
    """loss = (CE(start, s) + CE(end, e)) / 2, positions clamped to [0, T] and T ignored (transformers).
    start, end: (B, T), positions: span_positions' (s, e) or None -> loss, caches (None, None without)"""
    if positions is None:
        return None, None
    T = start.shape[1]
    s, e = (np.clip(p, 0, T) for p in positions)
    (ls, cs), (le, ce) = cross_entropy_forward(start, s, T), cross_entropy_forward(end, e, T)
    return (ls + le) / 2, (cs, ce)


def span_loss_backward(grad, start, end, caches):
    """d start, d end (B, T) each: from the given grad = (d start_logits, d end_logits), else of the loss"""
    if grad is not None:
        ds, de = output_grads(grad, ("start_logits", "end_logits"), (start, end))
        return (np.zeros_like(start) if ds is None else ds), (np.zeros_like(end) if de is None else de)
    if caches is None:
        no_loss("start_positions and end_positions")
    # loss = (CE(start) + CE(end)) / 2
    return tuple(cross_entropy_backward(0.5, c) for c in caches)


@register
class BertForQuestionAnswering(BertTask):
    """start_logits, end_logits = split(h Wqa + bqa); loss = (CE(start) + CE(end)) / 2 with positions
    clamped to [0, T] and T ignored, as transformers. No pooler.
    backward(grad): grad = (d start_logits, d end_logits)."""

    def build(self):
        self.num_labels = self.config.num_labels
        if self.num_labels != 2:
            raise ValueError(f"{type(self).__name__} needs config num_labels == 2, got {self.num_labels}")
        self._backbone(False)
        self.qa_outputs = Linear(self.config.hidden_size, 2)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None, output_hidden_states=False, output_attentions=False,
                inputs_embeds=None, past_key_values=None):
        bert = getattr(self, self.base_model_prefix)  # self.bert (RoBERTa's: self.roberta)
        x = bert_inputs(bert, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, past_key_values)
        positions = span_positions(start_positions, end_positions, x.B)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs, pooled = bert.encode(x)
        logits = self.qa_outputs(hs[-1])  # (B, T, 2)
        start, end = logits[..., 0].copy(), logits[..., 1].copy()  # (B, T) each
        loss, caches = span_loss_forward(start, end, positions)
        self._last = (start, end, caches)
        return self._output(hs, pooled, output_hidden_states, output_attentions, loss=loss, start_logits=start,
                            end_logits=end)

    def backward(self, grad=None):
        """d loss (grad None), or grad = (d start_logits, d end_logits)"""
        start, end, caches = self._need_last()
        ds, de = span_loss_backward(grad, start, end, caches)
        # start, end = split(qa_outputs(h))
        dh = self.qa_outputs.backward(np.stack([ds, de], axis=-1))  # (B, T, 2) -> (B, T, C)
        getattr(self, self.base_model_prefix).encode_backward(dh)


__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering"]
