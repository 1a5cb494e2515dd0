"""The modules peft puts into a model: a LoRA linear in place of a Linear, AdapterHub's bottleneck
adapter, and the soft prompt / prefix tables. Their dotted names are the adapter files' keys
(`...query.lora_A.weight`, `...output.adapters.<name>.adapter_down.0.weight`, `prompt_embeddings`).

Frozen parameters have no entry in `grads` (numlm.nn's freezing): their weight gradient is never
computed, only the input gradient flows through them.
"""
import math

import numpy as np

from ..kernels.matmul import mm
from ..nn import Module, ModuleList, Linear, Dropout
from .ops import (lora_linear_forward, lora_linear_backward, dora_norm, dora_linear_forward, dora_linear_backward,
                  ia3_forward, ia3_backward, adapter_block_forward, adapter_block_backward)


class LoraLinear(Linear):
    """y = x W + b + (alpha / r) * dropout(x) A^T B^T  in place of a Linear.
    It shares the base Linear's weight and bias (same arrays, same key); `lora_A` (C_in -> r) and
    `lora_B` (r -> C_out) are child Linears in torch's layout, so their keys are peft's
    (`<module>.lora_A.weight`, (r, C_in); `<module>.lora_B.weight`, (C_out, r)) whatever the base layout."""

    def __init__(self, base, r, alpha, dropout=0.0, use_rslora=False):
        Module.__init__(self)
        self.base_layer_type = type(base)
        self.torch_layout = base.torch_layout
        self.params, self.grads = base.params, base.grads  # the base's arrays, frozen or not
        self._base = (base,)  # the Linear it replaces (a tuple: not a child), put back by unwrap()
        c_in, c_out = base.params["weight"].shape
        dtype = base.params["weight"].dtype
        self.r, self.lora_alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r  # rsLoRA: alpha / sqrt(r)
        self.lora_dropout = Dropout(dropout)
        self.lora_A = Linear(c_in, r, bias=False, dtype=dtype, torch_layout=True)
        self.lora_B = Linear(r, c_out, bias=False, dtype=dtype, torch_layout=True)
        self.train(base.training)  # its dropout too: an adapter loaded into an eval model drops nothing

    def reset_lora(self, rng, init=True):
        """peft's init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(C_in), 1/sqrt(C_in)) (or N(0, 1/r)
        for "gaussian"), B = 0, so the adapted model starts equal to the base model."""
        a = self.lora_A.params["weight"]
        c_in = a.shape[0]
        if init == "gaussian":
            a[...] = rng.normal(0.0, 1.0 / self.r, a.shape)
        else:
            bound = 1.0 / math.sqrt(c_in)
            a[...] = rng.uniform(-bound, bound, a.shape)
        self.lora_B.params["weight"][...] = 0
        if init is False:  # peft: B at nn.Linear's default too (fan_in r), so the adapter is not a no-op
            bound = 1.0 / math.sqrt(self.r)
            self.lora_B.params["weight"][...] = rng.uniform(-bound, bound, self.lora_B.params["weight"].shape)

    def forward(self, x):  # (..., C_in) -> (..., C_out)
        xd = self.lora_dropout(x)  # x itself in eval mode or with p = 0
        y, self.cache = lora_linear_forward(x, self.params["weight"], self.params.get("bias"),
                                            self.lora_A.params["weight"], self.lora_B.params["weight"],
                                            self.scaling, None if xd is x else xd)
        return y

    def backward(self, dy):
        g = lora_linear_backward(dy, self.cache, "weight" in self.grads, "bias" in self.grads)
        dx, dw, dbias, da, db = g[:5]
        if len(g) == 6:  # the LoRA branch saw dropout(x)
            dx = dx + self.lora_dropout.backward(g[5])
        if dw is not None:
            self.add_grad("weight", dw)
        if dbias is not None:
            self.add_grad("bias", dbias)
        if "weight" in self.lora_A.grads:
            self.lora_A.add_grad("weight", da)
        if "weight" in self.lora_B.grads:
            self.lora_B.add_grad("weight", db)
        return dx

    def delta_weight(self):
        """(alpha / r) * a b in numlm's (C_in, C_out) layout: the update merge adds to W."""
        a, b = self.lora_A.params["weight"], self.lora_B.params["weight"]
        return mm(a, b) * a.dtype.type(self.scaling)

    def merged_weight(self):
        """W + s a b, the weight merge_and_unload leaves."""
        return self.params["weight"] + self.delta_weight()

    def unwrap(self, merge):
        """The Linear this one replaced (sharing its weight arrays); with merge, W <- merged_weight()."""
        if merge:
            self.params["weight"][...] = self.merged_weight()
        base = self._base[0]
        base.training = self.training
        return base


def plain_linear(m):
    """An ordinary Linear holding the arrays (and gradient arrays) of the module `m` replaced."""
    c_in, c_out = m.params["weight"].shape
    base = Linear(c_in, c_out, bias="bias" in m.params, dtype=m.params["weight"].dtype, torch_layout=m.torch_layout)
    base.params, base.grads = m.params, m.grads
    base.training = m.training
    return base


class Vector(Module):
    """One learned vector under a module's name: DoRA's `lora_magnitude_vector`, IA3's `ia3_l`
    (peft keeps them as `<name>.default.weight` / `<name>.default`; the file key is `<module>.<name>`)."""

    def __init__(self, shape, dtype):
        super().__init__()
        self.add_param("weight", np.ones(shape, dtype=dtype))


class DoraLinear(LoraLinear):
    """y = (m / n) (x W + s x a b) + b in place of a Linear (DoRA, Liu et al. 2024, as peft): LoRA plus a
    magnitude m per output feature (`lora_magnitude_vector`, (C_out,)), n = ||W + s a b|| per output
    feature, recomputed each forward and held constant by the backward. `fixed_norm`, when set, is
    used instead (the gradient checks set it through detached(): they hold n as the backward does)."""

    def __init__(self, base, r, alpha, dropout=0.0, use_rslora=False):
        super().__init__(base, r, alpha, dropout, use_rslora)
        self.lora_magnitude_vector = Vector(base.params["weight"].shape[1], base.params["weight"].dtype)
        self.fixed_norm = None

    def detached(self):
        """n, held at its value for a gradient check, as the backward holds it (peft detaches it)"""
        return {"fixed_norm": self.norm()}

    def norm(self):
        return dora_norm(self.params["weight"], self.lora_A.params["weight"], self.lora_B.params["weight"], self.scaling)

    def reset_lora(self, rng, init=True):
        """LoRA's init, then peft's m = ||W + s a b|| (= ||W|| when B = 0): the layer starts as the base."""
        super().reset_lora(rng, init)
        self.lora_magnitude_vector.params["weight"][...] = self.norm()

    def forward(self, x):
        xd = self.lora_dropout(x)
        n = self.norm() if self.fixed_norm is None else self.fixed_norm
        y, self.cache = dora_linear_forward(x, self.params["weight"], self.params.get("bias"),
                                            self.lora_A.params["weight"], self.lora_B.params["weight"],
                                            self.lora_magnitude_vector.params["weight"], n, self.scaling,
                                            None if xd is x else xd)
        return y

    def backward(self, dy):
        g = dora_linear_backward(dy, self.cache, "weight" in self.grads, "bias" in self.grads)
        dx, dw, dbias, da, db, dm = g[:6]  # g[6], the norm's gradient, is dropped: n is detached
        if len(g) == 8:  # the LoRA branch and x' W saw dropout(x)
            dx = dx + self.lora_dropout.backward(g[7])
        for m, name, d in ((self, "weight", dw), (self, "bias", dbias), (self.lora_A, "weight", da),
                           (self.lora_B, "weight", db), (self.lora_magnitude_vector, "weight", dm)):
            if d is not None and name in m.grads:
                m.add_grad(name, d)
        return dx

    def merged_weight(self):
        """W' = (m / n) (W + s a b) per output feature (peft's DoRA merge; n from the weights before it)."""
        g = self.lora_magnitude_vector.params["weight"] / self.norm()  # (C_out,)
        return (self.params["weight"] + self.delta_weight()) * g


class IA3Linear(Linear):
    """y = (x W + b) * l, or (x * l) W + b when `feedforward`, in place of a Linear (peft's IA3 Linear).
    It shares the base Linear's arrays and keys; `ia3_l` holds l in peft's file shape, (C_out, 1), or
    (1, C_in) for a feed-forward module."""

    def __init__(self, base, feedforward):
        Module.__init__(self)
        self.base_layer_type = type(base)
        self.torch_layout = base.torch_layout
        self.params, self.grads = base.params, base.grads
        c_in, c_out = base.params["weight"].shape
        self.feedforward = feedforward
        self.ia3_l = Vector((1, c_in) if feedforward else (c_out, 1), base.params["weight"].dtype)
        self.training = base.training

    def forward(self, x):  # (..., C_in) -> (..., C_out)
        l = self.ia3_l.params["weight"].reshape(-1)  # peft: ia3_l.flatten()
        y, self.cache = ia3_forward(x, self.params["weight"], self.params.get("bias"), l, self.feedforward)
        return y

    def backward(self, dy):
        dx, dw, dbias, dl = ia3_backward(dy, self.cache, "weight" in self.grads, "bias" in self.grads)
        if dw is not None:
            self.add_grad("weight", dw)
        if dbias is not None:
            self.add_grad("bias", dbias)
        if "weight" in self.ia3_l.grads:
            self.ia3_l.add_grad("weight", dl.reshape(self.ia3_l.params["weight"].shape))
        return dx

    def unwrap(self, merge):
        """The base Linear; with merge, W *= l per output feature and b *= l, or (feed-forward) W *= l
        per input feature, b unchanged (peft's IA3 merge)."""
        l = self.ia3_l.params["weight"].reshape(-1)
        if merge and self.feedforward:
            self.params["weight"] *= l[:, None]  # (C_in, C_out) rows: input features
        elif merge:
            self.params["weight"] *= l  # columns: output features
            if "bias" in self.params:
                self.params["bias"] *= l
        return plain_linear(self)


class Adapter(Module):
    """AdapterHub's bottleneck Adapter: adapter_down = [Linear(C, m), act] (key adapter_down.0),
    adapter_up = Linear(m, C); a = r + scaling * up(act(down(z))). Torch layout keys."""

    def __init__(self, C, m, config, dtype=np.float32):
        super().__init__()
        self.config = config
        self.adapter_down = ModuleList([Linear(C, m, dtype=dtype, torch_layout=True)])
        self.adapter_up = Linear(m, C, dtype=dtype, torch_layout=True)

    def reset(self, rng):
        """AdapterHub's init: "bert" = N(0, 0.02) weights, zero biases; "mam_adapter" = kaiming
        uniform down weight (a=sqrt(5)), zero up weight and zero biases."""
        d, u = self.adapter_down[0], self.adapter_up
        if self.config.init_weights == "mam_adapter":
            c_in = d.params["weight"].shape[0]
            d.params["weight"][...] = rng.uniform(-1 / math.sqrt(c_in), 1 / math.sqrt(c_in), d.params["weight"].shape)
            d.params["bias"][...] = 0
            u.params["weight"][...] = 0
            u.params["bias"][...] = 0
        else:
            for lin in (d, u):
                lin.params["weight"][...] = rng.normal(0.0, 0.02, lin.params["weight"].shape)
                lin.params["bias"][...] = 0

    def weights(self):
        d, u = self.adapter_down[0].params, self.adapter_up.params
        return {"wd": d["weight"], "bd": d["bias"], "wu": u["weight"], "bu": u["bias"]}

    def accumulate(self, g):
        for lin, w, b in ((self.adapter_down[0], "wd", "bd"), (self.adapter_up, "wu", "bu")):
            if "weight" in lin.grads:
                lin.add_grad("weight", g[w])
            if "bias" in lin.grads:
                lin.add_grad("bias", g[b])


class Adapters(Module):
    """The container AdapterHub puts after a sub-layer (`<path>.adapters.<name>`), holding one named
    adapter, and the step it takes the place of where the sub-layer's output h meets the residual x:
    out = LN(h + x) (post-LN; `ln` the block's LayerNorm) or h + x (pre-LN), with the bottleneck in
    between (adapter_block_forward). It fills a model's adapter slot."""

    def __init__(self, name, adapter):
        super().__init__()
        self.name = name  # any string without a dot, as torch's ModuleDict takes ("sst-2")
        self._held = (adapter,)  # a tuple: found only through children(), under `name`

    @property
    def adapter(self):
        return self._held[0]

    def children(self):
        return [(self.name, self.adapter)]

    def forward(self, h, x, ln=None):  # h, x: (B, T, C) -> (B, T, C)
        ad = self.adapter
        lnp = None if ln is None else (ln.params["weight"], ln.params["bias"], ln.eps)
        out, c = adapter_block_forward(h, x, lnp, ad.weights(), ad.config)
        self.cache = (c, ln)
        return out

    def backward(self, dout):  # -> dh, dx
        c, ln = self.cache
        ad = self.adapter
        dh, dx, g, dln = adapter_block_backward(dout, c, ad.config)
        ad.accumulate(g)
        if dln is not None:
            if "weight" in ln.grads:
                ln.add_grad("weight", dln[0])
            if "bias" in ln.grads:
                ln.add_grad("bias", dln[1])
        return dh, dx


class PromptEmbedding(Module):
    """peft's prompt encoder: one table `prompt_embeddings` (n, W); W = C for prompt tuning,
    L * 2 * C for prefix tuning. torch.nn.Embedding's init: N(0, 1)."""

    def __init__(self, n, width, dtype=np.float32):
        super().__init__()
        self.add_param("prompt_embeddings", np.zeros((n, width), dtype=dtype))

    def reset(self, rng):
        self.params["prompt_embeddings"][...] = rng.standard_normal(self.params["prompt_embeddings"].shape)
