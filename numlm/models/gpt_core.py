"""GPT-1 and GPT-2, the math: embeddings -> blocks -> final norm, forward and backward written
straight through on arrays that numlm.models.checks has already checked.

    h0 = U We + Wp                                  token rows (or inputs_embeds) + positions, dropout
    GPT-2 block (pre-LN):   a = x + attn(ln_1(x));  y = a + mlp(ln_2(a))
    GPT-1 block (post-LN):  n = ln_1(x + attn(x));  y = ln_2(n + mlp(n))
    attn(x) = dropout(c_proj(dropout(softmax(q k^T * scale + M)) v)),  [q | k | v] = c_attn(x)
    mlp(x)  = dropout(c_proj(act(c_fc(x))))
    GPT-2 only: h = ln_f(h_L)
Attribute names are transformers', so a parameter's dotted name is its state_dict key. Linears are
Conv1D: weight (C_in, C_out). Shapes: B batch, T time, C channels; GPT-1's (B, N, T) multiple-choice
inputs arrive flattened to (B*N, T).

Hooks for parameter-efficient fine-tuning (numlm.peft), each None unless set:
  - inputs_embeds replaces U We (prompt tuning); its gradient is left in `inputs_embeds_grad`.
  - past: per layer (k, v) (B, H, T_past, D) before the new keys (prefix tuning, KV cache); their
    gradients are left in `past_grads`.
  - block.attention_adapters / block.output_adapters: a module with forward(h, x, ln) -> y and
    backward(dy) -> (dh, dx) that replaces the residual step after attn / mlp (h: the sub-layer
    output after projection and dropout, x: its residual input, ln: the LayerNorm that follows in
    GPT-1, None in GPT-2).
  - any Linear (c_attn, c_proj, c_fc) may be replaced by a module with the same forward/backward.
"""
import math

import numpy as np

from ..nn import (Module, ModuleList, Linear, Embedding, LayerNorm, Dropout, Activation, Attention,
                  add_residual, add_residual_backward, lowest_needing_backward)
from ..ops import embedding_forward, embedding_backward
from .pretrained import PreTrainedModel


class CausalSelfAttention(Module):
    """a = dropout(c_proj(Attn(q, k, v))),  [q | k | v] = c_attn(x)      x: (B, T, C) -> (B, T, C)"""

    def __init__(self, config, scale, causal_fill=None):
        super().__init__()
        C = config.n_embd
        self.c_attn = Linear(C, 3 * C, torch_layout=False)
        self.c_proj = Linear(C, C, torch_layout=False)
        self.core = Attention(config.n_head, config.attn_pdrop, causal=True, causal_fill=causal_fill, scale=scale)
        self.resid_dropout = Dropout(config.resid_pdrop)

    def forward(self, x, mask=None, past=None):
        C = x.shape[-1]
        qkv = self.c_attn(x)  # (B, T, 3C)
        y = self.core(qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:], mask, past)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def backward(self, da):
        # a = resid_dropout(c_proj(y))
        dy = self.c_proj.backward(self.resid_dropout.backward(da))
        # y = core(q, k, v)
        dq, dk, dv = self.core.backward(dy)
        # [q | k | v] = c_attn(x)
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
        # m = dropout(c_proj(act(c_fc(x))))
        return self.c_fc.backward(self.act.backward(self.c_proj.backward(self.dropout.backward(dm))))


def attn_scale(config, layer_idx):
    """1/sqrt(D) (or 1 without scale_attn_weights), divided by layer_idx + 1 with scale_attn_by_inverse_layer_idx"""
    scale = 1.0 / math.sqrt(config.n_embd // config.n_head) if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= layer_idx + 1
    return scale


class GPT2Block(Module):
    """pre-LN:  a = x + attn(ln_1(x));  y = a + mlp(ln_2(a))"""

    def __init__(self, config, layer_idx):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps)
        self.attn = CausalSelfAttention(config, attn_scale(config, layer_idx))
        self.ln_2 = LayerNorm(config.n_embd, eps)
        self.mlp = MLP(config)
        self.attention_adapters = self.output_adapters = None

    def forward(self, x, mask=None, past=None):
        h = self.attn(self.ln_1(x), mask, past)
        a = add_residual(h, x, None, self.attention_adapters)  # a = x + h
        m = self.mlp(self.ln_2(a))
        return add_residual(m, a, None, self.output_adapters)  # y = a + m

    def backward(self, dy):
        # y = a + m
        dm, da = add_residual_backward(dy, None, self.output_adapters)
        # m = mlp(ln_2(a))
        da = da + self.ln_2.backward(self.mlp.backward(dm))
        # a = x + h
        dh, dx = add_residual_backward(da, None, self.attention_adapters)
        # h = attn(ln_1(x))
        return dx + self.ln_1.backward(self.attn.backward(dh))


class OpenAIGPTBlock(Module):
    """post-LN:  n = ln_1(x + attn(x));  y = ln_2(n + mlp(n)).  Future scores are replaced by -1e4."""

    def __init__(self, config):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.attn = CausalSelfAttention(config, attn_scale(config, 0), causal_fill=-1e4)
        self.ln_1 = LayerNorm(config.n_embd, eps)
        self.mlp = MLP(config)
        self.ln_2 = LayerNorm(config.n_embd, eps)
        self.attention_adapters = self.output_adapters = None

    def forward(self, x, mask=None, past=None):
        h = self.attn(x, mask, past)
        n = add_residual(h, x, self.ln_1, self.attention_adapters)  # n = ln_1(x + h)
        m = self.mlp(n)
        return add_residual(m, n, self.ln_2, self.output_adapters)  # y = ln_2(n + m)

    def backward(self, dy):
        # y = ln_2(n + m)
        dm, dn = add_residual_backward(dy, self.ln_2, self.output_adapters)
        # m = mlp(n)
        dn = dn + self.mlp.backward(dm)
        # n = ln_1(x + h)
        dh, dx = add_residual_backward(dn, self.ln_1, self.attention_adapters)
        # h = attn(x)
        return dx + self.attn.backward(dh)


class GPTCore(PreTrainedModel):
    """The decoder GPT-1 and GPT-2 share. Attribute names are GPT-2's (wte, wpe, drop, h, ln_f); GPT-1
    names its tables tokens_embed / positions_embed (aliased as wte / wpe) and has no ln_f."""

    base_model_prefix = "transformer"
    gpt2 = True
    ln_f = None
    _past = None

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

    def decode(self, ids, pos, mask=None, past=None, token_types=None, inputs_embeds=None):
        """ids, pos, token_types: (B, T) ints; mask (B, T_past + T) bool -> hidden states h0 .. hL, each
        (B, T, C); the last is ln_f's output for GPT-2"""
        # h0 = U We + Wp  (+ We[token types], transformers' GPT token types)
        self._past = past
        x = self.wte(ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        x = x + self.wpe(pos)
        tt_cache = None
        if token_types is not None:
            e, tt_cache = embedding_forward(token_types, self.wte.params["weight"])
            x = x + e
        self.cache = (inputs_embeds is not None, tt_cache)
        h = self.drop(x)
        hs = [h]
        # h_l = block_l(h_{l-1})
        for i, block in enumerate(self.h):
            h = block(h, mask, None if past is None else past[i])
            hs.append(h)
        # h = ln_f(h_L)
        if self.ln_f is not None:
            hs[-1] = self.ln_f(h)
        return hs

    def decode_backward(self, dh):
        """dh: d (last hidden state) (B, T, C) -> every parameter's gradient (+ inputs_embeds_grad, past_grads)"""
        # h = ln_f(h_L)
        if self.ln_f is not None:
            dh = self.ln_f.backward(dh)
        # h_l = block_l(h_{l-1}), down to the lowest block that has a gradient to compute
        embeds, tt_cache = self.cache
        lo = lowest_needing_backward([self.wte, self.wpe], embeds, self.h.items, self._past)
        for block in reversed(self.h.items[lo:]):
            dh = block.backward(dh)
        self.past_grads = tuple(block.attn.core.dpast if i >= lo else None for i, block in enumerate(self.h))
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


class GPT2Core(GPTCore):
    """GPT-2 decoder: wte, wpe, pre-LN blocks h.0 .. h.{L-1}, final ln_f."""


class OpenAIGPTCore(GPTCore):
    """GPT-1 decoder: tokens_embed, positions_embed, post-LN blocks h.0 .. h.{L-1}, no final LayerNorm."""

    gpt2 = False
    wte = property(lambda self: self.tokens_embed)
    wpe = property(lambda self: self.positions_embed)
