"""Module and the layers built from ops.

Module: named parameters, their gradients (a mirror dict with the same keys), children, and the
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

Memory between forwards: a module drops the cache of its last forward before it runs again (the new
cache then fits in the memory the old one leaves), and an attention core holds its keys, values and
probabilities after its forward only when a model's caller asked for them (attention_keeps below).
"""
import inspect
from contextlib import contextmanager

import numpy as np

from ..ops import (linear_forward, linear_backward, embedding_forward, embedding_backward,
                   layernorm_forward, layernorm_backward, dropout_forward, dropout_backward,
                   attention_forward, attention_backward, activation, ACTIVATIONS)

# The (forward, backward) pair each layer runs, by name, looked up at every call. The one place an op
# is swapped: numlm.inspect.broken_backward corrupts a backward here on purpose and puts it back.
OPS = {"linear": (linear_forward, linear_backward), "embedding": (embedding_forward, embedding_backward),
       "layernorm": (layernorm_forward, layernorm_backward), "dropout": (dropout_forward, dropout_backward),
       "attention": (attention_forward, attention_backward), **ACTIVATIONS}

_grad = [True]  # [enabled]: forwards keep their caches for a backward


class NoCache:
    """The cache a module holds after a forward under no_grad: any use of it in a backward is a
    ValueError naming the module's class (one instance per class, kept in _NO_CACHE)."""

    def __init__(self, module):
        self.name = type(module).__name__

    def _refuse(self, *args):
        raise ValueError(f"{self.name}.backward: the forward ran under numlm.no_grad() and kept no cache; "
                         "run it again outside no_grad() to differentiate")

    __iter__ = __getitem__ = __array__ = __len__ = _refuse

    def __getattr__(self, name):
        self._refuse()


_NO_CACHE = {}


@contextmanager
def no_grad():
    """Forwards inside keep no caches for a backward (as torch.no_grad): inference at the memory of
    one layer's activations. Nests; restores the previous mode on exit."""
    prev, _grad[0] = _grad[0], False
    try:
        yield
    finally:
        _grad[0] = prev


@contextmanager
def eval_mode(model):
    """The model (or PeftModel) in eval mode inside, dropout off; on exit every module's own mode as it
    was: inference on a training model gives its eval answer and leaves it training. An object that
    is not a numlm module (a callable generate() is given) runs as it is."""
    modes = [(m, m.training) for _, m in model.modules()] if hasattr(model, "modules") else []
    if modes:
        model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def grad_enabled():
    """False inside numlm.no_grad()."""
    return _grad[0]


# What an attention core holds after its forward besides its cache: "present" (its keys and values, a KV
# cache) and "probs" (its attention probabilities). A model's call sets it for its forward from what its
# caller asked for, use_cache and output_attentions, by keyword or position (a core called on its own,
# outside any model, keeps both).
attention_keeps = [("present", "probs")]
ASKED_BY = (("present", "use_cache"), ("probs", "output_attentions"))
_FORWARD_FLAGS = {}  # model class -> forward_flags(class)


def forward_flags(kind):
    """(the names a model class's forward gives its positional arguments, {flag: its default}) for the
    flags of ASKED_BY, read from the signature once per class; a flag forward does not take is False."""
    params = inspect.signature(kind.forward).parameters
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]  # after self
    defaults = {flag: params[flag].default if flag in params else False for _, flag in ASKED_BY}
    return _FORWARD_FLAGS.setdefault(kind, (names, defaults))


class Module:
    is_model = False  # True for numlm.models' classes (see __call__)

    def __init__(self):
        self.params = {}      # name -> ndarray
        self.grads = {}       # name -> ndarray, the trainable params' keys and shapes
        self.training = True
        self.cache = None     # what the last forward kept for backward (a NoCache under no_grad)

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

    def needs_backward(self):
        """True if a parameter of this module or a descendant trains."""
        return any(m.grads for _, m in self.modules())

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
        if not self.is_model:
            self.cache = None  # the last forward's cache is freed before this one makes its own, in that memory
            out = self.forward(*args, **kwargs)
        else:  # its attention cores keep what its caller asked for, during its forward only (its forward frees
            # _last once every input passed its checks: a refused call leaves the last forward to backward())
            names, defaults = _FORWARD_FLAGS.get(type(self)) or forward_flags(type(self))
            given = {**defaults, **dict(zip(names, args)), **kwargs}  # the flags by keyword or position
            before, attention_keeps[0] = attention_keeps[0], tuple(kept for kept, flag in ASKED_BY if given[flag])
            try:
                out = self.forward(*args, **kwargs)
            finally:
                attention_keeps[0] = before
        self.called_under_no_grad = not _grad[0]  # a model's backward() checks its last call
        if not _grad[0]:  # drop what only a backward reads: one layer's activations at a time
            kind = type(self)
            self.cache = _NO_CACHE[kind] if kind in _NO_CACHE else _NO_CACHE.setdefault(kind, NoCache(self))
        return out

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, *args, **kwargs):
        raise NotImplementedError

    def detached(self):
        """{attribute: value} that holds constant, while a gradient check perturbs the parameters, what
        this module's forward computes from them but its backward treats as a constant (none here)"""
        return {}


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


def lowest_needing_backward(bottom, input_grad, layers, past=None):
    """The index of the lowest of `layers` a backward must reach: 0 when the modules below them
    (`bottom`, e.g. the embeddings) need a backward or their input's gradient is wanted (`input_grad`,
    inputs_embeds), else the first layer that needs one or takes a past. Below it every parameter is
    frozen and no gradient is asked for, so the backward stops there. A module needs a backward when
    it or a descendant has a trainable parameter."""
    if input_grad:
        return 0
    groups = [list(bottom) if isinstance(bottom, (list, tuple)) else [bottom]] + [[layer] for layer in layers]
    for i, stack in enumerate(groups):
        if i > 0 and past is not None and past[i - 1] is not None:
            return i - 1
        while stack:
            m = stack.pop()
            if m.grads:
                return max(i - 1, 0)
            stack.extend(c for _, c in m.children())
    return len(layers)


class Linear(Module):
    """y = x W + b with W stored (C_in, C_out). `torch_layout=True` marks a transformers nn.Linear,
    whose checkpoint weight is (C_out, C_in); state_dict conversion transposes it (GPT's Conv1D is not)."""

    def __init__(self, c_in, c_out, bias=True, dtype=np.float32, torch_layout=True):
        super().__init__()
        self.torch_layout = torch_layout
        self.add_param("weight", np.zeros((c_in, c_out), dtype=dtype))
        if bias:
            self.add_param("bias", np.zeros(c_out, dtype=dtype))

    def forward(self, x, *joined):  # (..., C_in) -> (..., C_out)
        """y = x W + b. `joined`: more Linears of x whose outputs follow this one's, all in one product:
        [y | y1 ..] = x [W | W1 ..] + [b | b1 ..] (BERT's query, key, value: one BLAS call, not three);
        backward then takes d[y | y1 ..] and gives each Linear its own columns' gradients."""
        w, b = self.params["weight"], self.params.get("bias")
        if joined:
            w = np.concatenate([w] + [m.params["weight"] for m in joined], axis=1)
            b = None if b is None else np.concatenate([b] + [m.params["bias"] for m in joined])
        y, cache = OPS["linear"][0](x, w, b)
        self.cache = (cache, joined)
        return y

    def backward(self, dy):
        cache, joined = self.cache
        mods = (self,) + joined  # this Linear, then those whose columns followed its own in the product
        need_dw, need_db = (any(name in m.grads for m in mods) for name in ("weight", "bias"))  # not all frozen
        dx, dw, db = OPS["linear"][1](dy, cache, need_dw, need_db)
        lo = 0
        for m in mods:  # each Linear's columns of [W | W1 ..]
            hi = lo + m.params["weight"].shape[1]
            if dw is not None and "weight" in m.grads:  # not frozen
                m.add_grad("weight", dw[:, lo:hi])
            if db is not None and "bias" in m.grads:
                m.add_grad("bias", db[lo:hi])
            lo = hi
        return dx


class Embedding(Module):
    def __init__(self, num, dim, padding_idx=None, dtype=np.float32):
        super().__init__()
        self.padding_idx = padding_idx
        self.add_param("weight", np.zeros((num, dim), dtype=dtype))

    def forward(self, ids):  # (...) -> (..., C)
        out, self.cache = OPS["embedding"][0](ids, self.params["weight"], self.padding_idx)
        return out

    def backward(self, dout):
        if "weight" in self.grads:  # not frozen: scattered straight into the gradient, no (V, C) zeros added
            OPS["embedding"][1](dout, self.cache, out=self.grads["weight"])


class LayerNorm(Module):
    def __init__(self, dim, eps=1e-5, dtype=np.float32):
        super().__init__()
        self.eps = eps
        self.add_param("weight", np.ones(dim, dtype=dtype))
        self.add_param("bias", np.zeros(dim, dtype=dtype))

    def forward(self, x):
        y, self.cache = OPS["layernorm"][0](x, self.params["weight"], self.params["bias"], self.eps)
        return y

    def backward(self, dy):
        dx, dg, db = OPS["layernorm"][1](dy, self.cache)  # dg, db: two sums fused into dx's pass
        if "weight" in self.grads:  # not frozen
            self.add_grad("weight", dg)
        if "bias" in self.grads:
            self.add_grad("bias", db)
        return dx


class Dropout(Module):
    """Identity in eval mode; in training draws its mask from `self.rng` (a numpy Generator the model shares)."""

    def __init__(self, p):
        super().__init__()
        self.p = p
        self.rng = None

    def forward(self, x):
        y, self.cache = OPS["dropout"][0](x, self.p, self.rng, self.training)
        return y

    def backward(self, dy):
        return OPS["dropout"][1](dy, self.cache)


class Activation(Module):
    def __init__(self, name):
        super().__init__()
        activation(name)  # an unknown name is refused here
        self.name = name

    def forward(self, x):
        y, self.cache = OPS[self.name][0](x)
        return y

    def backward(self, dy):
        return OPS[self.name][1](dy, self.cache)


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
    prefix-tuning's per-layer prefix): `self.present` holds the concatenation and `self.probs` the
    probabilities when kept (attention_keeps), and backward leaves the past's gradients in `self.dpast`.
    The mask covers T_past + T keys: a (B, T_past + T) padding mask, or the int8 codes of
    ops.attention_allowed that a model builds once per forward."""

    def __init__(self, n_head, dropout_p=0.0, causal=False, causal_fill=None, scale=None):
        super().__init__()
        self.n_head, self.dropout_p, self.causal = n_head, dropout_p, causal
        self.causal_fill, self.scale = causal_fill, scale
        self.rng = None
        self.present = None
        self.room = None  # the buffers the last present is a view of (after_past)
        self.probs = None
        self.dpast = None

    def forward(self, q, k, v, attention_mask=None, past=None):  # (B, T, C) each -> (B, T, C)
        B, T, C = q.shape
        H, D = self.n_head, C // self.n_head
        # split heads: (B, T, C) -> (B, H, T, D), views (BLAS reads each head's (T, D) rows with their stride)
        q, k, v = (t.reshape(B, T, H, D).transpose(0, 2, 1, 3) for t in (q, k, v))
        if past is not None:
            k, v = self.after_past(past, k, v)  # (B, H, T_past + T, D)
        kept = attention_keeps[0]
        self.present = (k, v) if "present" in kept else None
        if self.room is not None and (self.present is None or k.base is not self.room[0]):
            self.room = None  # no present views the buffer: nothing grows in it again
        p = self.dropout_p if self.training else 0.0
        # merge heads: (B, H, T, D) -> (B, T, C), the op writing into the per-head view of (B, T, H, D)
        merged = np.empty((B, T, H, D), dtype=np.result_type(q, k, v))
        heads = merged.transpose(0, 2, 1, 3)
        out, cache = OPS["attention"][0](q, k, v, attention_mask, self.causal, self.scale,
                                       self.causal_fill, p, self.rng, out=heads)
        self.cache, self.probs = cache, cache.probs if "probs" in kept else None
        if out is not heads:  # a decoding step's, or another op's
            heads[...] = out
        return merged.reshape(B, T, C)

    def after_past(self, past, k, v):
        """[past; new] along time, for keys and values: (B, H, T_past + T, D) each. A past that is this
        layer's last `present` (a KV cache fed back) is a view of a buffer with room after it: the new
        rows are written there and the view extended, so a decoding step copies its own row and not
        the whole cache (the buffer doubles when full). Any other past (a prefix, a reordered beam
        cache) is concatenated. Views handed out earlier never change: rows are written only past
        the end of the last one."""
        if self.present is None or past[0] is not self.present[0] or past[1] is not self.present[1]:
            return np.concatenate([past[0], k], axis=2), np.concatenate([past[1], v], axis=2)
        Tp, T = past[0].shape[2], k.shape[2]
        room = self.room
        if room is None or past[0].base is not room[0] or room[0].shape[2] < Tp + T:
            shape = past[0].shape[:2] + (2 * (Tp + T), past[0].shape[3])
            room = self.room = tuple(np.empty(shape, np.result_type(p, x)) for p, x in zip(past, (k, v)))
            for r, p in zip(room, past):
                r[:, :, :Tp] = p
        for r, x in zip(room, (k, v)):
            r[:, :, Tp:Tp + T] = x
        return room[0][:, :, :Tp + T], room[1][:, :, :Tp + T]

    def backward(self, dout, joined=False):  # (B, T, C) -> dq, dk, dv each (B, T, C), or joined (B, T, 3C)
        B, T, C = dout.shape
        H, D = self.n_head, C // self.n_head
        # one array [dq | dk | dv] (B, T, 3C), what a joined projection's backward takes: the attention
        # backward writes into its per-head views when there is no past (its dk, dv are the new keys' only)
        dqkv = np.empty((B, T, 3, H, D), dtype=dout.dtype)
        heads = [dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3)] if self.cache.k.shape[2] == T else [None] * 3
        # out = merge(attention(split(q), split(k), split(v))):  dout (B, H, T, D), a view
        dq, dk, dv = OPS["attention"][1](dout.reshape(B, T, H, D).transpose(0, 2, 1, 3), self.cache, out=heads)
        # k = concatenate([past k, k]), v likewise: the first T_past rows belong to the past
        Tp = dk.shape[2] - T
        self.dpast = (dk[:, :, :Tp], dv[:, :, :Tp]) if Tp else None
        for i, d in enumerate((dq, dk[:, :, Tp:] if Tp else dk, dv[:, :, Tp:] if Tp else dv)):
            if d is not heads[i]:  # written elsewhere (a past, a changed op)
                dqkv[:, :, i] = d.transpose(0, 2, 1, 3)
        dqkv = dqkv.reshape(B, T, 3 * C)
        return dqkv if joined else (dqkv[..., :C], dqkv[..., C:2 * C], dqkv[..., 2 * C:])
