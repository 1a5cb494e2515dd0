"""DistilBERT, one file top to bottom (modeling_distilbert.py, eager attention): the encoder, the heads, the
losses, and the backward of each in reverse, every step quoting the forward line it differentiates. The
ops are BERT's; the parameter names are DistilBERT's own, so its layer is written out here.

    h0 = Dropout(LN(word[ids] + position[0 .. T-1]))                   no token types; word row pad gets
                                                                       no gradient from the lookup
    a  = LN(x + Attn(x Wq, x Wk, x Wv) Wo)                              each of L layers (post-LN; no dropout
    y  = LN(a + Dropout(act(a W1 + b1) W2 + b2))                        after out_lin), LN eps 1e-12
    Attn(q, k, v) = Dropout(softmax(q k^T / sqrt(D) + M)) v  per head, M = finfo.min at padding keys

    DistilBertModel                      last_hidden_state (no pooler)
    DistilBertForMaskedLM                loss = CE(LN(act(h Wt + bt)) We^T + b, labels), -100 ignored
    DistilBertForSequenceClassification  logits = Dropout(relu(h_L[:, 0] Wp + bp)) Wc + bc; loss by problem_type
    DistilBertForTokenClassification     logits = Dropout(h) Wc per token; loss = CE, -100 ignored
    DistilBertForQuestionAnswering       start, end = Dropout(h) Wqa; loss = (CE(start) + CE(end)) / 2

Attribute names are transformers', so a parameter's dotted name is its state_dict key
(`transformer.layer.0.attention.q_lin.weight`). Inputs are checked once, at each class's forward
(pretrained.distilbert_inputs). Hooks (numlm.peft), each None unless set: inputs_embeds (gradient left in
embeddings.inputs_embeds_grad), past_key_values (per layer (k, v) before the layer's own keys, positions
from T_past; gradients in `past_grads`), the block's attention_adapters / output_adapters (AdapterHub's
slots: forward(h, x, ln) -> y replaces y = LN(x + h)), and any Linear (q_lin, k_lin, v_lin, out_lin, lin1, lin2) may be
replaced by a module with the same forward/backward. (transformers' DistilBERT takes no past; numlm's
prefix tuning uses the hook as on BERT.)
"""
import numpy as np

from ..nn import Module, ModuleList, Linear, LayerNorm, Dropout, Activation, Attention
from ..nn import lowest_needing_backward
from ..ops import attention_allowed
from .bert import (BertEmbeddings, TiedDecoder, token_loss_forward, span_positions, span_loss_forward,
                   span_loss_backward)
from .config import DistilBertConfig
from .pretrained import (ModelOutput, PreTrainedModel, register, distilbert_inputs, output_grads, logits_grad,
                         labels_like, classification_labels)

TIED = {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"}


# ---------------------------------------------------------------------------------------- the encoder

class Embeddings(BertEmbeddings):
    """h0 = Dropout(LN(word[ids] + position[pos])): BERT's embeddings (bert.py) without token types"""

    def __init__(self, config):
        super().__init__(config, token_types=False, p=config.dropout)


class MultiHeadSelfAttention(Module):
    """ctx = Attn(x Wq + bq, x Wk + bk, x Wv + bv) Wo + bo, heads split and merged inside Attention"""

    def __init__(self, config):
        super().__init__()
        C = config.dim
        self.q_lin = Linear(C, C)
        self.k_lin = Linear(C, C)
        self.v_lin = Linear(C, C)
        self.out_lin = Linear(C, C)
        # transformers' dropout on the probabilities lives inside the attention core
        self.core = Attention(config.n_heads, dropout_p=config.attention_dropout)


class FFN(Module):
    """m = Dropout(act(a W1 + b1) W2 + b2)"""

    def __init__(self, config):
        super().__init__()
        self.lin1 = Linear(config.dim, config.hidden_dim)
        self.activation = Activation(config.activation)
        self.lin2 = Linear(config.hidden_dim, config.dim)
        self.dropout = Dropout(config.dropout)


class TransformerBlock(Module):
    """post-LN:  a = LN(x + Attn(x) Wo);  y = LN(a + Dropout(act(a W1) W2))"""

    attention_adapters = output_adapters = None  # AdapterHub's slots (forward(h, x, ln) -> y replaces LN(x + h))

    def __init__(self, config):
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.ffn = FFN(config)
        self.output_layer_norm = LayerNorm(config.dim, eps=config.layer_norm_eps)

    def forward(self, x, mask=None, past=None):  # (B, T, C) -> (B, T, C)
        sa, ffn = self.attention, self.ffn
        # a = LN(x + h),  h = ctx Wo + bo,  ctx = Attn(x Wq + bq, x Wk + bk, x Wv + bv)  (an adapter slot
        # replaces the step); one product [q | k | v] = x [Wq | Wk | Wv] + [bq | bk | bv] unless peft
        # replaced one of the three with a module of its own (kept: the backward follows it)
        joined = all(type(m) is Linear for m in (sa.q_lin, sa.k_lin, sa.v_lin))
        self.cache = (joined,)
        if joined:
            h = sa.out_lin(sa.core(*np.split(sa.q_lin(x, sa.k_lin, sa.v_lin), 3, axis=-1), mask, past))
        else:
            h = sa.out_lin(sa.core(sa.q_lin(x), sa.k_lin(x), sa.v_lin(x), mask, past))
        slot = self.attention_adapters
        a = self.sa_layer_norm(x + h) if slot is None else slot(h, x, self.sa_layer_norm)
        # y = LN(a + m),  m = Dropout(act(a W1 + b1) W2 + b2)
        m = ffn.dropout(ffn.lin2(ffn.activation(ffn.lin1(a))))  # (B, T, I) inside
        slot = self.output_adapters
        return self.output_layer_norm(a + m) if slot is None else slot(m, a, self.output_layer_norm)

    def backward(self, dy):
        sa, ffn = self.attention, self.ffn
        # y = LN(a + m):  dm = da = LN'(dy)
        slot = self.output_adapters
        dm, da = (self.output_layer_norm.backward(dy),) * 2 if slot is None else slot.backward(dy)
        # m = Dropout(act(a W1 + b1) W2 + b2)
        da = da + ffn.lin1.backward(ffn.activation.backward(ffn.lin2.backward(ffn.dropout.backward(dm))))
        # a = LN(x + h):  dh = dx = LN'(da)
        slot = self.attention_adapters
        dh, dx = (self.sa_layer_norm.backward(da),) * 2 if slot is None else slot.backward(da)
        # h = ctx Wo + bo,  ctx = Attn(x Wq + bq, x Wk + bk, x Wv + bv)
        dctx = sa.out_lin.backward(dh)
        (joined,) = self.cache
        if joined:  # the forward's one product [q | k | v] = x [Wq | Wk | Wv] + ...
            return dx + sa.q_lin.backward(sa.core.backward(dctx, joined=True))
        dq, dk, dv = sa.core.backward(dctx)
        return dx + sa.q_lin.backward(dq) + sa.k_lin.backward(dk) + sa.v_lin.backward(dv)


class Transformer(Module):
    def __init__(self, config):
        super().__init__()
        self.layer = ModuleList(TransformerBlock(config) for _ in range(config.n_layers))


def extras(model, hs, output_hidden_states, output_attentions):
    """transformers' optional outputs: hidden_states, attentions (each only if asked)."""
    out = {}
    if output_hidden_states:
        out["hidden_states"] = tuple(hs)
    if output_attentions:
        out["attentions"] = tuple(layer.attention.core.probs for layer in model.transformer.layer.items)
    return out


@register
class DistilBertModel(PreTrainedModel):
    """The backbone: embeddings, L post-LN layers; no pooler. backward(grad): grad = d last_hidden_state."""

    config_class = DistilBertConfig
    base_model_prefix = "distilbert"
    past_grads = None

    def build(self):
        self.embeddings = Embeddings(self.config)
        self.transformer = Transformer(self.config)

    def encode(self, x):
        """x: the checked inputs (pretrained.distilbert_inputs) -> hidden states [h0, ..., hL] each (B, T, C)"""
        e, past = self.embeddings, x.past
        codes = attention_allowed(x.mask, x.B, x.T, x.past_len + x.T, False)  # once for every layer
        # h0 = Dropout(LN(word[ids] + position[pos]))
        word = e.word_embeddings(x.ids) if x.embeds is None else x.embeds
        h = e.dropout(e.LayerNorm(word + e.position_embeddings(x.pos)))  # positions (1, T): every row alike
        self.cache = (x.embeds is not None, past, h.shape, h.dtype)
        hs = [h]
        # h_l = layer_l(h_{l-1})
        for i, layer in enumerate(self.transformer.layer.items):
            h = layer(h, codes, None if past is None else past[i])
            hs.append(h)
        return hs

    def encode_backward(self, dh):
        """dh: d h_L (B, T, C) -> every parameter's gradient"""
        embeds, past, shape, dtype = self.cache
        e, layers = self.embeddings, self.transformer.layer.items
        d = dh
        # h_l = layer_l(h_{l-1}), down to the lowest layer that has a gradient to compute
        lo = lowest_needing_backward(e, embeds, layers, past)
        for layer in reversed(layers[lo:]):
            d = layer.backward(d)
        self.past_grads = None if past is None else tuple(
            layer.attention.core.dpast if i >= lo else None for i, layer in enumerate(layers))
        e.inputs_embeds_grad = None
        if lo > 0:
            return
        # h0 = Dropout(LN(word + position[pos]))
        de = e.LayerNorm.backward(e.dropout.backward(d))
        e.inputs_embeds_grad = de if embeds else None
        if not embeds:
            e.word_embeddings.backward(de)
        e.position_embeddings.backward(de.sum(axis=0, keepdims=True))  # (1, T, C): shared by every row

    def forward(self, input_ids=None, attention_mask=None, output_hidden_states=False, output_attentions=False,
                inputs_embeds=None, past_key_values=None):
        x = distilbert_inputs(self, input_ids, attention_mask, inputs_embeds, past_key_values)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs = self.encode(x)
        self._last = hs[-1]
        out = ModelOutput(last_hidden_state=hs[-1])
        if output_hidden_states or output_attentions:
            out.update(extras(self, hs, output_hidden_states, output_attentions))
        return out

    def backward(self, grad=None):
        """grad = d last_hidden_state"""
        h = self._need_last()
        if grad is None:
            raise ValueError("DistilBertModel has no loss; pass the gradient of last_hidden_state to backward(grad)")
        self.encode_backward(output_grads(grad, ("last_hidden_state",), (h,))[0])


# ---------------------------------------------------------------------------------------- the heads

class DistilBertTask(PreTrainedModel):
    """What every DistilBERT task model shares: the backbone `distilbert`, the outputs."""

    config_class = DistilBertConfig
    base_model_prefix = "distilbert"

    def _backbone(self):
        self.distilbert = DistilBertModel(self.config, init=False)

    def _output(self, hs, output_hidden_states, output_attentions, **fields):
        """The head's fields (None ones left out), then the backbone's (hidden_states, attentions,
        last_hidden_state)."""
        out = ModelOutput({k: v for k, v in fields.items() if v is not None})
        if output_hidden_states or output_attentions:
            out.update(extras(self.distilbert, hs, output_hidden_states, output_attentions))
        out.update(last_hidden_state=hs[-1])
        return out


@register
class DistilBertForMaskedLM(DistilBertTask):
    """logits = LN(act(h Wt + bt)) We^T + b (vocab_transform, vocab_layer_norm, vocab_projector tied to the
    word table); loss = CE(logits, labels), ignore_index -100."""

    def build(self):
        if not self.config.tie_word_embeddings:
            raise ValueError("config tie_word_embeddings=False (an untied MLM decoder) is not supported")
        self._backbone()
        C = self.config.dim
        self.vocab_transform = Linear(C, C)
        self.activation = Activation(self.config.activation)
        self.vocab_layer_norm = LayerNorm(C, eps=self.config.layer_norm_eps)
        self.vocab_projector = TiedDecoder(self.config.vocab_size, self.distilbert.embeddings.word_embeddings)
        self.tied = dict(TIED)

    def forward(self, input_ids=None, attention_mask=None, labels=None, output_hidden_states=False,
                output_attentions=False, inputs_embeds=None, past_key_values=None):
        x = distilbert_inputs(self.distilbert, input_ids, attention_mask, inputs_embeds, past_key_values)
        labels = None if labels is None else labels_like("labels", labels, x.shape, self.config.vocab_size)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs = self.distilbert.encode(x)
        # logits = t We^T + b,  t = LN(act(h Wt + bt))
        t = self.vocab_layer_norm(self.activation(self.vocab_transform(hs[-1])))
        logits = self.vocab_projector(t)  # (B, T, V)
        loss, loss_cache = token_loss_forward(logits, labels)  # loss = CE(logits, labels)
        self._last = (logits, loss_cache)
        return self._output(hs, output_hidden_states, output_attentions, loss=loss, logits=logits)

    def backward(self, grad=None):
        """d loss (grad None), or grad = d logits"""
        logits, loss = self._need_last()
        dlogits = logits_grad(grad, logits, loss)  # loss = CE(logits, labels)
        # logits = t We^T + b
        dt = self.vocab_projector.backward(dlogits)
        # t = LN(act(h Wt + bt))
        dh = self.vocab_transform.backward(self.activation.backward(self.vocab_layer_norm.backward(dt)))
        self.distilbert.encode_backward(dh)


@register
class DistilBertForSequenceClassification(DistilBertTask):
    """logits = Dropout(relu(h_L[:, 0] Wp + bp)) Wc + bc (position 0, for a left-padded row a pad, as
    transformers). Loss by problem_type: regression -> MSE, single-label -> CE, multi-label -> BCE."""

    def build(self):
        self.num_labels = self.config.num_labels
        self._backbone()
        C = self.config.dim
        self.pre_classifier = Linear(C, C)
        self.relu = Activation("relu")
        self.dropout = Dropout(self.config.seq_classif_dropout)
        self.classifier = Linear(C, self.num_labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, output_hidden_states=False,
                output_attentions=False, inputs_embeds=None, past_key_values=None):
        x = distilbert_inputs(self.distilbert, input_ids, attention_mask, inputs_embeds, past_key_values)
        labels = None if labels is None else classification_labels(self.config, labels, x.B,
                                                                    self.classifier.params["weight"].dtype)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs = self.distilbert.encode(x)
        # logits = Dropout(relu(h_L[:, 0] Wp + bp)) Wc + bc
        logits = self.classifier(self.dropout(self.relu(self.pre_classifier(hs[-1][:, 0]))))  # (B, K)
        loss = loss_cache = None
        if labels is not None:
            y, loss_forward, loss_backward = labels  # loss = MSE, CE or BCE with logits (classification_labels)
            loss, cache = loss_forward(logits, y)
            loss_cache = (loss_backward, cache)
        self._last = (logits, loss_cache, hs[-1].shape)
        return self._output(hs, output_hidden_states, output_attentions, loss=loss, logits=logits)

    def backward(self, grad=None):
        """d loss (grad None), or grad = d logits"""
        logits, loss, shape = self._need_last()
        dlogits = logits_grad(grad, logits, loss)  # loss = CE(logits, labels), or by problem_type
        # logits = Dropout(relu(h_L[:, 0] Wp + bp)) Wc + bc
        dh = np.zeros(shape, dtype=logits.dtype)
        dh[:, 0] = self.pre_classifier.backward(self.relu.backward(self.dropout.backward(
            self.classifier.backward(dlogits))))
        self.distilbert.encode_backward(dh)


@register
class DistilBertForTokenClassification(DistilBertTask):
    """logits = Dropout(h) Wc + bc per token; loss = CE(logits, labels), ignore_index -100."""

    def build(self):
        self.num_labels = self.config.num_labels
        self._backbone()
        self.dropout = Dropout(self.config.dropout)
        self.classifier = Linear(self.config.dim, self.num_labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, output_hidden_states=False,
                output_attentions=False, inputs_embeds=None, past_key_values=None):
        x = distilbert_inputs(self.distilbert, input_ids, attention_mask, inputs_embeds, past_key_values)
        labels = None if labels is None else labels_like("labels", labels, x.shape, self.num_labels)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs = self.distilbert.encode(x)
        logits = self.classifier(self.dropout(hs[-1]))  # (B, T, K)
        loss, loss_cache = token_loss_forward(logits, labels)  # loss = CE(logits, labels) over the labelled tokens
        self._last = (logits, loss_cache)
        return self._output(hs, output_hidden_states, output_attentions, loss=loss, logits=logits)

    def backward(self, grad=None):
        """d loss (grad None), or grad = d logits"""
        logits, loss = self._need_last()
        dlogits = logits_grad(grad, logits, loss)  # loss = CE(logits, labels)
        # logits = classifier(dropout(h))
        self.distilbert.encode_backward(self.dropout.backward(self.classifier.backward(dlogits)))


@register
class DistilBertForQuestionAnswering(DistilBertTask):
    """start_logits, end_logits = split(Dropout(h) Wqa + bqa); loss = (CE(start) + CE(end)) / 2 with
    positions clamped to [0, T] and T ignored. backward(grad): grad = (d start_logits, d end_logits)."""

    def build(self):
        self.num_labels = self.config.num_labels
        if self.num_labels != 2:
            raise ValueError(f"DistilBertForQuestionAnswering needs config num_labels == 2, got {self.num_labels}")
        self._backbone()
        self.dropout = Dropout(self.config.qa_dropout)
        self.qa_outputs = Linear(self.config.dim, 2)

    def forward(self, input_ids=None, attention_mask=None, start_positions=None, end_positions=None,
                output_hidden_states=False, output_attentions=False, inputs_embeds=None, past_key_values=None):
        x = distilbert_inputs(self.distilbert, input_ids, attention_mask, inputs_embeds, past_key_values)
        positions = span_positions(start_positions, end_positions, x.B)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs = self.distilbert.encode(x)
        logits = self.qa_outputs(self.dropout(hs[-1]))  # (B, T, 2)
        start, end = logits[..., 0].copy(), logits[..., 1].copy()  # (B, T) each
        loss, caches = span_loss_forward(start, end, positions)  # (CE(start) + CE(end)) / 2
        self._last = (start, end, caches)
        return self._output(hs, output_hidden_states, output_attentions, loss=loss, start_logits=start,
                            end_logits=end)

    def backward(self, grad=None):
        """d loss (grad None), or grad = (d start_logits, d end_logits)"""
        start, end, caches = self._need_last()
        ds, de = span_loss_backward(grad, start, end, caches)
        # start, end = split(qa_outputs(dropout(h)))
        dh = self.dropout.backward(self.qa_outputs.backward(np.stack([ds, de], axis=-1)))  # (B, T, 2) -> (B, T, C)
        self.distilbert.encode_backward(dh)


__all__ = ["DistilBertConfig", "DistilBertModel", "DistilBertForMaskedLM", "DistilBertForSequenceClassification",
           "DistilBertForTokenClassification", "DistilBertForQuestionAnswering"]
