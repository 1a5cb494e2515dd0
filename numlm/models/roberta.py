"""RoBERTa, one file top to bottom (modeling_roberta.py, eager attention): BERT's encoder under the prefix
`roberta.`, with RoBERTa's positions and heads. The layers are bert.py's (BertLayer, BertEncoder,
BertPooler), and so are the masked-LM, token-classification and QA forwards and backwards (BertTask's heads
reach the backbone by its prefix); this file holds only what differs: the positions, the lm_head, and the
sequence classifier with its forward and backward.

    pos = (cumsum(ids != pad) + T_past) * (ids != pad) + pad          positions count the real tokens
                                                                      from pad + 1; pads sit at pad
    h0 = Dropout(LN(word[ids] + token_type[0] + position[pos]))       word and position: row pad gets no
                                                                      gradient from the lookup
    h_L = BERT's L post-LN layers (bert.py: BertLayer)

    RobertaModel                       last_hidden_state, pooler_output = tanh(h_L[:, 0] Wp + bp)
    RobertaForMaskedLM                 loss = CE(LN(gelu(h Wd + bd)) We^T + b, labels), -100 ignored
    RobertaForSequenceClassification   logits = tanh(Dropout(h_L[:, 0]) Wd + bd) Wo + bo (through dropouts);
                                       loss by problem_type. No pooler: the head reads position 0 itself
    RobertaForTokenClassification      logits = Dropout(h) Wc per token; loss = CE, -100 ignored
    RobertaForQuestionAnswering        start, end = h Wqa; loss = (CE(start) + CE(end)) / 2

Inputs are checked once at each class's forward (pretrained.bert_inputs: a position table with a padding
row counts RoBERTa's positions); below it everything trusts them. The hooks are BERT's (bert.py's
docstring): inputs_embeds, past_key_values, the adapter slots, replaceable linears.
"""
import numpy as np

from ..nn import Module, Linear, Embedding, LayerNorm, Dropout, Activation
from .bert import (BertEmbeddings, BertEncoder, BertPooler, BertModel, BertTask, TiedDecoder, BertForMaskedLM,
                   BertForTokenClassification, BertForQuestionAnswering)
from .config import RobertaConfig
from .pretrained import register, bert_inputs, logits_grad, classification_labels

TIED = {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
        "lm_head.decoder.bias": "lm_head.bias"}


# ---------------------------------------------------------------------------------------- the encoder

class RobertaEmbeddings(BertEmbeddings):
    """h0 = Dropout(LN(word[ids] + token_type[tt] + position[pos])), the position table's row pad
    (every pad's position) a padding row too: looked up, never given a gradient by the lookup."""

    def __init__(self, config):
        super().__init__(config)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size,
                                             padding_idx=config.pad_token_id)


@register
class RobertaModel(BertModel):
    """BERT's backbone (forward, encode, backward in bert.py) with RoBERTa's embeddings: their position
    table's padding row makes bert_inputs count RoBERTa's positions.
    backward(grad): grad = d last_hidden_state, or a tuple (d last_hidden_state, d pooler_output)."""

    config_class = RobertaConfig
    base_model_prefix = "roberta"

    def build(self):
        self.embeddings = RobertaEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)
        self.pooler = BertPooler(self.config) if self.add_pooling_layer else None


# ---------------------------------------------------------------------------------------- the heads

class RobertaLMHead(TiedDecoder):
    """logits = t We^T + bias, t = LN(gelu(h Wd + bd)); gelu whatever hidden_act (modeling_roberta)."""

    def __init__(self, config, word_embeddings):
        super().__init__(config.vocab_size, word_embeddings)
        C = config.hidden_size
        self.dense = Linear(C, C)
        self.gelu = Activation("gelu")
        self.layer_norm = LayerNorm(C, eps=config.layer_norm_eps)

    def forward(self, h):  # (..., C) -> (..., V)
        # logits = t We^T + b,  t = LN(gelu(h Wd + bd))
        return TiedDecoder.forward(self, self.layer_norm(self.gelu(self.dense(h))))

    def backward(self, dlogits):  # (..., V) -> (..., C)
        # logits = t We^T + b
        dt = TiedDecoder.backward(self, dlogits)
        # t = LN(gelu(h Wd + bd))
        return self.dense.backward(self.gelu.backward(self.layer_norm.backward(dt)))


class RobertaClassificationHead(Module):
    """logits = Dropout(tanh(Dropout(x) Wd + bd)) Wo + bo on x = h_L[:, 0] (<s>; for a left-padded row
    a pad position, as transformers); RobertaForSequenceClassification runs it."""

    def __init__(self, config, num_labels, p):
        super().__init__()
        C = config.hidden_size
        self.dropout = Dropout(p)
        self.dense = Linear(C, C)
        self.tanh = Activation("tanh")
        # transformers applies its one `dropout` twice; here each use is a module of its own (each keeps
        # its own mask for the backward). Neither has parameters, so no checkpoint key changes.
        self.dropout_out = Dropout(p)
        self.out_proj = Linear(C, num_labels)


class RobertaTask(BertTask):
    """What every RoBERTa task model shares: the backbone `roberta` (no pooler), the tied MLM decoder's keys.
    BertTask's heads reach their backbone by this prefix, so the classes below reuse bert.py's."""

    config_class = RobertaConfig
    base_model_prefix = "roberta"
    tied_keys = TIED

    def _backbone(self, add_pooling_layer):
        self.roberta = RobertaModel(self.config, add_pooling_layer=add_pooling_layer, init=False)


@register
class RobertaForMaskedLM(RobertaTask, BertForMaskedLM):
    """BertForMaskedLM's forward and backward (bert.py) with RoBERTa's lm_head: loss = CE(logits, labels),
    ignore_index -100, one mean over the labelled tokens. No pooler."""

    def build(self):
        self._backbone(False)
        self.lm_head = RobertaLMHead(self.config, self._tied_word_embeddings())

    def _mlm_head(self):
        return self.lm_head


@register
class RobertaForSequenceClassification(RobertaTask):
    """logits = classifier(h_L[:, 0]) (dense, tanh, out_proj; no pooler). Loss by problem_type as
    transformers: regression -> MSE (num_labels == 1), single-label -> CE, multi-label -> BCE with logits."""

    def build(self):
        self.num_labels = self.config.num_labels
        self._backbone(False)
        self.classifier = RobertaClassificationHead(self.config, self.num_labels, self._classifier_dropout().p)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False, inputs_embeds=None, past_key_values=None):
        x = bert_inputs(self.roberta, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        past_key_values)
        c = self.classifier
        labels = None if labels is None else classification_labels(self.config, labels, x.B,
                                                                    c.out_proj.params["weight"].dtype)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs, pooled = self.roberta.encode(x)
        # logits = Dropout(tanh(Dropout(h_L[:, 0]) Wd + bd)) Wo + bo
        logits = c.out_proj(c.dropout_out(c.tanh(c.dense(c.dropout(hs[-1][:, 0])))))  # (B, K)
        loss = loss_cache = None
        if labels is not None:
            y, loss_forward, loss_backward = labels  # loss = MSE, CE or BCE with logits (classification_labels)
            loss, cache = loss_forward(logits, y)
            loss_cache = (loss_backward, cache)
        self._last = (logits, loss_cache, hs[-1].shape)
        return self._output(hs, pooled, output_hidden_states, output_attentions, loss=loss, logits=logits)

    def backward(self, grad=None):
        """d loss (grad None), or grad = d logits"""
        logits, loss, shape = self._need_last()
        dlogits = logits_grad(grad, logits, loss)  # loss = CE(logits, labels), or by problem_type
        c = self.classifier
        # logits = Dropout(tanh(Dropout(h_L[:, 0]) Wd + bd)) Wo + bo
        dh = np.zeros(shape, dtype=logits.dtype)
        dh[:, 0] = c.dropout.backward(c.dense.backward(c.tanh.backward(c.dropout_out.backward(c.out_proj.backward(dlogits)))))
        self.roberta.encode_backward(dh)


@register
class RobertaForTokenClassification(RobertaTask, BertForTokenClassification):
    """BertForTokenClassification (bert.py): logits = Dropout(h) Wc + bc per token; loss = CE(logits, labels),
    ignore_index -100. No pooler."""


@register
class RobertaForQuestionAnswering(RobertaTask, BertForQuestionAnswering):
    """BertForQuestionAnswering (bert.py): start_logits, end_logits = split(h Wqa + bqa); loss = (CE(start) +
    CE(end)) / 2 with positions clamped to [0, T] and T ignored, as transformers. No pooler.
    backward(grad): grad = (d start_logits, d end_logits)."""


__all__ = ["RobertaConfig", "RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification",
           "RobertaForTokenClassification", "RobertaForQuestionAnswering"]
