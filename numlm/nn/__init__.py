"""Modules: parameters, gradients and the forward/backward contract, and the layers built from ops."""
from .module import Module, ModuleList, lowest_needing_backward, no_grad, grad_enabled
from .layers import (Linear, Embedding, LayerNorm, Dropout, Activation, Attention, split_heads, merge_heads,
                     add_residual, add_residual_backward)

__all__ = ["Module", "ModuleList", "lowest_needing_backward", "no_grad", "grad_enabled", "Linear", "Embedding",
           "LayerNorm", "Dropout", "Activation",
           "Attention", "split_heads", "merge_heads", "add_residual", "add_residual_backward"]
