"""BERT, the math (modeling_bert.py, eager attention): embeddings -> L post-LN layers -> pooler,
forward and backward written straight through on arrays that numlm.models.checks has already checked.

    h0 = Dropout(LN(word[ids] + token_type[tt] + position[pos]))       embeddings
    a  = LN(x + Dropout(ctx Wo + bo)),  ctx = Attn(x Wq, x Wk, x Wv)    each of L layers (post-LN)
    y  = LN(a + Dropout(act(a W1 + b1) W2 + b2))
    pooled = tanh(h_L[:, 0] Wp + bp)                                    the pooler on [CLS]
    Attn(q, k, v) = Dropout(softmax(q k^T / sqrt(D) + M)) v  per head, M = finfo.min at padding keys
Attribute names are transformers', so a parameter's dotted name is its state_dict key
(`encoder.layer.0.attention.self.query.weight`). Linears are nn.Linear (stored transposed inside numlm).

Hooks for parameter-efficient fine-tuning (numlm.peft), each None unless set:
  - inputs_embeds replaces word[ids] (prompt tuning); its gradient is left in embeddings.inputs_embeds_grad.
  - past: per layer (k, v) (B, H, T_past, D) before the layer's own keys (prefix tuning), the mask
    covering T_past + T keys; their gradients are left in `past_grads`.
  - attention.output.adapters / output.adapters: a module with forward(h, x, ln) -> y and
    backward(dy) -> (dh, dx) that replaces y = LN(x + h) (h: after the projection and dropout).
  - any Linear (query, key, value, dense) may be replaced by a module with the same forward/backward.
"""
import numpy as np

from ..nn import (Module, ModuleList, Linear, Embedding, LayerNorm, Dropout, Activation, Attention,
                  add_residual, add_residual_backward, lowest_needing_backward)
from .heads import BertPooler
from .pretrained import PreTrainedModel


class BertEmbeddings(Module):
    """h0 = Dropout(LN(word[ids] + token_type[tt] + position[pos]))"""

    def __init__(self, config):
        super().__init__()
        C = config.hidden_size
        self.word_embeddings = Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.position_embeddings = Embedding(config.max_position_embeddings, C)
        self.token_type_embeddings = Embedding(config.type_vocab_size, C)
        self.LayerNorm = LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds=None):  # (B, T) ints -> (B, T, C)
        word = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        e = word + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        self.cache = (inputs_embeds is not None, position_ids.shape[0])  # position_ids (1, T) broadcast over B
        return self.dropout(self.LayerNorm(e))

    def backward(self, dout):  # (B, T, C)
        embeds, pos_rows = self.cache
        # h0 = dropout(LN(e))
        de = self.LayerNorm.backward(self.dropout.backward(dout))
        # e = word + token_type[tt] + position[pos]
        self.inputs_embeds_grad = de if embeds else None
        if not embeds:
            self.word_embeddings.backward(de)
        self.token_type_embeddings.backward(de)
        self.position_embeddings.backward(de if pos_rows == de.shape[0] else de.sum(axis=0, keepdims=True))


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

    def forward(self, x, mask=None, past=None):  # (B, T, C) -> (B, T, C)
        return self.core(self.query(x), self.key(x), self.value(x), mask, past)

    def backward(self, dctx):
        # ctx = core(query(x), key(x), value(x))
        dq, dk, dv = self.core.backward(dctx)
        return self.query.backward(dq) + self.key.backward(dk) + self.value.backward(dv)


class BertResidualOutput(Module):
    """y = LN(x + Dropout(h W + b)): transformers' BertSelfOutput and BertOutput (same structure)."""

    def __init__(self, c_in, config):
        super().__init__()
        self.dense = Linear(c_in, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.adapters = None

    def forward(self, h, x):  # h: (B, T, c_in), x: (B, T, C) -> (B, T, C)
        return add_residual(self.dropout(self.dense(h)), x, self.LayerNorm, self.adapters)

    def backward(self, dy):  # -> dh, dx
        # y = LN(x + o)
        do, dx = add_residual_backward(dy, self.LayerNorm, self.adapters)
        # o = dropout(dense(h))
        return self.dense.backward(self.dropout.backward(do)), dx


class BertAttention(Module):
    """a = output(self(x), x) = LN(x + Dropout(SelfAttention(x) Wo + bo))"""

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

    def forward(self, a):  # (B, T, C) -> (B, T, I)
        return self.intermediate_act_fn(self.dense(a))

    def backward(self, di):
        return self.dense.backward(self.intermediate_act_fn.backward(di))


class BertLayer(Module):
    """post-LN:  a = LN(x + Dropout(Attn(x) Wo));  y = LN(a + Dropout(act(a W1) W2))"""

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config.intermediate_size, config)

    def forward(self, x, mask=None, past=None):  # (B, T, C) -> (B, T, C)
        ctx = self.attention.self(x, mask, past)
        a = self.attention.output(ctx, x)
        return self.output(self.intermediate(a), a)

    def backward(self, dy):
        # y = output(intermediate(a), a)
        di, da = self.output.backward(dy)
        da = da + self.intermediate.backward(di)
        # a = attention.output(ctx, x)
        dctx, dx = self.attention.output.backward(da)
        # ctx = attention.self(x)
        return dx + self.attention.self.backward(dctx)


class BertEncoder(Module):
    def __init__(self, config):
        super().__init__()
        self.layer = ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertCore(PreTrainedModel):
    """The backbone: embeddings, L post-LN encoder layers, optional tanh pooler on [CLS]."""

    base_model_prefix = "bert"
    _past = None
    # non-persistent buffers that old checkpoints (sentence-transformers, transformers 4.x) still hold
    ignore_on_load = (r"(^|\.)embeddings\.position_ids$", r"(^|\.)embeddings\.token_type_ids$")

    def __init__(self, config, add_pooling_layer=True, seed=0, dtype="float32", init=True):
        self.add_pooling_layer = add_pooling_layer
        super().__init__(config, seed, dtype, init)

    def build(self):
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)
        self.pooler = BertPooler(self.config) if self.add_pooling_layer else None

    def encode(self, ids, token_types, pos, mask=None, past=None, inputs_embeds=None):
        """ids, token_types (B, T), pos (B|1, T) ints; mask (B, T_past + T) bool
        -> hidden states [h0, ..., hL] each (B, T, C), pooled (B, C) or None"""
        # h0 = Dropout(LN(word[ids] + token_type[tt] + position[pos]))
        self._past = past
        h = self.embeddings(ids, token_types, pos, inputs_embeds)  # (B, T, C)
        hs = [h]
        # h_l = layer_l(h_{l-1})
        for i, layer in enumerate(self.encoder.layer):
            h = layer(h, mask, None if past is None else past[i])
            hs.append(h)
        # pooled = tanh(h_L[:, 0] Wp + bp)
        pooled = self.pooler(h) if self.pooler is not None else None
        return hs, pooled

    def encode_backward(self, dh, dpooled=None):
        """dh: d h_L (B, T, C), dpooled: d pooled (B, C) (either may be None) -> every parameter's gradient"""
        d = np.zeros_like(self._last.last_hidden_state) if dh is None else dh
        # pooled = tanh(h_L[:, 0] Wp + bp)
        if dpooled is not None:
            d = d + self.pooler.backward(dpooled)
        # h_l = layer_l(h_{l-1}), down to the lowest layer that has a gradient to compute
        lo = lowest_needing_backward(self.embeddings, self.embeddings.cache[0], self.encoder.layer.items, self._past)
        for layer in reversed(self.encoder.layer.items[lo:]):
            d = layer.backward(d)
        self.past_grads = tuple(layer.attention.self.core.dpast if i >= lo else None
                                for i, layer in enumerate(self.encoder.layer))
        # h0 = embeddings(ids, tt, pos)
        if lo == 0:
            self.embeddings.backward(d)
