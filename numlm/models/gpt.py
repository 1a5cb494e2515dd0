"""GPT-1 and GPT-2, one file top to bottom: the decoder, the heads, the losses, and the backward of
each in reverse, every step quoting the forward line it differentiates (llm.c's gpt2_forward /
gpt2_backward). Inputs are checked once, at each class's forward; below it everything trusts them.

    h0 = U We + Wp                                  token rows (or inputs_embeds) + positions, dropout
    GPT-2 block (pre-LN):   a = x + attn(ln_1(x));  y = a + mlp(ln_2(a))
    GPT-1 block (post-LN):  n = ln_1(x + attn(x));  y = ln_2(n + mlp(n))
    attn(u) = dropout(c_proj(Attn(q, k, v))),  [q | k | v] = c_attn(u),  Attn = dropout(softmax(q k^T s + M)) v
    mlp(u)  = dropout(c_proj(act(c_fc(u))))
    GPT-2 only: h = ln_f(h_L)
    GPT2LMHeadModel / OpenAIGPTLMHeadModel   logits = h We^T;  loss = CE(logits[t], labels[t+1])  (L1)
    *DoubleHeadsModel                        + mc_logits = SequenceSummary(h at mc_token_ids);  mc_loss = CE  (L2)
                                             backward() differentiates L3 = L2 + lm_coef * L1 (GPT-1, eq. 5)
    GPT2ForSequenceClassification            logits = score(h at the last real token); loss by problem_type
                                             (+ lm_coef * L1 with lm_labels: GPT-1's L3 for classification)

Attribute names are transformers', so a parameter's dotted name is its state_dict key. Linears are
Conv1D: weight (C_in, C_out). Shapes: B batch, T time, C channels, V vocabulary; GPT-1's (B, N, T)
multiple-choice inputs run flattened to (B*N, T).

Hooks for parameter-efficient fine-tuning (numlm.peft), each None unless set:
  - inputs_embeds replaces U We (prompt tuning); its gradient is left in `transformer.inputs_embeds_grad`.
  - past: per layer (k, v) (B, H, T_past, D) before the new keys (prefix tuning, KV cache); their
    gradients are left in `transformer.past_grads`.
  - block.attention_adapters / block.output_adapters: a module with forward(h, x, ln) -> y and
    backward(dy) -> (dh, dx) that replaces the residual step after attn / mlp (h: the sub-layer
    output after projection and dropout, x: its residual input, ln: the LayerNorm that follows in
    GPT-1, None in GPT-2).
  - any Linear (c_attn, c_proj, c_fc) may be replaced by a module with the same forward/backward.
"""
import math
import warnings

import numpy as np

from .. import kernels
from ..kernels.decode import gpt2_block_step
from ..kernels.matmul import mm_pair, streamed, gemv_loop, cols_gemv  # mm_pair: (a @ b, c @ d), a core each
from ..nn import Module, ModuleList, Linear, Embedding, LayerNorm, Dropout, Activation, Attention
from ..nn import lowest_needing_backward, grad_enabled, attention_keeps, OPS
from ..ops import (embedding_forward, embedding_backward, cross_entropy_forward, linear_forward, layernorm_forward,
                   gelu_tanh_forward, attention_forward, cross_entropy_backward, attention_allowed, IGNORE_INDEX)
from ..ops.activations import gelu_tanh_constants
from ..ops.attention import mask_codes
from .config import GPT2Config, OpenAIGPTConfig
from .pretrained import (ModelOutput, PreTrainedModel, register, gpt_inputs, labels_like, lm_labels, no_loss,
                         output_grads, logits_grad, classification_labels)

IGNORE_ON_LOAD = (r"(^|\.)attn\.bias$", r"(^|\.)attn\.masked_bias$")  # old causal-mask buffers


# ---------------------------------------------------------------------------------------- the decoder

class CausalSelfAttention(Module):
    """The parameters of attn(u) = dropout(c_proj(Attn(q, k, v))), [q | k | v] = c_attn(u); the block runs it."""

    def __init__(self, config, scale, causal_fill=None):
        super().__init__()
        C = config.n_embd
        self.c_attn = Linear(C, 3 * C, torch_layout=False)
        self.c_proj = Linear(C, C, torch_layout=False)
        self.core = Attention(config.n_head, config.attn_pdrop, causal=True, causal_fill=causal_fill, scale=scale)
        self.resid_dropout = Dropout(config.resid_pdrop)


class MLP(Module):
    """The parameters of mlp(u) = dropout(c_proj(act(c_fc(u)))), inner width I; the block runs it."""

    def __init__(self, config):
        super().__init__()
        C, inner = config.n_embd, config.inner_size
        self.c_fc = Linear(C, inner, torch_layout=False)
        self.act = Activation(config.activation_function)
        self.c_proj = Linear(inner, C, torch_layout=False)
        self.dropout = Dropout(config.resid_pdrop)


def attn_scale(config, layer_idx):
    """1/sqrt(D) (or 1 without scale_attn_weights), divided by layer_idx + 1 with scale_attn_by_inverse_layer_idx"""
    scale = 1.0 / math.sqrt(config.n_embd // config.n_head) if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= layer_idx + 1
    return scale


class GPTBlock(Module):
    """GPT-2 (pre_ln):   a = x + attn(ln_1(x));   y = a + mlp(ln_2(a))
    GPT-1 (post-LN):     n = ln_1(x + attn(x));   y = ln_2(n + mlp(n))      x: (B, T, C) -> (B, T, C)"""

    pre_ln = True
    attention_adapters = output_adapters = None

    def forward(self, x, mask=None, past=None):
        if past is not None and self.steps(x, past):  # a decoding step: the loops below in one compiled call
            return self.step(x, mask, past)
        attn, mlp, C = self.attn, self.mlp, x.shape[-1]
        ln_a, ln_m = (None, None) if self.pre_ln else (self.ln_1, self.ln_2)  # the LayerNorm after each residual
        # h = attn(u),  u = ln_1(x) (GPT-2) or x (GPT-1)
        qkv = attn.c_attn(self.ln_1(x) if self.pre_ln else x)  # (B, T, 3C)
        h = attn.resid_dropout(attn.c_proj(attn.core(qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:], mask, past)))
        # a = x + h (GPT-2), ln_1(x + h) (GPT-1); an adapter slot replaces the step
        slot = self.attention_adapters
        a = slot(h, x, ln_a) if slot is not None else x + h if ln_a is None else ln_a(x + h)
        # m = mlp(ln_2(a)) (GPT-2) or mlp(a) (GPT-1)
        m = mlp.dropout(mlp.c_proj(mlp.act(mlp.c_fc(self.ln_2(a) if self.pre_ln else a))))  # (B, T, I) inside
        # y = a + m (GPT-2), ln_2(a + m) (GPT-1)
        slot = self.output_adapters
        return slot(m, a, ln_m) if slot is not None else a + m if ln_m is None else ln_m(a + m)

    def backward(self, dy):
        attn, mlp = self.attn, self.mlp
        ln_a, ln_m = (None, None) if self.pre_ln else (self.ln_1, self.ln_2)
        # y = a + m, or ln_2(a + m)
        slot = self.output_adapters
        dm, da = slot.backward(dy) if slot is not None else (dy, dy) if ln_m is None else (ln_m.backward(dy),) * 2
        # m = dropout(c_proj(act(c_fc(ln_2(a) or a))))
        du = mlp.c_fc.backward(mlp.act.backward(mlp.c_proj.backward(mlp.dropout.backward(dm))))
        da = da + (self.ln_2.backward(du) if self.pre_ln else du)
        # a = x + h, or ln_1(x + h)
        slot = self.attention_adapters
        dh, dx = slot.backward(da) if slot is not None else (da, da) if ln_a is None else (ln_a.backward(da),) * 2
        # h = resid_dropout(c_proj(core(q, k, v)))
        dqkv = attn.core.backward(attn.c_proj.backward(attn.resid_dropout.backward(dh)), joined=True)  # (B, T, 3C)
        # [q | k | v] = c_attn(ln_1(x) or x)
        du = attn.c_attn.backward(dqkv)  # (B, T, C)
        return dx + (self.ln_1.backward(du) if self.pre_ln else du)

    def steps(self, x, past):
        """whether forward(x, mask, past) is a decoding step that step() runs with forward's numbers: GPT-2's
        block under no_grad, keeping only its cache; one new token a row; past this layer's own cache with
        room after it (Attention.after_past); the modules numlm's own, in eval, running numlm's ops; their
        parameters of the shapes and dtype the ops check, each product one matmul runs on cols_gemv"""
        attn, mlp, core = self.attn, self.mlp, self.attn.core
        if not (kernels.enabled and self.pre_ln and not grad_enabled() and attention_keeps[0] == ("present",)
                and self.attention_adapters is None and self.output_adapters is None
                and x.ndim == 3 and x.shape[1] == 1 and x.flags.c_contiguous):
            return False
        # past: the layer's own cache, with room after it in buffers of x's rows and dtype
        present, room = core.present, core.room
        if not (present is not None and room is not None and past[0] is present[0] and past[1] is present[1]
                and past[0].base is room[0] and past[1].base is room[1] and room[0].shape[2] > past[0].shape[2]
                and room[0].shape[0] == x.shape[0] and room[0].dtype == room[1].dtype == x.dtype):
            return False
        # the modules forward() calls: numlm's own classes, in eval, their ops numlm's
        kinds = ((self.ln_1, LayerNorm), (self.ln_2, LayerNorm), (core, Attention), (mlp.act, Activation),
                 (attn.resid_dropout, Dropout), (mlp.dropout, Dropout), (attn.c_attn, Linear),
                 (attn.c_proj, Linear), (mlp.c_fc, Linear), (mlp.c_proj, Linear))
        if not all(type(m) is kind and not m.training for m, kind in kinds):
            return False
        ops = (OPS["linear"][0], OPS["layernorm"][0], OPS.get(mlp.act.name, (None,))[0], OPS["attention"][0])
        if ops != (linear_forward, layernorm_forward, gelu_tanh_forward, attention_forward):
            return False
        # the parameters: what the ops would check, and every product on cols_gemv (matmul.gemv_loop)
        B, C, I, eps = x.shape[0], x.shape[2], mlp.c_fc.params["weight"].shape[-1], self.ln_1.eps
        products = ((attn.c_attn, C, 3 * C), (attn.c_proj, C, C), (mlp.c_fc, C, I), (mlp.c_proj, I, C))
        return (type(eps) is float and 0 < eps < math.inf and self.ln_2.eps == eps and type(core.scale) is float
                and all(p.shape == (C,) and p.dtype == x.dtype for ln in (self.ln_1, self.ln_2)
                        for p in ln.params.values())
                and all(_on_cols_gemv(m, B, K, N, x.dtype) for m, K, N in products))

    def step(self, x, mask, past):
        """forward() for a decoding step (steps()): kernels.decode.gpt2_block_step, the new key and value
        written into the cache's buffers, present extended over them.   x: (B, 1, C) -> (B, 1, C)"""
        attn, mlp, core = self.attn, self.mlp, self.attn.core
        B, _, C = x.shape
        t, dt = past[0].shape[2], x.dtype.type
        codes = mask_codes(attention_allowed(mask, B, 1, t + 1, True, core.causal_fill, core.n_head), 1, t + 1)
        modules = (self.ln_1, attn.c_attn, attn.c_proj, self.ln_2, mlp.c_fc, mlp.c_proj)
        args = (x.reshape(B, C), *(_weight_bias(m) for m in modules), core.room[0], core.room[1], t, core.n_head,
                self.ln_1.eps, dt(core.scale), codes, dt(np.finfo(dt).min), gelu_tanh_constants(dt))
        weights = sum(m.params["weight"].nbytes for m in modules[1:3] + modules[4:])
        y = streamed(gpt2_block_step, args, weights, B * weights // x.itemsize)
        core.present = (core.room[0][:, :, :t + 1], core.room[1][:, :, :t + 1])
        core.probs = None
        return y.reshape(B, 1, C)


def _weight_bias(m):
    return m.params["weight"], m.params["bias"]


def _on_cols_gemv(linear, M, K, N, dtype):
    """whether a Linear's weight is (K, N) with an (N,) bias of dtype, and matmul runs M rows times it on
    cols_gemv (the loop gpt2_block_step calls)"""
    w, b = linear.params["weight"], linear.params.get("bias")
    return (w.shape == (K, N) and b is not None and b.shape == (N,) and b.dtype == dtype
            and gemv_loop(M, w, dtype) is cols_gemv)


class GPT2Block(GPTBlock):
    """pre-LN:  a = x + attn(ln_1(x));  y = a + mlp(ln_2(a))"""

    def __init__(self, config, layer_idx):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps)
        self.attn = CausalSelfAttention(config, attn_scale(config, layer_idx))
        self.ln_2 = LayerNorm(config.n_embd, eps)
        self.mlp = MLP(config)


class OpenAIGPTBlock(GPTBlock):
    """post-LN:  n = ln_1(x + attn(x));  y = ln_2(n + mlp(n)).  Future scores are replaced by -1e4."""

    pre_ln = False

    def __init__(self, config):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.attn = CausalSelfAttention(config, attn_scale(config, 0), causal_fill=-1e4)
        self.ln_1 = LayerNorm(config.n_embd, eps)
        self.mlp = MLP(config)
        self.ln_2 = LayerNorm(config.n_embd, eps)


def gpt2_init_weights(model, rng):
    """transformers' GPT-2 init: normal(0, 0.02) everywhere, then the residual projections
    (attn.c_proj, mlp.c_proj weights) normal(0, 0.02 / sqrt(2 n_layer)) (GPT-2 paper, section 2.3)."""
    PreTrainedModel.init_weights(model, rng)
    std = model.config.initializer_range / math.sqrt(2 * model.config.n_layer)
    for name, m in model.modules():
        if name.endswith("c_proj"):
            m.params["weight"][...] = rng.normal(0.0, std, m.params["weight"].shape)


@register
class GPT2Model(PreTrainedModel):
    """The GPT-2 decoder: wte, wpe, pre-LN blocks h.0 .. h.{L-1}, final ln_f.
    forward: last_hidden_state (B, T, C) [+ past_key_values, hidden_states, attentions];
    backward(grad): grad = d last_hidden_state."""

    config_class = GPT2Config
    base_model_prefix = "transformer"
    init_weights = gpt2_init_weights
    ignore_on_load = IGNORE_ON_LOAD
    gpt2 = True
    ln_f = None
    inputs_embeds_grad = past_grads = None

    def build(self):
        cfg = self.config
        We, Wp = Embedding(cfg.vocab_size, cfg.n_embd), Embedding(cfg.n_positions, cfg.n_embd)
        if self.gpt2:
            self.wte, self.wpe = We, Wp
        else:
            self.tokens_embed, self.positions_embed = We, Wp
        self.drop = Dropout(cfg.embd_pdrop)
        self.h = ModuleList(GPT2Block(cfg, i) if self.gpt2 else OpenAIGPTBlock(cfg) for i in range(cfg.n_layer))
        if self.gpt2:
            self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)

    def decode(self, x):
        """x: the checked inputs (pretrained.gpt_inputs) -> hidden states h0 .. hL, each (B, T, C); the
        last is ln_f's output for GPT-2"""
        ids, embeds, past = x.ids, x.embeds, x.past
        codes = attention_allowed(x.mask, x.B, x.T, x.past_len + x.T, True, None if self.gpt2 else -1e4)
        # h0 = U We + Wp  (+ We[token types], transformers' GPT token types)
        h = self.wte(ids) if embeds is None else embeds  # (B, T, C)
        h = h + self.wpe(x.pos)
        tt_cache = None
        if x.token_types is not None:
            e, tt_cache = embedding_forward(x.token_types, self.wte.params["weight"])
            h = h + e
        self.cache = (embeds is not None, tt_cache, past)
        h = self.drop(h)
        hs = [h]
        # h_l = block_l(h_{l-1})
        for i, block in enumerate(self.h.items):
            h = block(h, codes, None if past is None else past[i])
            hs.append(h)
        # h = ln_f(h_L)
        if self.ln_f is not None:
            hs[-1] = self.ln_f(h)
        return hs

    def decode_backward(self, dh):
        """dh: d (last hidden state) (B, T, C) -> every parameter's gradient (+ inputs_embeds_grad, past_grads)"""
        embeds, tt_cache, past = self.cache
        # h = ln_f(h_L)
        if self.ln_f is not None:
            dh = self.ln_f.backward(dh)
        # h_l = block_l(h_{l-1}), down to the lowest block that has a gradient to compute
        blocks = self.h.items
        lo = lowest_needing_backward([self.wte, self.wpe], embeds, blocks, past)
        for block in reversed(blocks[lo:]):
            dh = block.backward(dh)
        self.past_grads = None if past is None else tuple(b.attn.core.dpast if i >= lo else None
                                                          for i, b in enumerate(blocks))
        self.inputs_embeds_grad = None
        if lo > 0:
            return
        # h0 = drop(x)
        dx = self.drop.backward(dh)
        # x = U We + Wp (+ We[token types]);  U We = wte(ids), or inputs_embeds
        self.inputs_embeds_grad = dx if embeds else None
        if not embeds:
            self.wte.backward(dx)
        self.wpe.backward(dx)
        if tt_cache is not None and self.wte.requires_grad("weight"):
            self.wte.add_grad("weight", embedding_backward(dx, tt_cache))

    def extras(self, hs, shape, use_cache, output_hidden_states, output_attentions):
        """transformers' optional outputs: past_key_values, hidden_states, attentions (each only if asked)."""
        out = {}
        if use_cache:
            out["past_key_values"] = tuple(block.attn.core.present for block in self.h.items)
        if output_hidden_states:
            out["hidden_states"] = tuple(h.reshape(shape + h.shape[-1:]) for h in hs)
        if output_attentions:
            out["attentions"] = tuple(block.attn.core.probs for block in self.h.items)  # (B, H, T, T_past + T)
        return out

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                past_key_values=None, use_cache=False, output_hidden_states=False, output_attentions=False,
                inputs_embeds=None):
        x = gpt_inputs(self, input_ids, attention_mask, token_type_ids, position_ids, past_key_values, inputs_embeds)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs = self.decode(x)
        h = hs[-1].reshape(x.shape + hs[-1].shape[-1:])
        self._last = (h,)
        out = ModelOutput(last_hidden_state=h)
        if use_cache or output_hidden_states or output_attentions:
            out.update(self.extras(hs, x.shape, use_cache, output_hidden_states, output_attentions))
        return out

    def backward(self, grad=None):
        """grad = d last_hidden_state, same shape; accumulates every parameter's gradient."""
        (h,) = self._need_last()
        if grad is None:
            raise ValueError(f"{type(self).__name__} has no loss; pass d last_hidden_state to backward(grad)")
        dh = output_grads(grad, ("last_hidden_state",), (h,))[0]
        self.decode_backward(dh.reshape(-1, dh.shape[-2], dh.shape[-1]))  # (B, T, C)


@register
class OpenAIGPTModel(GPT2Model):
    """The GPT-1 decoder: tokens_embed, positions_embed, post-LN blocks h.0 .. h.{L-1}, no final LayerNorm."""

    config_class = OpenAIGPTConfig
    init_weights = PreTrainedModel.init_weights
    gpt2 = False
    wte = property(lambda self: self.tokens_embed)
    wpe = property(lambda self: self.positions_embed)


# ---------------------------------------------------------------------------------------- the heads

class TiedLMHead(Module):
    """logits = h We^T: GPT's lm_head, its weight the token table itself (no parameter of its own;
    the key lm_head.weight is an alias of the table's)."""

    def __init__(self, table):
        super().__init__()
        self._table = (table,)  # a tuple, so the table is not discovered as a child a second time

    def forward(self, h):  # (..., C) -> (..., V)
        logits, self.cache = OPS["linear"][0](h, self._table[0].params["weight"].T)
        return logits

    def backward(self, dlogits):
        # logits = h We^T
        table = self._table[0]
        if "weight" not in table.grads:  # frozen
            return OPS["linear"][1](dlogits, self.cache, need_dw=False)[0]  # dh = dlogits We
        # dh = dlogits We, dWe = dlogits^T h (added to the lookup's gradient: the total), one core each
        h, d2 = self.cache[0], dlogits.reshape(-1, dlogits.shape[-1])
        dh, dwe = mm_pair(d2, table.params["weight"], d2.T, h.reshape(-1, h.shape[-1]))
        table.add_grad("weight", dwe)
        return dh.reshape(h.shape)


def lm_loss_forward(logits, labels):
    """L1 = mean over (b, t) with labels[b, t+1] != -100 of CE(logits[b, t], labels[b, t+1])
    transformers' shift, written as targets aligned with logits (the last position is ignored), so no
    (B, T-1, V) copy of the logits is made.    logits (..., T, V), labels (..., T) -> (), cache"""
    targets = np.full(labels.shape, IGNORE_INDEX, dtype=np.int64)
    targets[..., :-1] = labels[..., 1:]
    V = logits.shape[-1]
    return cross_entropy_forward(logits.reshape(-1, V), targets.reshape(-1))


def _tied_lm_head(model):
    """lm_head (tied to the token table unless the config unties it) and the tied-keys map."""
    cfg = model.config
    if not cfg.tie_word_embeddings:
        return Linear(cfg.n_embd, cfg.vocab_size, bias=False), {}
    table = "wte" if model.transformer.gpt2 else "tokens_embed"
    return TiedLMHead(model.transformer.wte), {"lm_head.weight": f"transformer.{table}.weight"}


@register
class GPT2LMHeadModel(PreTrainedModel):
    """logits = h We^T (tied by default);  loss = causal-LM cross-entropy of labels (unshifted: shifted inside).
    backward(): d loss;  backward(grad): grad = d logits."""

    can_generate = True
    config_class = GPT2Config
    backbone = GPT2Model
    base_model_prefix = "transformer"
    init_weights = gpt2_init_weights
    ignore_on_load = IGNORE_ON_LOAD

    def build(self):
        self.transformer = self.backbone(self.config, init=False)
        self.lm_head, self.tied = _tied_lm_head(self)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                past_key_values=None, use_cache=False, output_hidden_states=False, output_attentions=False,
                logits_to_keep=0, inputs_embeds=None):
        """logits_to_keep (transformers' name): 0 computes logits at every position, k > 0 only at the
        last k (generation needs the last one; the LM head is the largest matmul of a decoding step)."""
        x = gpt_inputs(self.transformer, input_ids, attention_mask, token_type_ids, position_ids, past_key_values,
                       inputs_embeds, labels=labels, logits_to_keep=logits_to_keep)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs = self.transformer.decode(x)
        h = hs[-1].reshape(x.shape + hs[-1].shape[-1:])  # (B, T, C) or (B, N, T, C)
        logits = self.lm_head(h[..., -logits_to_keep:, :] if logits_to_keep else h)  # (B, T or k, V)
        # loss = L1(logits, labels)
        loss, ce = lm_loss_forward(logits, x.labels) if x.labels is not None else (None, None)
        self._last = (h, logits, None if ce is None else (cross_entropy_backward, ce))
        out = ModelOutput(logits=logits) if loss is None else ModelOutput(loss=loss, logits=logits)
        if use_cache or output_hidden_states or output_attentions:
            out.update(self.transformer.extras(hs, x.shape, use_cache, output_hidden_states, output_attentions))
        return out

    def backward(self, grad=None):
        """d loss (grad None), or grad = d logits"""
        h, logits, loss = self._need_last()
        dlogits = logits_grad(grad, logits, loss)  # loss = L1(logits, labels)
        # logits = lm_head(h)
        dh = self.lm_head.backward(dlogits)
        if dh.shape != h.shape:  # logits_to_keep: earlier positions get no gradient from the head
            dh = np.concatenate([np.zeros(h.shape[:-2] + (h.shape[-2] - dh.shape[-2], h.shape[-1]), dh.dtype), dh], -2)
        # h = decoder(x)
        self.transformer.decode_backward(dh.reshape(-1, dh.shape[-2], dh.shape[-1]))


@register
class OpenAIGPTLMHeadModel(GPT2LMHeadModel):
    config_class = OpenAIGPTConfig
    backbone = OpenAIGPTModel
    init_weights = PreTrainedModel.init_weights


class SequenceSummary(Module):
    """transformers' SequenceSummary (multiple-choice head): pick one hidden state per sequence
    (cls_index: at mc_token_ids; last; first; or the mean), dropout, Linear `summary`, activation.
    h: (B, N, T, C), idx: (B, N) -> (B, N, K) with K = num_labels (1) or C."""

    def __init__(self, config):
        super().__init__()
        self.summary_type = config.summary_type
        C = config.n_embd
        self.summary, self.width = None, C  # width: the scores per choice
        if config.summary_use_proj:
            self.width = config.num_labels if config.summary_proj_to_labels and config.num_labels > 0 else C
            self.summary = Linear(C, self.width)
        self.activation = Activation(config.summary_activation) if config.summary_activation else None
        self.first_dropout = Dropout(config.summary_first_dropout)
        self.last_dropout = Dropout(config.extra.get("summary_last_dropout", 0.0) or 0.0)

    def forward(self, h, cls_index=None):
        T = h.shape[-2]
        if self.summary_type == "mean":
            s, self.cache = h.mean(axis=-2), h.shape  # (B, N, C)
        else:
            last = np.full(h.shape[:-2], T - 1)
            idx = {"cls_index": last if cls_index is None else cls_index, "last": last,
                   "first": np.zeros(h.shape[:-2], dtype=np.int64)}[self.summary_type]
            s, self.cache = gather_forward(h, idx)  # (B, N, C)
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
        if self.summary_type == "mean":  # s = mean_t h
            shape = self.cache
            return np.broadcast_to(ds[..., None, :] / shape[-2], shape).copy()
        return gather_backward(ds, self.cache)


def gather_forward(h, idx):
    """s[...] = h[..., idx[...], :]     h: (..., T, C)  idx: (...) -> (..., C)"""
    return np.take_along_axis(h, idx[..., None, None], axis=-2)[..., 0, :], (h.shape, idx)


def gather_backward(ds, cache):
    """forward: s = h[..., idx, :];  so  dh[..., idx, :] = ds, 0 elsewhere"""
    shape, idx = cache
    dh = np.zeros(shape, dtype=ds.dtype)
    np.put_along_axis(dh, idx[..., None, None], ds[..., None, :], axis=-2)
    return dh


def l3_backward(transformer, dh, head, lm, d_aux=None):
    """GPT-1's L3 = L2 + lm_coef * L1, one backward through the decoder. dh: d L2 / d h (B, ..., T, C);
    head: the tied LM head; lm = (logits, ce cache, lm_coef) of L1, or None; d_aux: a given d logits."""
    if lm is not None or d_aux is not None:
        logits, ce, coef = lm if lm is not None else (None, None, 1.0)
        # L1 = CE(h We^T, shifted labels), weighted by lm_coef (or a given d logits)
        dlogits = d_aux if d_aux is not None else cross_entropy_backward(coef, ce).reshape(logits.shape)
        dh = dh + head.backward(dlogits)
    # h = decoder(x)
    transformer.decode_backward(dh.reshape(-1, dh.shape[-2], dh.shape[-1]))


@register
class GPT2DoubleHeadsModel(PreTrainedModel):
    """backbone + LM head + multiple-choice head on (B, N, T) inputs.
    out.loss = L1 (LM), out.mc_loss = L2 = CE(mc_logits (B, N), mc_labels (B,)); backward() takes the
    gradient of L3 = lm_coef * loss + mc_loss; backward(grad, mc_grad): d logits and/or d mc_logits."""

    can_generate = True
    config_class = GPT2Config
    backbone = GPT2Model
    base_model_prefix = "transformer"
    init_weights = gpt2_init_weights
    ignore_on_load = IGNORE_ON_LOAD

    def build(self):
        self.config.num_labels = 1  # as transformers: the summary projects to one score per choice
        self.transformer = self.backbone(self.config, init=False)
        self.lm_head, self.tied = _tied_lm_head(self)
        self.multiple_choice_head = SequenceSummary(self.config)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                mc_token_ids=None, mc_labels=None, past_key_values=None, use_cache=False,
                output_hidden_states=False, output_attentions=False, lm_coef=1.0, inputs_embeds=None):
        x = gpt_inputs(self.transformer, input_ids, attention_mask, token_type_ids, position_ids, past_key_values,
                       inputs_embeds, labels=labels, choices=True, lm_coef=lm_coef)
        B, N, T = x.shape
        if mc_token_ids is not None:
            mc_token_ids = labels_like("mc_token_ids", mc_token_ids, (B, N), T, allow=None)
        if mc_labels is not None:
            mc_labels = labels_like("mc_labels", mc_labels, (B,), N)
        if mc_labels is not None and self.multiple_choice_head.width != 1:
            raise ValueError(f"mc_loss needs one score per choice; the summary head gives "
                             f"{(B, N, self.multiple_choice_head.width)}")
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs = self.transformer.decode(x)
        h = hs[-1].reshape(x.shape + hs[-1].shape[-1:])  # (B, N, T, C)
        logits = self.lm_head(h)  # (B, N, T, V)
        s = self.multiple_choice_head(h, mc_token_ids)  # (B, N, K)
        mc_logits = s[..., 0] if s.shape[-1] == 1 else s  # squeeze(-1)
        # L1 = CE(logits[t], labels[t+1]);  L2 = CE(mc_logits, mc_labels)
        loss, ce = lm_loss_forward(logits, x.labels) if x.labels is not None else (None, None)
        mc_loss, mc = cross_entropy_forward(mc_logits, mc_labels) if mc_labels is not None else (None, None)
        self._last = (h, logits, ce, float(lm_coef), mc_logits, mc, s.shape)
        fields = dict(loss=loss, mc_loss=mc_loss, logits=logits, mc_logits=mc_logits)
        out = ModelOutput({k: v for k, v in fields.items() if v is not None})
        if use_cache or output_hidden_states or output_attentions:
            out.update(self.transformer.extras(hs, x.shape, use_cache, output_hidden_states, output_attentions))
        return out

    def objective(self, out):
        """L3 = lm_coef * loss + mc_loss (either part absent without its labels): what backward() differentiates."""
        lm_coef = self._need_last(backward=False)[3]
        if out.loss is None and out.mc_loss is None:
            return None
        return (0.0 if out.loss is None else lm_coef * out.loss) + (0.0 if out.mc_loss is None else out.mc_loss)

    def backward(self, grad=None, mc_grad=None):
        """No arguments: d L3 = d (lm_coef * loss + mc_loss). Else grad = d logits and/or mc_grad = d mc_logits."""
        h, logits, ce, lm_coef, mc_logits, mc, s_shape = self._need_last()
        given = grad is not None or mc_grad is not None
        if given:
            grad, mc_grad = output_grads((grad, mc_grad), ("logits", "mc_logits"), (logits, mc_logits))
        elif ce is None and mc is None:
            no_loss("labels and/or mc_labels")
        else:
            # L2 = CE(mc_logits, mc_labels)
            mc_grad = cross_entropy_backward(1.0, mc).reshape(mc_logits.shape) if mc is not None else None
        # mc_logits = summary(h at mc_token_ids)
        dh = self.multiple_choice_head.backward(mc_grad.reshape(s_shape)) if mc_grad is not None else np.zeros_like(h)
        lm = (logits, ce, lm_coef) if not given and ce is not None else None
        l3_backward(self.transformer, dh, self.lm_head, lm, grad if given else None)


@register
class OpenAIGPTDoubleHeadsModel(GPT2DoubleHeadsModel):
    config_class = OpenAIGPTConfig
    backbone = OpenAIGPTModel
    init_weights = PreTrainedModel.init_weights


def last_real_index(ids, pad_token_id):
    """GPT-2's pooled position per row: the rightmost id that is not pad_token_id (transformers 5; 0 for
    an all-pad row); T - 1 when the config has no pad token, which then allows batch 1 only. Without
    ids (inputs_embeds: prompt tuning) transformers pools the last position, T - 1, of every row."""
    B, T = ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError(f"Cannot handle batch sizes > 1 if no padding token is defined "
                             f"(config pad_token_id is None, batch {B})")
        return np.full(B, T - 1)
    return np.argmax(np.arange(T) * (ids != pad_token_id), axis=-1)


@register
class GPT2ForSequenceClassification(PreTrainedModel):
    """logits = score(h[b, i_b]),  i_b = the rightmost position whose input id is not pad_token_id
    (transformers 5; T-1 when the config has no pad token, which then allows batch 1 only; T-1 of
    every row with inputs_embeds, as transformers). score: C -> num_labels without bias; loss by
    problem_type. With lm_labels (numlm's addition, GPT-1's L3 for classification) backward()
    differentiates loss + lm_coef * lm_loss, lm_loss being L1 through the tied token table."""

    config_class = GPT2Config
    base_model_prefix = "transformer"
    init_weights = gpt2_init_weights
    ignore_on_load = IGNORE_ON_LOAD

    def build(self):
        self.transformer = GPT2Model(self.config, init=False)
        self.score = Linear(self.config.n_embd, self.config.num_labels, bias=False)
        self.lm_aux = TiedLMHead(self.transformer.wte)  # L3's LM head: the token table, no parameter of its own

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                past_key_values=None, use_cache=False, output_hidden_states=False, output_attentions=False,
                inputs_embeds=None, lm_labels=None, lm_coef=0.5):
        x = gpt_inputs(self.transformer, input_ids, attention_mask, token_type_ids, position_ids, past_key_values,
                       inputs_embeds, lm_coef=lm_coef, flat=True)
        lm_labels = None if lm_labels is None else lm_labels_masked(lm_labels, x, self.config.vocab_size)
        idx = last_real_index(x.ids, self.config.pad_token_id) if x.ids is not None else np.full(x.B, x.T - 1)
        labels = None if labels is None else classification_labels(self.config, labels, x.B,
                                                                    self.score.params["weight"].dtype)
        self._last = None  # every input checked: only now do the last forward's outputs go
        hs = self.transformer.decode(x)
        h = hs[-1]  # (B, T, C)
        if x.ids is None and x.mask is not None and not x.mask[:, -1].all():
            warnings.warn("inputs_embeds (prompt tuning) pools the last position of every row, as transformers "
                          "does, and some rows end in padding there: run such rows alone (numlm.classify does)")
        pooled, gather = gather_forward(h, idx)
        logits = self.score(pooled)  # (B, num_labels); the pooled rows only
        loss = loss_cache = None
        if labels is not None:
            y, loss_forward, loss_backward = labels  # loss = MSE, CE or BCE with logits (classification_labels)
            loss, cache = loss_forward(logits, y)
            loss_cache = (loss_backward, cache)
        lm = None
        if lm_labels is not None:  # L1 through the tied table, masked where the attention mask is 0
            lm_logits = self.lm_aux(h)
            lm_loss, ce = lm_loss_forward(lm_logits, lm_labels)
            lm = (lm_logits, ce, float(lm_coef))
        self._last = (h, gather, logits, loss_cache, lm)
        fields = dict(loss=loss, logits=logits, lm_loss=lm_loss if lm is not None else None)
        out = ModelOutput({k: v for k, v in fields.items() if v is not None})
        if use_cache or output_hidden_states or output_attentions:
            out.update(self.transformer.extras(hs, x.shape, use_cache, output_hidden_states, output_attentions))
        return out

    def objective(self, out):
        """loss (+ lm_coef * lm_loss with lm_labels): what backward() differentiates."""
        lm = self._need_last(backward=False)[4]
        if out.loss is None or lm is None:
            return out.loss
        return out.loss + lm[2] * out.lm_loss

    def backward(self, grad=None):
        """d objective (grad None), or grad = d logits"""
        h, gather, logits, loss, lm = self._need_last()
        dlogits = logits_grad(grad, logits, loss)  # loss = by problem type (classification_labels)
        lm = lm if grad is None else None
        # logits = score(h[b, i_b])
        dh = gather_backward(self.score.backward(dlogits), gather)
        l3_backward(self.transformer, dh, self.lm_aux, lm)


def lm_labels_masked(labels, x, V):
    """L1's labels for the classifier's L3: input_ids' shape, in [0, V) or -100, and -100 where the
    attention mask is 0 (padding predicts nothing)."""
    labels = lm_labels(labels, x.shape, V, "lm_labels")
    return labels if x.mask is None else np.where(x.mask[:, x.past_len:], labels, IGNORE_INDEX)


__all__ = ["GPT2Config", "OpenAIGPTConfig", "GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification",
           "GPT2DoubleHeadsModel", "OpenAIGPTModel", "OpenAIGPTLMHeadModel", "OpenAIGPTDoubleHeadsModel"]
