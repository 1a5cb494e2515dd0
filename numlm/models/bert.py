"""BERT as transformers presents it: class and argument names, input checks, outputs, heads and losses.
The math is in bert_core (backbone) and heads.

    BertModel                          last_hidden_state, pooler_output = encoder(input_ids)
    BertForPreTraining                 loss = CE(MLM logits, labels) + CE(NSP logits, next_sentence_label)
    BertForMaskedLM                    loss = CE(LN(gelu(h Wt)) We^T + b, labels), -100 ignored
    BertForNextSentencePrediction      loss = CE(pooled Wn, labels): 0 = B continues A, 1 = random B
    BertForSequenceClassification      logits = Dropout(pooled) Wc; loss by problem_type
    BertForTokenClassification         logits = Dropout(h) Wc per token; loss = CE, -100 ignored
    BertForQuestionAnswering           start, end = h Wqa; loss = (CE(start) + CE(end)) / 2
"""
import numpy as np

from ..nn import Linear, Dropout
from .bert_core import BertCore
from .checks import bert_inputs, check_grad, labels_like
from .config import BertConfig
from .heads import (BertOnlyMLMHead, BertOnlyNSPHead, BertPreTrainingHeads, cross_entropy, problem_type_loss,
                    span_loss, check_span_positions)
from ..ops import IGNORE_INDEX
from .pretrained import ModelOutput, PreTrainedModel, head_output, register

TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias"}


@register
class BertModel(BertCore):
    """The backbone: embeddings, L post-LN encoder layers, optional tanh pooler on [CLS].
    backward(grad): grad = d last_hidden_state, or a tuple (d last_hidden_state, d pooler_output)."""

    config_class = BertConfig

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False, output_attentions=False, inputs_embeds=None, **unused):
        if unused:
            raise ValueError(f"BertModel takes no labels; got {sorted(unused)}")
        ids, embeds, mask, tt, pos = bert_inputs(self.config, self.embeddings.LayerNorm.params["weight"].dtype,
                                                 input_ids, attention_mask, token_type_ids, position_ids,
                                                 inputs_embeds)
        hs, pooled = self.encode(ids, tt, pos, mask, None, embeds)
        out = ModelOutput(last_hidden_state=hs[-1])
        if pooled is not None:
            out.pooler_output = pooled  # (B, C)
        if output_hidden_states:
            out.hidden_states = tuple(hs)
        if output_attentions:
            out.attentions = tuple(layer.attention.self.core.probs for layer in self.encoder.layer)
        self._last = out
        return out

    def backward(self, grad=None):
        last = self._need_last()
        if grad is None:
            raise ValueError("BertModel has no loss; pass the gradient of last_hidden_state to backward(grad)")
        dh, dpooled = grad if isinstance(grad, tuple) else (grad, None)
        self.backward_from(None if dh is None else check_grad("last_hidden_state", dh, last.last_hidden_state),
                           None if dpooled is None else check_grad("pooler_output", dpooled, last.pooler_output))

    def backward_from(self, dh=None, dpooled=None):
        """Backpropagate d last_hidden_state (B, T, C) and/or d pooler_output (B, C) to every parameter."""
        self._need_last()
        if dpooled is not None and self.pooler is None:
            raise ValueError("this BertModel has no pooler")
        self.encode_backward(dh, dpooled)


class _BertTask(PreTrainedModel):
    """A backbone `bert` and heads. Subclasses build them and compute their outputs and losses."""

    config_class = BertConfig
    base_model_prefix = "bert"
    ignore_on_load = BertCore.ignore_on_load
    outputs = ("logits",)
    loss_inputs = "labels"
    backbone_outputs = ("hidden_states", "attentions", "last_hidden_state", "pooler_output")

    def _build_backbone(self, add_pooling_layer):
        self.bert = BertModel(self.config, add_pooling_layer=add_pooling_layer, init=False)

    def _build_mlm(self):
        if not self.config.tie_word_embeddings:
            raise ValueError("config tie_word_embeddings=False (an untied MLM decoder) is not supported")
        self.tied = dict(TIED)
        return self.bert.embeddings.word_embeddings

    def _classifier_dropout(self):
        p = self.config.classifier_dropout
        return Dropout(self.config.hidden_dropout_prob if p is None else p)


@register
class BertForPreTraining(_BertTask):
    """loss = CE(prediction_logits, labels) + CE(seq_relationship_logits, next_sentence_label).
    backward(grad): d prediction_logits, or a tuple (d prediction_logits, d seq_relationship_logits).
    In training (model.train()) with labels, the MLM head runs only at the labelled positions, as the
    original BERT: prediction_logits is then (M, V), one row per label != -100 in row-major order, and
    out.mlm_positions holds their flat indices b*T + t. Set mlm_on_labelled_only = False for the
    (B, T, V) logits in training too; eval mode and fill-mask always get them."""

    mlm_on_labelled_only = True

    outputs = ("prediction_logits", "seq_relationship_logits")
    loss_inputs = "labels and next_sentence_label"

    def build(self):
        self._build_backbone(True)
        self.cls = BertPreTrainingHeads(self.config, self._build_mlm())

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, output_hidden_states=False, output_attentions=False, inputs_embeds=None):
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                         output_attentions, inputs_embeds)
        h, pooled = base.last_hidden_state, base.pooler_output
        B, T, _ = h.shape
        if labels is not None:
            labels = labels_like("labels", labels, (B, T), self.config.vocab_size)
        if next_sentence_label is not None:
            next_sentence_label = labels_like("next_sentence_label", next_sentence_label, (B,), 2)
        self._mlm_rows = None
        if self.training and labels is not None and self.mlm_on_labelled_only:
            # the original BERT's MLM: the head only where a label is (15% of positions); the others'
            # logits would only be ignored by the loss
            rows = np.flatnonzero(labels.reshape(-1) != IGNORE_INDEX)  # (M,) flat positions b*T + t
            self._mlm_rows = (rows, h.shape)
            logits = self.cls.predictions(h.reshape(B * T, -1)[rows])  # (M, V)
            labels = labels.reshape(-1)[rows]  # (M,)
        else:
            logits = self.cls.predictions(h)  # (B, T, V)
        seq = self.cls.seq_relationship(pooled)  # (B, 2)
        out, losses = ModelOutput(), []
        if self._mlm_rows is not None:
            out.mlm_positions = self._mlm_rows[0]
        if labels is not None and next_sentence_label is not None:
            mlm, c1 = cross_entropy(logits, labels)
            nsp, c2 = cross_entropy(seq, next_sentence_label)
            out.loss, out.mlm_loss, out.nsp_loss = mlm + nsp, mlm, nsp
            losses = [("prediction_logits", c1, 1.0), ("seq_relationship_logits", c2, 1.0)]
        out.prediction_logits, out.seq_relationship_logits = logits, seq
        return self._finish(out, losses, base)

    def heads_backward(self, d):
        dh = self.cls.predictions.backward(d["prediction_logits"]) if "prediction_logits" in d else None
        if dh is not None and self._mlm_rows is not None:  # h[rows] was the head's input: scatter back
            rows, shape = self._mlm_rows
            full = np.zeros((shape[0] * shape[1], shape[2]), dtype=dh.dtype)
            full[rows] = dh
            dh = full.reshape(shape)  # (B, T, C)
        dpooled = self.cls.seq_relationship.backward(d["seq_relationship_logits"]) \
            if "seq_relationship_logits" in d else None
        self.bert.backward_from(dh, dpooled)


@register
class BertForMaskedLM(_BertTask):
    """loss = CE(logits, labels), ignore_index -100, one mean over the labelled tokens. No pooler."""

    def build(self):
        self._build_backbone(False)
        self.cls = BertOnlyMLMHead(self.config, self._build_mlm())

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False, inputs_embeds=None):
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                         output_attentions, inputs_embeds)
        h = base.last_hidden_state
        if labels is not None:
            labels = labels_like("labels", labels, h.shape[:2], self.config.vocab_size)
        logits = self.cls.predictions(h)  # (B, T, V)
        return self._finish(*head_output(logits, labels, cross_entropy), base)

    def heads_backward(self, d):
        self.bert.backward_from(self.cls.predictions.backward(d["logits"]))


@register
class BertForNextSentencePrediction(_BertTask):
    """loss = CE(seq_relationship(pooled), labels); labels (B,) with 0 = B continues A, 1 = random B."""

    def build(self):
        self._build_backbone(True)
        self.cls = BertOnlyNSPHead(self.config)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, output_hidden_states=False, output_attentions=False, inputs_embeds=None):
        labels = next_sentence_label if labels is None else labels  # transformers' old keyword
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                         output_attentions, inputs_embeds)
        if labels is not None:
            labels = labels_like("labels", labels, (base.pooler_output.shape[0],), 2)
        logits = self.cls.seq_relationship(base.pooler_output)  # (B, 2)
        return self._finish(*head_output(logits, labels, cross_entropy), base)

    def heads_backward(self, d):
        self.bert.backward_from(None, self.cls.seq_relationship.backward(d["logits"]))


class _BertClassifier(_BertTask):
    """logits = Dropout(x) Wc + bc, x = the pooled [CLS] (per sequence) or h (per token)."""

    per_token = False

    def build(self):
        self.num_labels = self.config.num_labels
        self._build_backbone(not self.per_token)
        self.dropout = self._classifier_dropout()
        self.classifier = Linear(self.config.hidden_size, self.num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False, inputs_embeds=None):
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                         output_attentions, inputs_embeds)
        x = base.last_hidden_state if self.per_token else base.pooler_output
        if labels is not None and self.per_token:
            labels = labels_like("labels", labels, x.shape[:2], self.num_labels)
        logits = self.classifier(self.dropout(x))  # (B, K) or (B, T, K)
        loss = cross_entropy if self.per_token else (lambda z, y: problem_type_loss(self.config, z, y))
        return self._finish(*head_output(logits, labels, loss), base)

    def heads_backward(self, d):
        dx = self.dropout.backward(self.classifier.backward(d["logits"]))
        self.bert.backward_from(*((dx, None) if self.per_token else (None, dx)))


@register
class BertForSequenceClassification(_BertClassifier):
    """logits = Dropout(pooled) Wc + bc.  Loss by problem_type as transformers: regression -> MSE
    (num_labels == 1), single_label_classification -> CE, multi_label_classification -> BCE with logits."""


@register
class BertForTokenClassification(_BertClassifier):
    """logits = Dropout(h) Wc + bc per token; loss = CE(logits, labels), ignore_index -100. No pooler."""

    per_token = True


@register
class BertForQuestionAnswering(_BertTask):
    """start_logits, end_logits = split(h Wqa + bqa); loss = (CE(start) + CE(end)) / 2 with positions
    clamped to [0, T] and T ignored, as transformers. No pooler.
    backward(grad): grad = (d start_logits, d end_logits)."""

    outputs = ("start_logits", "end_logits")
    loss_inputs = "start_positions and end_positions"

    def build(self):
        self.num_labels = self.config.num_labels
        if self.num_labels != 2:
            raise ValueError(f"BertForQuestionAnswering needs config num_labels == 2, got {self.num_labels}")
        self._build_backbone(False)
        self.qa_outputs = Linear(self.config.hidden_size, 2)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None, output_hidden_states=False, output_attentions=False,
                inputs_embeds=None):
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                         output_attentions, inputs_embeds)
        h = base.last_hidden_state
        positions = check_span_positions(start_positions, end_positions, h.shape[0])
        logits = self.qa_outputs(h)  # (B, T, 2)
        start, end = logits[..., 0].copy(), logits[..., 1].copy()  # (B, T) each
        out, losses = ModelOutput(), []
        if positions is not None:
            out.loss, (cs, ce) = span_loss(start, end, *positions)
            losses = [("start_logits", cs, 0.5), ("end_logits", ce, 0.5)]
        out.start_logits, out.end_logits = start, end
        return self._finish(out, losses, base)

    def heads_backward(self, d):
        h = self.bert._last.last_hidden_state
        zero = np.zeros(h.shape[:2], dtype=h.dtype)
        dlogits = np.stack([d.get("start_logits", zero), d.get("end_logits", zero)], axis=-1)  # (B, T, 2)
        self.bert.backward_from(self.qa_outputs.backward(dlogits))


__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering"]
