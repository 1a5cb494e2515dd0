"""Modules: parameters, gradients and the forward/backward contract, and the layers built from ops."""
from .layers import (Module, ModuleList, lowest_needing_backward, no_grad, eval_mode, grad_enabled, attention_keeps, Linear,
                     Embedding, LayerNorm, Dropout, Activation, Attention, split_heads, merge_heads, OPS)

__all__ = ["Module", "ModuleList", "lowest_needing_backward", "no_grad", "eval_mode", "grad_enabled", "attention_keeps", "Linear",
           "Embedding", "LayerNorm", "Dropout", "Activation", "Attention", "split_heads", "merge_heads", "OPS"]
