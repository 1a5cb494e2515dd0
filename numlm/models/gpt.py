"""GPT-1 (transformers' OpenAI GPT) and GPT-2 as transformers presents them: class and argument names,
input checks, outputs, heads and losses. The math is in gpt_core (backbone) and heads.

    GPT2Model / OpenAIGPTModel            last_hidden_state = decoder(input_ids)
    *LMHeadModel                          logits = h We^T;  loss = causal-LM CE of labels (shifted inside)
    *DoubleHeadsModel                     + mc_logits = SequenceSummary(h at mc_token_ids);
                                          backward() differentiates lm_coef * loss + mc_loss (GPT-1's L3)
    GPT2ForSequenceClassification         logits = score(h at the last real token); loss by problem_type
"""
import math

import numpy as np

from ..nn import Linear
from .checks import as_ids, check_grad, gpt_inputs, labels_like, lm_labels
from .config import GPT2Config, OpenAIGPTConfig
from .gpt_core import GPT2Core, OpenAIGPTCore
from .heads import (TiedLMHead, SequenceSummary, causal_lm_loss, cross_entropy, problem_type_loss,
                    gather_forward, gather_backward, last_real_index)
from .pretrained import ModelOutput, PreTrainedModel, head_output, register

IGNORE_ON_LOAD = (r"(^|\.)attn\.bias$", r"(^|\.)attn\.masked_bias$")  # old causal-mask buffers


def gpt2_init_weights(model, rng):
    """transformers' GPT-2 init: normal(0, 0.02) everywhere, then the residual projections
    (attn.c_proj, mlp.c_proj weights) normal(0, 0.02 / sqrt(2 n_layer)) (GPT-2 paper, section 2.3)."""
    PreTrainedModel.init_weights(model, rng)
    std = model.config.initializer_range / math.sqrt(2 * model.config.n_layer)
    for name, m in model.modules():
        if name.endswith("c_proj"):
            m.params["weight"][...] = rng.normal(0.0, std, m.params["weight"].shape)


class _Backbone:
    """transformers' GPT2Model / OpenAIGPTModel interface on the decoder of gpt_core. input_ids may be
    (B, T) or (B, N, T) (multiple choice: run as (B*N, T), outputs reshaped back)."""

    ignore_on_load = IGNORE_ON_LOAD

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                past_key_values=None, use_cache=False, output_hidden_states=False, output_attentions=False,
                inputs_embeds=None, **unused):
        if unused:
            raise ValueError(f"{type(self).__name__} takes no {sorted(unused)}")
        shape, ids, embeds, mask, tt, pos = gpt_inputs(self.config, self.wpe.params["weight"].dtype, input_ids,
                                                       attention_mask, token_type_ids, position_ids,
                                                       past_key_values, inputs_embeds)
        hs = self.decode(ids, pos, mask, past_key_values, tt, embeds)
        out_shape = shape + (self.config.n_embd,)
        out = ModelOutput(last_hidden_state=hs[-1].reshape(out_shape))
        if use_cache:
            out.past_key_values = tuple(block.attn.core.present for block in self.h)
        if output_hidden_states:
            out.hidden_states = tuple(h.reshape(out_shape) for h in hs)
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
        self.decode_backward(dh.reshape(-1, dh.shape[-2], dh.shape[-1]))  # (B, T, C)


@register
class GPT2Model(_Backbone, GPT2Core):
    """GPT-2 decoder: wte, wpe, pre-LN blocks h.0..h.{L-1}, final ln_f.
    Returns last_hidden_state (B, T, C) [+ past_key_values, hidden_states, attentions]."""

    config_class = GPT2Config
    init_weights = gpt2_init_weights


@register
class OpenAIGPTModel(_Backbone, OpenAIGPTCore):
    """GPT-1 decoder: tokens_embed, positions_embed, post-LN blocks h.0..h.{L-1}, no final LayerNorm."""

    config_class = OpenAIGPTConfig


class _GPTTask(PreTrainedModel):
    """A backbone `transformer` and heads. Subclasses set config_class and backbone_class."""

    base_model_prefix = "transformer"
    ignore_on_load = IGNORE_ON_LOAD
    backbone_outputs = ("past_key_values", "hidden_states", "attentions")
    backbone_class = None

    def _build_backbone_and_lm_head(self):
        cfg = self.config
        self.transformer = self.backbone_class(cfg, init=False)
        if cfg.tie_word_embeddings:  # lm_head.weight is the token table itself
            self.lm_head = TiedLMHead(self.transformer.wte)
            table = "wte" if self.backbone_class is GPT2Model else "tokens_embed"
            self.tied = {"lm_head.weight": f"transformer.{table}.weight"}
        else:
            self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)



class _CausalLM(_GPTTask):
    """backbone + LM head (tied by default);  out.loss = causal-LM cross-entropy of labels (unshifted)."""

    outputs = ("logits",)
    loss_inputs = "labels"

    def build(self):
        self._build_backbone_and_lm_head()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                past_key_values=None, use_cache=False, output_hidden_states=False, output_attentions=False,
                logits_to_keep=0, inputs_embeds=None):
        """logits_to_keep (transformers' name): 0 computes logits at every position, k > 0 only at the
        last k (generation needs the last one; the LM head is the largest matmul of a decoding step)."""
        if not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep needs labels=None: the loss uses the logits of every position")
        t = self.transformer(input_ids, attention_mask, token_type_ids, position_ids, past_key_values, use_cache,
                             output_hidden_states, output_attentions, inputs_embeds)
        h = t.last_hidden_state
        if labels is not None:
            labels = lm_labels(labels, h.shape[:-1], self.config.vocab_size)
        logits = self.lm_head(h[..., -logits_to_keep:, :] if logits_to_keep else h)  # (B, T or k, V)
        return self._finish(*head_output(logits, labels, causal_lm_loss), t)

    def heads_backward(self, d):
        dh = self.lm_head.backward(d["logits"])
        full = self.transformer._last.last_hidden_state
        if dh.shape != full.shape:  # logits_to_keep: earlier positions get no gradient from the head
            dfull = np.zeros_like(full)
            dfull[..., -dh.shape[-2]:, :] = dh
            dh = dfull
        self.transformer.backward_from(dh)


class _DoubleHeads(_GPTTask):
    """backbone + LM head + multiple-choice head on (B, N, T) inputs.
    out.loss = LM loss, out.mc_loss = CE(mc_logits (B, N), mc_labels (B,)); backward() takes the
    gradient of lm_coef * loss + mc_loss (GPT-1's L3 = L2 + lambda L1)."""

    outputs = ("logits", "mc_logits")
    loss_inputs = "labels and/or mc_labels"

    def build(self):
        self.config.num_labels = 1  # as transformers: the summary projects to one score per choice
        self._build_backbone_and_lm_head()
        self.multiple_choice_head = SequenceSummary(self.config)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                mc_token_ids=None, mc_labels=None, past_key_values=None, use_cache=False,
                output_hidden_states=False, output_attentions=False, lm_coef=1.0, inputs_embeds=None):
        shape = as_ids("input_ids", input_ids).shape if inputs_embeds is None else np.shape(inputs_embeds)[:-1]
        if len(shape) != 3:
            raise ValueError(f"input_ids must have shape (B, num_choices, T), got {shape}")
        B, N, T = shape
        if mc_token_ids is not None:
            mc_token_ids = labels_like("mc_token_ids", mc_token_ids, (B, N), T, allow=None)
        if labels is not None:
            labels = lm_labels(labels, shape, self.config.vocab_size)
        if mc_labels is not None:
            mc_labels = labels_like("mc_labels", mc_labels, (B,), N)
        t = self.transformer(input_ids, attention_mask, token_type_ids, position_ids, past_key_values, use_cache,
                             output_hidden_states, output_attentions, inputs_embeds)
        h = t.last_hidden_state  # (B, N, T, C)
        logits = self.lm_head(h)  # (B, N, T, V)
        s = self.multiple_choice_head(h, mc_token_ids)  # (B, N, K)
        if mc_labels is not None and s.shape[-1] != 1:
            raise ValueError(f"mc_loss needs one score per choice; the summary head gives {s.shape}")
        mc_logits = s[..., 0] if s.shape[-1] == 1 else s  # squeeze(-1)
        out, losses = ModelOutput(), []
        if labels is not None:
            out.loss, ce = causal_lm_loss(logits, labels)
            losses.append(("logits", ce, float(lm_coef)))
        if mc_labels is not None:
            out.mc_loss, mc = cross_entropy(mc_logits, mc_labels)
            losses.append(("mc_logits", mc, 1.0))
        out.logits, out.mc_logits = logits, mc_logits
        self._lm_coef, self._summary_shape = float(lm_coef), s.shape
        return self._finish(out, losses, t)

    def objective(self, out):
        """lm_coef * loss + mc_loss (either part absent without its labels): what backward() differentiates."""
        self._need_last(backward=False)
        if out.loss is None and out.mc_loss is None:
            return None
        return (0.0 if out.loss is None else self._lm_coef * out.loss) + (0.0 if out.mc_loss is None else out.mc_loss)

    def backward(self, grad=None, mc_grad=None):
        """No arguments: d (lm_coef * loss + mc_loss). Else grad = d logits and/or mc_grad = d mc_logits."""
        super().backward(None if grad is None and mc_grad is None else (grad, mc_grad))

    def heads_backward(self, d):
        h = self.transformer._last.last_hidden_state
        dh = self.lm_head.backward(d["logits"]) if "logits" in d else np.zeros_like(h)
        if "mc_logits" in d:
            dh += self.multiple_choice_head.backward(d["mc_logits"].reshape(self._summary_shape))
        self.transformer.backward_from(dh)


@register
class GPT2LMHeadModel(_CausalLM):
    config_class = GPT2Config
    backbone_class = GPT2Model
    init_weights = gpt2_init_weights


@register
class OpenAIGPTLMHeadModel(_CausalLM):
    config_class = OpenAIGPTConfig
    backbone_class = OpenAIGPTModel


@register
class GPT2DoubleHeadsModel(_DoubleHeads):
    config_class = GPT2Config
    backbone_class = GPT2Model
    init_weights = gpt2_init_weights


@register
class OpenAIGPTDoubleHeadsModel(_DoubleHeads):
    config_class = OpenAIGPTConfig
    backbone_class = OpenAIGPTModel


@register
class GPT2ForSequenceClassification(_GPTTask):
    """logits = score(h[b, i_b]),  i_b = the rightmost position whose input id is not pad_token_id
    (transformers 5; T-1 when the config has no pad token, which then allows batch 1 only).
    score is an nn.Linear (C -> num_labels) without bias; out.loss by config.problem_type."""

    config_class = GPT2Config
    backbone_class = GPT2Model
    init_weights = gpt2_init_weights
    outputs = ("logits",)
    loss_inputs = "labels"

    def build(self):
        self.transformer = GPT2Model(self.config, init=False)
        self.score = Linear(self.config.n_embd, self.config.num_labels, bias=False)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                past_key_values=None, use_cache=False, output_hidden_states=False, output_attentions=False):
        ids = as_ids("input_ids", input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {ids.shape}")
        t = self.transformer(ids, attention_mask, token_type_ids, position_ids, past_key_values, use_cache,
                             output_hidden_states, output_attentions)
        pooled, self.cache = gather_forward(t.last_hidden_state, last_real_index(ids, self.config.pad_token_id))
        logits = self.score(pooled)  # (B, num_labels); the pooled rows only
        loss = lambda z, y: problem_type_loss(self.config, z, y)  # noqa: E731
        return self._finish(*head_output(logits, labels, loss), t)

    def heads_backward(self, d):
        self.transformer.backward_from(gather_backward(self.score.backward(d["logits"]), self.cache))
