"""The transformers side of every numlm model: class registry, outputs with transformers' field names,
state dicts and gradients under transformers' keys and layouts (tied aliases included), loading and
saving checkpoints, transformers' initialisation, and the dropout generator. No math here."""
import re
import warnings
from pathlib import Path

import numpy as np

from ..io import read_config, write_config, load_safetensors, save_safetensors
from ..nn import Module, Linear, Embedding, LayerNorm
from .checks import check_grad, no_loss
from .heads import loss_backward

ARCHITECTURES = {}  # transformers architecture name -> numlm class


def register(cls):
    ARCHITECTURES[cls.__name__] = cls
    return cls


class ModelOutput(dict):
    """A dict whose keys are also attributes, named as transformers names them (loss, logits,
    last_hidden_state, pooler_output, hidden_states, attentions, ...). Absent fields read as None."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)

    def __setattr__(self, name, value):
        self[name] = value


def parse_dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return dt


def head_output(logits, labels, loss):
    """ModelOutput(loss=loss(logits, labels) when labels are given, logits) and the losses list
    backward() differentiates: the common case of one head with one loss on `logits`."""
    out, losses = ModelOutput(), []
    if labels is not None:
        out.loss, cache = loss(logits, labels)
        losses.append(("logits", cache, 1.0))
    out.logits = logits
    return out, losses


class PreTrainedModel(Module):
    """Subclasses set `config_class`, `base_model_prefix` (the backbone attribute, "bert" or
    "transformer"; empty for a bare backbone), build their modules in __init__, then call post_init()."""

    config_class = None
    base_model_prefix = ""
    ignore_on_load = ()     # regexes of checkpoint keys dropped silently (old buffers)
    unused_on_load = ()     # regexes of checkpoint keys this class does not use (warned, not an error)

    def __init__(self, config, seed=0, dtype="float32", init=True):
        """Checks the config, builds the modules (build()), then, unless a containing model will, draws
        transformers' initial weights from `seed` and casts them to `dtype`."""
        super().__init__()
        if isinstance(config, dict):
            config = self.config_class.from_dict(config)
        if not isinstance(config, self.config_class):
            raise ValueError(f"config must be a {self.config_class.__name__} or a dict, got {type(config).__name__}")
        self.config = config
        self.tied = {}          # alias key -> source key (transformers' tied weights)
        self.rng = None
        self._last = None       # output and inputs of the last forward, for backward()
        self.build()
        if init:
            self.post_init(seed, dtype)

    def build(self):
        """The modules, under transformers' attribute names (subclasses)."""
        raise NotImplementedError

    # ---- construction -------------------------------------------------------------------------
    def post_init(self, seed=0, dtype=np.float32):
        self.init_weights(np.random.default_rng(seed))
        self.set_seed(seed)
        self.astype(parse_dtype(dtype))

    def init_weights(self, rng):
        """transformers' _init_weights: normal(0, initializer_range) matrices and embeddings, zero
        biases, LayerNorm 1 and 0, padding row of an embedding zero."""
        std = self.config.initializer_range
        for _, m in self.modules():
            if isinstance(m, Linear):
                m.params["weight"][...] = rng.normal(0.0, std, m.params["weight"].shape)
                if "bias" in m.params:
                    m.params["bias"][...] = 0
            elif isinstance(m, Embedding):
                m.params["weight"][...] = rng.normal(0.0, std, m.params["weight"].shape)
                if m.padding_idx is not None:
                    m.params["weight"][m.padding_idx] = 0
            elif isinstance(m, LayerNorm):
                m.params["weight"][...] = 1
                m.params["bias"][...] = 0

    def set_seed(self, seed):
        """One numpy Generator, shared by every dropout in the model, seeded with `seed`."""
        self.rng = np.random.default_rng(seed)
        for _, m in self.modules():
            if m is not self and hasattr(m, "rng"):
                m.rng = self.rng

    # ---- transformers-keyed views -------------------------------------------------------------
    def _slots(self):
        """{transformers key: (module, param name, transposed)} for every parameter (aliases excluded)."""
        out = {}
        for prefix, m in self.modules():
            for k in m.params:
                key = f"{prefix}.{k}" if prefix else k
                out[key] = (m, k, isinstance(m, Linear) and m.torch_layout and k == "weight")
        return out

    def _export(self, which):
        out = {}
        for key, (m, k, t) in self._slots().items():
            a = getattr(m, which).get(k)
            if a is not None:  # a frozen parameter has no gradient
                out[key] = a.T.copy() if t else a.copy()
        for alias, source in self.tied.items():
            if source in out:
                out[alias] = out[source]
        return out

    def state_dict(self):
        """{transformers state_dict key: copy} in transformers' layouts, tied aliases included.
        (numlm's own layout, the arrays themselves: parameters().)"""
        return self._export("params")

    def gradients(self):
        """{transformers state_dict key: gradient copy} of the trainable parameters in transformers' layouts,
        the mirror of state_dict(); a tied alias carries the total gradient of its source. (numlm's
        layout: grad_arrays().)"""
        return self._export("grads")

    def load_state_dict(self, state, strict=True):
        """Copy {transformers key: array} into the parameters (cast to the model's dtype).
        Returns (missing, unexpected) key lists; with strict=True either one is an error."""
        slots = self._slots()
        missing = sorted(k for k in slots if k not in state and self._alias_for(k, state) is None)
        unexpected = sorted(k for k in state if k not in slots and k not in self.tied)
        if strict and (missing or unexpected):
            raise ValueError(f"state dict does not match {type(self).__name__}: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        bad = []
        for key, (m, k, t) in slots.items():
            a = state.get(key)
            if a is None:
                a = self._alias_for(key, state)
            if a is None:
                continue
            a = np.asarray(a)
            want = m.params[k].shape[::-1] if t else m.params[k].shape
            if a.shape != want:
                bad.append(f"{key}: expected {want}, got {a.shape}")
                continue
            m.params[k][...] = a.T if t else a
        if bad:
            raise ValueError("checkpoint tensors with the wrong shape: " + "; ".join(bad))
        return missing, unexpected

    def _alias_for(self, key, state):
        """The array the checkpoint stores under an alias of `key` (either key of a tied pair loads), or None."""
        for alias, source in self.tied.items():
            if source == key and alias in state:
                return state[alias]
        return None

    # ---- checkpoints --------------------------------------------------------------------------
    @classmethod
    def from_config_dict(cls, cfg, **overrides):
        return cls.config_class.from_dict({**cfg, **overrides})

    @classmethod
    def from_pretrained(cls, path, dtype="float32", seed=0, **config_overrides):
        """Load a transformers model directory (config.json + model.safetensors or shards) into this
        class. Head weights the checkpoint lacks are initialised (seeded) with a warning naming them;
        any other missing, unexpected or wrongly shaped tensor is an error listing them."""
        dtype = parse_dtype(dtype)
        config = cls.from_config_dict(read_config(path), **config_overrides)
        model = cls(config, seed=seed, dtype=dtype)  # built in dtype: a float64 file loads bit for bit
        model._load_checkpoint(load_safetensors(path), path)
        return model.eval()

    def _is_head_key(self, key):
        p = self.base_model_prefix
        task = bool(p) and getattr(self, p, None) is not None  # a bare backbone has no head keys
        return (task and not key.startswith(p + ".")) or ".pooler." in key or key.startswith("pooler.")

    def _load_checkpoint(self, state, path):
        state = {k: v for k, v in state.items() if not any(re.search(r, k) for r in self.ignore_on_load)}
        slots = self._slots()
        p = self.base_model_prefix
        backbone = getattr(self, p, None) if p else None
        if p and backbone is not None:  # a task model: add the prefix to a bare backbone checkpoint
            if not any(k.startswith(p + ".") for k in state) and any(f"{p}.{k}" in slots for k in state):
                state = {(f"{p}.{k}" if f"{p}.{k}" in slots else k): v for k, v in state.items()}
        elif p:  # a bare backbone: strip the prefix of a task checkpoint, set its heads aside
            if any(k.startswith(p + ".") for k in state):
                heads = sorted(k for k in state if not k.startswith(p + "."))
                if heads:
                    warnings.warn(f"{type(self).__name__} does not use these weights of {str(path)!r}: {heads}")
                state = {k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p + ".")}
        missing = [k for k in slots if k not in state and self._alias_for(k, state) is None]
        unexpected = [k for k in state if k not in slots and k not in self.tied]
        unused = [k for k in unexpected if any(re.search(r, k) for r in self.unused_on_load)
                  or (p and backbone is not None and self._is_head_key(k))]
        unexpected = [k for k in unexpected if k not in unused]
        new = [k for k in missing if self._is_head_key(k)]
        missing = [k for k in missing if k not in new]
        if missing or unexpected:
            raise ValueError(f"checkpoint {str(path)!r} does not fit {type(self).__name__}: "
                             f"missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
        if unused:
            warnings.warn(f"{type(self).__name__} does not use these weights of {str(path)!r}: {sorted(unused)}")
        if new:
            warnings.warn(f"{type(self).__name__}: weights not in {str(path)!r} were newly initialised: "
                          f"{sorted(new)}")
        self.load_state_dict({k: v for k, v in state.items() if k in slots or k in self.tied}, strict=False)

    def save_pretrained(self, path, max_shard_bytes=None):
        """Write config.json and model.safetensors as transformers does (float32 unless the model is
        float64; tied aliases left out) so transformers' from_pretrained loads the directory."""
        path = Path(path)
        state = {k: v for k, v in self.state_dict().items() if k not in self.tied}
        cfg = self.config.to_dict()
        cfg["architectures"] = [type(self).__name__]
        cfg["dtype"] = str(self.dtype)
        save_safetensors(state, path, max_shard_bytes)
        write_config(cfg, path)

    # ---- the forward/backward contract --------------------------------------------------------
    outputs = ()        # task models: the differentiable outputs backward(grad) takes, in this order
    loss_inputs = ""    # task models: the arguments that give out.loss, named when backward() has none

    def objective(self, out):
        """The scalar that backward() with no argument differentiates, from this forward's output
        (out.loss; the double-heads models override it). None when the forward had no labels."""
        return out.loss

    def backward(self, grad=None):
        """Task models. grad None: d objective (every loss of the last forward, with its weight); else
        d outputs[0], or a tuple with one gradient (or None) per output in `outputs`."""
        out, losses = self._need_last()
        if grad is None:
            if not losses:
                no_loss(self.loss_inputs)
            d = {}
            for name, cache, weight in losses:  # objective = sum of weight * loss
                g = loss_backward(cache, weight)
                d[name] = g if name not in d else d[name] + g
        else:
            grads = grad if isinstance(grad, tuple) else (grad,)
            if len(grads) > len(self.outputs):
                raise ValueError(f"{type(self).__name__}.backward(grad) takes d {self.outputs[0]} or a tuple of "
                                 f"gradients of {self.outputs}, got {len(grads)} arrays")
            d = {k: check_grad(k, g, out[k]) for k, g in zip(self.outputs, grads) if g is not None}
        self.heads_backward(d)

    backbone_outputs = ()  # task models: the backbone's outputs they pass on, in transformers' order

    def _finish(self, out, losses, base):
        """Keep what backward() needs; the backbone's outputs go after the head's."""
        self._last = (out, losses)
        for k in self.backbone_outputs:
            if base.get(k) is not None:
                out[k] = base[k]
        return out

    def heads_backward(self, d):
        """{output name: its gradient} -> the heads' and the backbone's parameter gradients."""
        raise NotImplementedError

    def _need_last(self, backward=True):
        if self._last is None:
            raise ValueError("backward() needs a forward pass first")
        if backward and getattr(self, "called_under_no_grad", False):
            raise ValueError(f"{type(self).__name__}.backward: the last forward ran under numlm.no_grad() "
                             "and kept no cache; run it again outside no_grad() to differentiate")
        return self._last


def from_pretrained(path, dtype="float32", **kwargs):
    """Load any supported transformers checkpoint, choosing the class from config.json's `architectures`."""
    cfg = read_config(path)
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a].from_pretrained(path, dtype=dtype, **kwargs)
    raise ValueError(f"config.json of {str(path)!r} names architectures {archs}; numlm supports "
                     f"{sorted(ARCHITECTURES)}")
