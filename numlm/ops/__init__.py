"""The math: one forward/backward pair per operation, pure NumPy, no state.

Shape legend (the whole library):
    B batch   T time (sequence)   C channels (hidden size)   H heads   D head size (C = H*D)
    V vocabulary   L layers   N any leading shape (...)

Contract: ``<op>_forward(inputs...) -> (out, cache)`` and ``<op>_backward(dout, cache) -> grads``,
in the order of the forward's differentiable arguments. Ops never modify an argument; they work in
the dtype of their inputs (float32 or float64) over any leading batch shape.
"""
from .linear import linear_forward, linear_backward, embedding_forward, embedding_backward
from .layernorm import layernorm_forward, layernorm_backward
from .activations import (
    gelu_forward, gelu_backward, gelu_tanh_forward, gelu_tanh_backward,
    tanh_forward, tanh_backward, relu_forward, relu_backward, ACTIVATIONS, activation,
    dropout_forward, dropout_backward, sigmoid,
)
from .softmax import (softmax_forward, softmax_backward, softmax, softmax_lse, log_softmax,
                      cross_entropy_forward, cross_entropy_backward, mse_forward, mse_backward,
                      bce_with_logits_forward, bce_with_logits_backward, IGNORE_INDEX)
from .attention import attention_forward, attention_backward, attention_allowed

__all__ = [n for n in dir() if n.endswith(("_forward", "_backward"))] + [
    "ACTIVATIONS", "activation", "attention_allowed", "IGNORE_INDEX", "sigmoid", "softmax", "softmax_lse", "log_softmax"]
