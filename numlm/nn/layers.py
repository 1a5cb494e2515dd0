"""Layers built from ops. Each keeps its forward cache and accumulates parameter gradients."""
import numpy as np

from ..ops import (linear_forward, linear_backward, embedding_forward, embedding_backward,
                   layernorm_forward, layernorm_backward, dropout_forward, dropout_backward,
                   attention_forward, attention_backward, activation)
from .module import Module


class Linear(Module):
    """y = x W + b with W stored (C_in, C_out). `torch_layout=True` marks a transformers nn.Linear,
    whose checkpoint weight is (C_out, C_in); state_dict conversion transposes it (GPT's Conv1D is not)."""

    def __init__(self, c_in, c_out, bias=True, dtype=np.float32, torch_layout=True):
        super().__init__()
        self.torch_layout = torch_layout
        self.add_param("weight", np.zeros((c_in, c_out), dtype=dtype))
        if bias:
            self.add_param("bias", np.zeros(c_out, dtype=dtype))

    def forward(self, x):  # (..., C_in) -> (..., C_out)
        y, self.cache = linear_forward(x, self.params["weight"], self.params.get("bias"))
        return y

    def backward(self, dy):
        dx, dw, db = linear_backward(dy, self.cache, self.requires_grad("weight"), self.requires_grad("bias"))
        if dw is not None:
            self.add_grad("weight", dw)
        if db is not None:
            self.add_grad("bias", db)
        return dx


class Embedding(Module):
    def __init__(self, num, dim, padding_idx=None, dtype=np.float32):
        super().__init__()
        self.padding_idx = padding_idx
        self.add_param("weight", np.zeros((num, dim), dtype=dtype))

    def forward(self, ids):  # (...) -> (..., C)
        out, self.cache = embedding_forward(ids, self.params["weight"], self.padding_idx)
        return out

    def backward(self, dout):
        if self.requires_grad("weight"):
            self.add_grad("weight", embedding_backward(dout, self.cache))


class LayerNorm(Module):
    def __init__(self, dim, eps=1e-5, dtype=np.float32):
        super().__init__()
        self.eps = eps
        self.add_param("weight", np.ones(dim, dtype=dtype))
        self.add_param("bias", np.zeros(dim, dtype=dtype))

    def forward(self, x):
        y, self.cache = layernorm_forward(x, self.params["weight"], self.params["bias"], self.eps)
        return y

    def backward(self, dy):
        dx, dg, db = layernorm_backward(dy, self.cache)  # dg, db: two sums fused into dx's pass
        if self.requires_grad("weight"):
            self.add_grad("weight", dg)
        if self.requires_grad("bias"):
            self.add_grad("bias", db)
        return dx


class Dropout(Module):
    """Identity in eval mode; in training draws its mask from `self.rng` (a numpy Generator the model shares)."""

    def __init__(self, p):
        super().__init__()
        self.p = p
        self.rng = None

    def forward(self, x):
        y, self.cache = dropout_forward(x, self.p, self.rng, self.training)
        return y

    def backward(self, dy):
        return dropout_backward(dy, self.cache)


class Activation(Module):
    def __init__(self, name):
        super().__init__()
        self.name = name
        self._forward, self._backward = activation(name)

    def forward(self, x):
        y, self.cache = self._forward(x)
        return y

    def backward(self, dy):
        return self._backward(dy, self.cache)


def add_residual(h, x, ln=None, adapters=None):
    """y = ln(x + h), or x + h without ln: the end of a sub-layer (h its output after projection and
    dropout, x its input). `adapters`, when set, replaces the step: a module with
    forward(h, x, ln) -> y and backward(dy) -> (dh, dx) (bottleneck adapters)."""
    if adapters is not None:
        return adapters(h, x, ln)
    return x + h if ln is None else ln(x + h)


def add_residual_backward(dy, ln=None, adapters=None):
    """forward: y = ln(x + h);  so  dh = dx = ln'(dy)  (= dy without ln)"""
    if adapters is not None:
        return adapters.backward(dy)
    d = dy if ln is None else ln.backward(dy)
    return d, d


def split_heads(x, n_head):
    """(B, T, C) -> (B, H, T, D)"""
    B, T, C = x.shape
    return np.ascontiguousarray(x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3))


def merge_heads(x):
    """(B, H, T, D) -> (B, T, C)"""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


class Attention(Module):
    """The attention core shared by BERT and GPT: split heads, dropout(masked softmax(q k^T * scale)) v,
    merge. Projections live in the model's own modules (BERT's query/key/value, GPT's fused c_attn).
    `past` = (k, v) of shape (B, H, T_past, D) are keys and values before the new ones (a KV cache, or
    prefix-tuning's per-layer prefix): `self.present` holds the concatenation, and backward leaves
    their gradients in `self.dpast`, the same shapes. attention_mask then covers T_past + T keys."""

    def __init__(self, n_head, dropout_p=0.0, causal=False, causal_fill=None, scale=None):
        super().__init__()
        self.n_head, self.dropout_p, self.causal = n_head, dropout_p, causal
        self.causal_fill, self.scale = causal_fill, scale
        self.rng = None
        self.present = None
        self.probs = None
        self.dpast = None

    def forward(self, q, k, v, attention_mask=None, past=None):  # (B, T, C) each -> (B, T, C)
        q, k, v = (split_heads(t, self.n_head) for t in (q, k, v))  # (B, H, T, D)
        if past is not None:
            k = np.concatenate([past[0], k], axis=2)  # (B, H, T_past + T, D)
            v = np.concatenate([past[1], v], axis=2)
        self.present = (k, v)
        p = self.dropout_p if self.training else 0.0
        out, cache = attention_forward(q, k, v, attention_mask, self.causal, self.scale,
                                       self.causal_fill, p, self.rng)
        self.cache, self.probs = cache, cache.probs
        return merge_heads(out)

    def backward(self, dout):  # (B, T, C) -> dq, dk, dv each (B, T, C)
        dq, dk, dv = attention_backward(split_heads(dout, self.n_head), self.cache)  # dk, dv (B, H, T_past + T, D)
        # k = concatenate([past k, k]), v likewise: the first T_past rows belong to the past
        Tp = dk.shape[2] - dq.shape[2]
        self.dpast = (dk[:, :, :Tp], dv[:, :, :Tp]) if Tp else None
        return merge_heads(dq), merge_heads(dk[:, :, Tp:]), merge_heads(dv[:, :, Tp:])
