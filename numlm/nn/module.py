"""Module: named parameters, their gradients (a mirror dict with the same keys), children, and the
cache of the last forward. One forward, then one backward; gradients accumulate with +=.

Freezing: a frozen parameter has no entry in `grads`. Its layer then computes no gradient for it
(only the input gradient), grad_arrays() leaves it out, so clipping and the optimizer never see it,
and its values stay bit-identical through training.

Two views of the same arrays, named for their layout:
    parameters(), grad_arrays()     numlm's layout: {dotted name: array}, Linear weights (C_in, C_out),
                                    the arrays themselves (an optimizer updates them in place)
    state_dict(), gradients()       transformers' layout and keys (models only, numlm.models.pretrained):
                                    copies, nn.Linear weights transposed to (C_out, C_in), tied aliases included

Inference: forwards inside `with numlm.no_grad():` keep no caches (what only a backward reads), so a
forward holds one layer's activations at a time instead of every layer's; a backward after such a
forward raises ValueError. The outputs are bit-identical to a normal forward's.
"""
from contextlib import contextmanager

import numpy as np

_grad = [True]  # [enabled]: forwards keep their caches for a backward
NO_CACHE = object()  # the cache of a forward run under no_grad


@contextmanager
def no_grad():
    """Forwards inside keep no caches for a backward (as torch.no_grad): inference at the memory of
    one layer's activations. Nests; restores the previous mode on exit."""
    prev, _grad[0] = _grad[0], False
    try:
        yield
    finally:
        _grad[0] = prev


def grad_enabled():
    """False inside numlm.no_grad()."""
    return _grad[0]


class Module:
    def __init__(self):
        self.params = {}      # name -> ndarray
        self.grads = {}       # name -> ndarray, the trainable params' keys and shapes
        self.training = True
        self._cache = None

    @property
    def cache(self):
        """What the last forward kept for backward (ValueError if it ran under no_grad)."""
        if self._cache is NO_CACHE:
            raise ValueError(f"{type(self).__name__}.backward: the forward ran under numlm.no_grad() and kept "
                             "no cache; run it again outside no_grad() to differentiate")
        return self._cache

    @cache.setter
    def cache(self, value):
        self._cache = value if _grad[0] else NO_CACHE

    def add_param(self, name, value):
        value = np.ascontiguousarray(value)
        self.params[name] = value
        self.grads[name] = zeros_untouched(value)
        return value

    def add_grad(self, name, g):
        """grads[name] += g: the one way a gradient reaches a parameter (layers and tied heads alike).
        Callers ask requires_grad(name) first: a frozen parameter has no gradient (KeyError here)."""
        self.grads[name] += g

    def children(self):
        """(name, module) pairs in definition order."""
        return [(k, v) for k, v in vars(self).items() if isinstance(v, Module)]

    def modules(self, prefix=""):
        """(dotted name, module) for this module and every descendant."""
        yield prefix.rstrip("."), self
        for name, child in self.children():
            yield from child.modules(f"{prefix}{name}.")

    def parameters(self):
        """{dotted name: array} over the whole tree, numlm's own layout (Linear weights are (C_in, C_out))."""
        return {f"{p}.{k}" if p else k: v for p, m in self.modules() for k, v in m.params.items()}

    def grad_arrays(self):
        """{dotted name: gradient array}, the mirror of trainable_parameters()."""
        return {f"{p}.{k}" if p else k: v for p, m in self.modules() for k, v in m.grads.items()}

    # ---- freezing
    def requires_grad(self, name):
        """True unless this module's own parameter `name` is frozen."""
        return name in self.grads

    def trainable_parameters(self):
        """{dotted name: array} of the parameters that are not frozen."""
        return {f"{p}.{k}" if p else k: m.params[k] for p, m in self.modules() for k in m.grads}

    hands_grad_out = False  # True where backward feeds a tensor outside the model (a soft prompt, a prefix)

    def needs_backward(self):
        """True if a parameter of this module or a descendant trains, or one hands a gradient out."""
        return any(m.grads or m.hands_grad_out for _, m in self.modules())

    def _select(self, names):
        """(module, local name) for dotted `names` relative to this module (None: every parameter)."""
        slots = {f"{p}.{k}" if p else k: (m, k) for p, m in self.modules() for k in m.params}
        if names is None:
            return list(slots.values())
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in slots]
        if unknown:
            raise ValueError(f"no parameter named {unknown[0]!r} in {type(self).__name__}")
        return [slots[n] for n in names]

    def freeze(self, names=None):
        """Freeze the parameters `names` (dotted, relative to this module), or all of this module's
        tree. Their gradient arrays are dropped; returns self."""
        for m, k in self._select(names):
            m.grads.pop(k, None)
        return self

    def unfreeze(self, names=None):
        """Make the parameters `names` (or all) trainable again, with a zero gradient; returns self."""
        for m, k in self._select(names):
            if k not in m.grads:
                m.grads[k] = zeros_untouched(m.params[k])
        return self

    def zero_grad(self):
        for _, m in self.modules():
            for g in m.grads.values():
                g.fill(0)

    def train(self, mode=True):
        for _, m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def astype(self, dtype):
        """Cast every parameter (and gradient) to dtype, in place; returns self."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        for _, m in self.modules():
            for k in m.params:
                m.params[k] = np.ascontiguousarray(m.params[k], dtype=dtype)
                if k in m.grads:  # frozen parameters stay frozen
                    m.grads[k] = zeros_untouched(m.params[k])
        return self

    @property
    def dtype(self):
        for v in self.parameters().values():
            return v.dtype
        return np.dtype(np.float32)

    def num_parameters(self):
        return sum(v.size for v in self.parameters().values())

    def __call__(self, *args, **kwargs):
        self.called_under_no_grad = not _grad[0]  # a model's backward() checks its last call
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, *args, **kwargs):
        raise NotImplementedError


def lowest_needing_backward(bottom, input_grad, layers, past=None):
    """The index of the lowest of `layers` a backward must reach: 0 when the modules below them
    (`bottom`, e.g. the embeddings) need a backward or their input's gradient is wanted (`input_grad`,
    inputs_embeds), else the first layer that needs one or takes a past. Below it every parameter is
    frozen and no gradient is asked for, so the backward stops there."""
    bottom = bottom if isinstance(bottom, (list, tuple)) else [bottom]
    if input_grad or any(m.needs_backward() for m in bottom):
        return 0
    for i, layer in enumerate(layers):
        if layer.needs_backward() or (past is not None and past[i] is not None):
            return i
    return len(layers)


def zeros_untouched(a):
    """Zeros like `a` from calloc: the pages cost no memory until a backward writes them
    (np.zeros_like writes every byte), so a model used only for inference holds no gradient memory."""
    return np.zeros(a.shape, dtype=a.dtype)


class ModuleList(Module):
    """An indexable list of modules named "0", "1", ... (transformers' `layer.0`, `h.0`)."""

    def __init__(self, modules):
        super().__init__()
        self.items = list(modules)

    def children(self):
        return [(str(i), m) for i, m in enumerate(self.items)]

    def __getitem__(self, i):
        return self.items[i]

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)
