"""The transformers side of every numlm model: class registry, outputs with transformers' field names,
the input checks every forward runs once at its entry, transformers' loss selection for sequence
classification, state dicts and gradients under transformers' keys and layouts (tied aliases
included), loading and saving checkpoints, transformers' initialisation, and the dropout generator."""
import dataclasses
import difflib
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..io import (read_config, config_text, load_safetensors, save_model_files, read_generation_config,
                  generation_config_text)
from ..io.hub import resolve as resolve_model  # a folder, or a Hub name through the Hugging Face cache
from ..nn import Module, Linear, Embedding, LayerNorm
from ..ops import (cross_entropy_forward, cross_entropy_backward, mse_forward, mse_backward,
                   bce_with_logits_forward, bce_with_logits_backward, IGNORE_INDEX)
from ..ops._check import ids_in_range

ARCHITECTURES = {}  # transformers architecture name -> numlm class


def register(cls):
    ARCHITECTURES[cls.__name__] = cls
    return cls


FIELDS = {"loss", "logits", "last_hidden_state", "pooler_output", "hidden_states", "attentions",
          "past_key_values", "mc_loss", "mc_logits", "lm_loss", "prediction_logits", "seq_relationship_logits",
          "mlm_loss", "nsp_loss", "mlm_positions", "start_logits", "end_logits",
          "sequences", "scores", "positions", "token_ids", "probs", "labels", "label_names"}


class ModelOutput(dict):
    """A dict whose keys are also attributes, named as transformers names them (loss, logits,
    last_hidden_state, pooler_output, hidden_states, attentions, ...). A field of transformers' that
    this forward did not produce reads as None (out.loss without labels); any other name is an
    AttributeError, so a typo is not silently None. Models leave absent fields out of the dict."""

    def __getattr__(self, name):
        if name in self:
            return self[name]
        if name in FIELDS:
            return None
        raise AttributeError(f"{type(self).__name__} has no field {name!r}; it has {sorted(self)}")

    def __setattr__(self, name, value):
        self[name] = value


def parse_dtype(dtype):
    try:
        dt = None if dtype is None else np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return dt


class PreTrainedModel(Module):
    """Subclasses set `config_class`, `base_model_prefix` (the backbone attribute, "bert" or
    "transformer"; empty for a bare backbone), build their modules in __init__, then call post_init()."""

    is_model = True  # Module.__call__: use_cache / output_attentions say what attention keeps
    config_class = None
    base_model_prefix = ""
    ignore_on_load = ()     # regexes of checkpoint keys dropped silently (old buffers)
    unused_on_load = ()     # regexes of checkpoint keys this class does not use (warned, not an error)
    generation_config = None  # generation_config.json's dict, read and saved with the folder
    can_generate = False      # a causal LM head: generate() runs it, generation_config.json is read

    def __init__(self, config, seed=0, dtype="float32", init=True):
        """Checks the config, builds the modules (build()), then, unless a containing model will, draws
        transformers' initial weights from `seed` and casts them to `dtype`."""
        super().__init__()
        if isinstance(config, dict):
            config = self.config_class.from_dict(config)
        if not isinstance(config, self.config_class):
            raise ValueError(f"config must be a {self.config_class.__name__} or a dict, got {type(config).__name__}")
        if not (seed is None or isinstance(seed, np.random.SeedSequence)
                or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0)):
            raise ValueError(f"seed must be an integer >= 0 (or None, or a numpy SeedSequence), got {seed!r}")
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
        self._check_tied_pairs(state)
        given, bad = [], []
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
            given.append((m, k, a.T if t else a))
        if bad:  # before any tensor is copied: a refused state dict leaves the model as it was
            raise ValueError("checkpoint tensors with the wrong shape: " + "; ".join(bad))
        for m, k, a in given:
            m.params[k][...] = a
        return missing, unexpected

    def _check_tied_pairs(self, state):
        """A tied pair stored under both its keys holds one array: numlm keeps one of them, and two different
        ones (transformers then unties the pair) are refused by name."""
        for alias, source in self.tied.items():
            if alias in state and source in state and np.shape(state[alias]) != np.shape(state[source]):
                raise ValueError(f"the checkpoint stores the tied pair {source} and {alias} with different shapes "
                                 f"{np.shape(state[source])} and {np.shape(state[alias])}")
            if alias in state and source in state and not np.array_equal(np.asarray(state[alias]),
                                                                         np.asarray(state[source]), equal_nan=True):
                untie = (": from_pretrained(..., tie_word_embeddings=False) gives the head its own"
                         if alias == "lm_head.weight" else "")
                raise ValueError(f"the checkpoint stores the tied pair {source} and {alias} with different "
                                 f"values; {type(self).__name__} ties them{untie}")

    def _alias_for(self, key, state):
        """The array the checkpoint stores under an alias of `key` (either key of a tied pair loads), or None."""
        for alias, source in self.tied.items():
            if source == key and alias in state:
                return state[alias]
        return None

    # ---- checkpoints --------------------------------------------------------------------------
    @classmethod
    def from_config_dict(cls, cfg, **overrides):
        """The config of a config.json's dict and overrides; one that is not a field, nor a key of the file,
        is kept as transformers keeps it (id2label ...), but refused when it misspells a field"""
        fields = sorted({f.name for f in dataclasses.fields(cls.config_class)} - {"extra"})
        names = overrides.get("id2label")
        if isinstance(names, dict) and overrides.get("num_labels", len(names)) != len(names):
            raise ValueError(f"num_labels={overrides['num_labels']} but id2label names {len(names)} labels")
        if isinstance(names, dict):  # transformers: the labels named are the labels
            overrides = {"num_labels": len(names), "label2id": {v: label_id(k) for k, v in names.items()}, **overrides}
        for k in sorted(set(overrides) - set(fields) - set(cfg)):
            near = ["dtype"] if k == "torch_dtype" else difflib.get_close_matches(k, fields, n=1, cutoff=0.85)
            if near:
                raise ValueError(f"unknown argument {k!r}: {cls.config_class.__name__} has no such field; "
                                 f"did you mean {near[0]!r}?")
        return cls.config_class.from_dict({**cfg, **overrides})

    @classmethod
    def from_pretrained(cls, path, dtype="float32", seed=0, revision=None, **config_overrides):
        """Load a transformers model directory (config.json + model.safetensors or shards), or a Hub name
        through the Hugging Face cache (numlm.io.hub), into this class. Head weights the checkpoint lacks
        are initialised (seeded) with a warning naming them; any other missing, unexpected or wrongly
        shaped tensor is an error listing them."""
        dtype = parse_dtype(dtype)
        given, path = str(path), resolve_model(path, revision)
        config = cls.from_config_dict(read_config(path), **config_overrides)
        model = cls(config, seed=seed, dtype=dtype)  # built in dtype: a float64 file loads bit for bit
        model._load_checkpoint(load_safetensors(path), path)
        if cls.can_generate:  # generate's default token ids, when given
            model.generation_config = read_generation_config(path)
        model.config._name_or_path = given  # transformers' name_or_path: an adapter's base_model_name_or_path
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
        text = config_text(cfg)  # a config JSON cannot hold is refused before anything is written
        gen = generation_config_text(self.generation_config)
        save_model_files(path, state, text, gen, max_shard_bytes)  # all renamed in together

    # ---- the forward/backward contract --------------------------------------------------------
    def objective(self, out):
        """The scalar that backward() with no argument differentiates, from this forward's output
        (out.loss; the double-heads models and L3 classification override it). None without labels."""
        return out.loss

    def _need_last(self, backward=True):
        if self._last is None:
            raise ValueError("backward() needs a forward pass first")
        if backward and getattr(self, "called_under_no_grad", False):
            raise ValueError(f"{type(self).__name__}.backward: the last forward ran under numlm.no_grad() "
                             "and kept no cache; run it again outside no_grad() to differentiate")
        return self._last


def label_id(key):
    """An id2label key as the label id transformers makes of it (int(key)): an integer >= 0, or its decimal
    text; any other key (a name, a float, a number of more than 18 digits) is refused naming it"""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and 0 <= key < 10 ** 18:
        return int(key)
    if isinstance(key, str) and re.fullmatch(r"\s*\d{1,18}\s*", key):
        return int(key)
    shown = (f"{key[:12]!r}... ({len(key)} characters)" if isinstance(key, str) and len(key) > 24
             else "an integer of more than 18 digits" if isinstance(key, int) and abs(key) >= 10 ** 18 else repr(key))
    raise ValueError(f"id2label key {shown} is not a label id (an integer 0..num_labels-1, or its text)")


def from_pretrained(path, dtype="float32", revision=None, **kwargs):
    """Load any supported transformers checkpoint, choosing the class from config.json's `architectures`.
    `path`: a model folder, or a Hugging Face Hub name ("org/name") resolved through its cache
    (numlm.io.hub: huggingface_hub, HF_HOME, HF_HUB_OFFLINE; `revision` a branch, tag or commit)."""
    given, path = str(path), resolve_model(path, revision)
    cfg = read_config(path)
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            model = ARCHITECTURES[a].from_pretrained(path, dtype=dtype, **kwargs)
            model.config._name_or_path = given  # the folder or Hub name as given
            return model
    raise ValueError(f"config.json of {str(path)!r} names architectures {archs}; numlm supports "
                     f"{sorted(ARCHITECTURES)}")


# ---- input checks: every bad argument becomes a ValueError naming it, once, at the forward's entry ----

class Inputs(NamedTuple):
    """A forward's checked inputs, as the math below the entry reads them."""
    ids: object          # (B, T) int64, or None with inputs_embeds
    embeds: object       # (B, T, C) in the model's dtype, or None
    mask: object         # (B, T_past + T) bool, or None when nothing is masked
    token_types: object  # (B, T) int64 or None
    pos: np.ndarray      # (B, T) or (1, T) int64 positions
    past: object         # per-layer (k, v) (B, H, T_past, D), or None
    past_len: int
    labels: object       # checked language-model labels in the caller's shape, or None
    shape: tuple         # input_ids' own shape: (B, T), or (B, N, T) for multiple choice
    B: int               # rows the decoder runs (B * N for multiple choice)
    T: int


def as_ids(name, x):
    """Token ids, labels or positions as int64; anything not integer is refused naming `name`."""
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {x.dtype}")
    if x.dtype.kind == "u" and x.size and x.max() > np.iinfo(np.int64).max:  # int64 would wrap it negative
        raise ValueError(f"{name} must lie below 2**63, got {int(x.max())}")
    return x.astype(np.int64, copy=False)


def labels_like(name, labels, shape, n, allow=IGNORE_INDEX):
    """Integer labels of `shape` in [0, n) (or the ignore index), as int64."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu" and labels.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {labels.shape}")
    return ids_in_range(name, labels, n, allow=allow).astype(np.int64, copy=False)


def lm_labels(labels, shape, V, name="labels"):
    """Language-model labels: the shape of input_ids, ids in [0, V) or -100 (ignored)."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu" and labels.shape != tuple(shape):
        raise ValueError(f"{name} must have the shape of input_ids {tuple(shape)}, got {labels.shape}")
    return ids_in_range(name, labels, V, allow=IGNORE_INDEX).astype(np.int64, copy=False)


def padding_mask(attention_mask, want, note):
    """A 0/1 (or bool) mask of shape `want` as bool, or None when nothing is masked."""
    if attention_mask is None:
        return None
    m = np.asarray(attention_mask)
    if m.shape != want:
        raise ValueError(f"attention_mask must have shape {want}{note}, got {m.shape}")
    if m.dtype != np.bool_ and not ((m == 0) | (m == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    m = m.astype(bool)
    return None if m.all() else m


def token_inputs(input_ids, inputs_embeds, dtype, C, ndims):
    """(input_ids' shape, ids or None, inputs_embeds or None): exactly one of the two is given."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is not None:
        e = np.asarray(inputs_embeds)
        if e.ndim - 1 not in ndims or e.shape[-1] != C or e.shape[-2] == 0 or e.size == 0:
            raise ValueError(f"inputs_embeds must have shape (B, T, {C}) with T >= 1, got {e.shape}")
        if e.dtype.kind != "f":
            raise ValueError(f"inputs_embeds must be floating point, got dtype {e.dtype}")
        return e.shape[:-1], None, e.astype(dtype, copy=False)
    ids = np.asarray(input_ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must hold integers, got dtype {ids.dtype}")
    if ids.ndim not in ndims or ids.shape[-1] == 0 or ids.size == 0:
        want = " or ".join({2: "(B, T)", 3: "(B, num_choices, T)"}[n] for n in ndims)
        raise ValueError(f"input_ids must have shape {want} with T >= 1, got {ids.shape}")
    if ids.dtype.kind == "u" and ids.max() > np.iinfo(np.int64).max:  # int64 would wrap it negative
        raise ValueError(f"input_ids must lie below 2**63, got {int(ids.max())}")
    return ids.shape, ids.astype(np.int64, copy=False), None


def past_like(past, L, B, H, D, dtype):
    """past_key_values: L (key, value) pairs (B, H, T_past, D) of the model's dtype -> T_past."""
    if not isinstance(past, (tuple, list)) or len(past) != L:
        raise ValueError(f"past_key_values must be a tuple of {L} (key, value) pairs, got "
                         f"{type(past).__name__} of length {len(past) if hasattr(past, '__len__') else '?'}")
    lengths = set()
    for i, kv in enumerate(past):
        if not isinstance(kv, (tuple, list)) or len(kv) != 2:
            raise ValueError(f"past_key_values[{i}] must be a (key, value) pair")
        for name, a in zip(("key", "value"), kv):
            if not isinstance(a, np.ndarray) or a.ndim != 4 or a.shape[:2] != (B, H) or a.shape[3] != D:
                raise ValueError(f"past_key_values[{i}] {name} must have shape (B, H, T_past, D) = "
                                 f"({B}, {H}, T_past, {D}), got {getattr(a, 'shape', type(a).__name__)}")
            if a.dtype != dtype:
                raise ValueError(f"past_key_values[{i}] {name} has dtype {a.dtype}, the model {dtype}")
            lengths.add(a.shape[2])
            if len(lengths) > 1:
                raise ValueError(f"past_key_values[{i}] {name} has T_past={a.shape[2]}, layer 0 has "
                                 f"{past[0][0].shape[2]}")
    return lengths.pop()


def positions(position_ids, B, T, limit, shape, per_row=True):
    """Given positions (input_ids' `shape`, the (B, T) it runs as, (1, T) or (T,), as transformers takes them;
    any other shape, (B, 1, T) among them, is refused) checked in [0, limit): (B, T), or (1, T) when not
    per_row and shared. (Without them a model counts T_past .. T_past + T - 1 for every row.)"""
    pos = np.asarray(position_ids)
    accepted = list(dict.fromkeys([tuple(shape), (B, T), (1, T), (T,)]))
    if pos.dtype.kind in "iu" and pos.shape not in accepted:
        raise ValueError(f"position_ids must have shape {' or '.join(map(str, accepted))}, got {pos.shape}")
    pos = ids_in_range("position_ids", pos, limit).astype(np.int64, copy=False).reshape(-1, T)
    return np.broadcast_to(pos, (B, T)) if per_row else pos


def gpt_inputs(core, input_ids, attention_mask, token_type_ids, position_ids, past, inputs_embeds,
               labels=None, logits_to_keep=0, choices=False, flat=False, lm_coef=1.0):
    """GPT-1 / GPT-2 inputs -> Inputs. input_ids (B, T), or (B, N, T) for multiple choice (choices=True
    requires it, flat=True refuses it), run flattened to (B*N, T) as transformers."""
    cfg = core.config
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
    if logits_to_keep and labels is not None:
        raise ValueError("logits_to_keep needs labels=None: the loss uses the logits of every position")
    if isinstance(lm_coef, bool) or not isinstance(lm_coef, (int, float, np.integer, np.floating)) \
            or not np.isfinite(lm_coef):
        raise ValueError(f"lm_coef must be a finite number, got {lm_coef!r}")
    shape, ids, embeds = token_inputs(input_ids, inputs_embeds, core.wpe.params["weight"].dtype, cfg.n_embd,
                                      (3,) if choices else (2,) if flat else (2, 3))
    B, T = int(np.prod(shape[:-1])), shape[-1]
    if ids is not None:
        ids = ids_in_range("input_ids", ids.reshape(B, T), cfg.vocab_size)
    else:
        embeds = embeds.reshape(B, T, cfg.n_embd)
    past_len = 0 if past is None else past_like(past, cfg.n_layer, B, cfg.n_head, cfg.n_embd // cfg.n_head,
                                                 core.wpe.params["weight"].dtype)
    if past_len + T > cfg.n_positions:
        raise ValueError(f"sequence length {past_len + T} (past {past_len} + input_ids {T}) exceeds "
                         f"n_positions {cfg.n_positions}")
    mask = None if attention_mask is None else padding_mask(attention_mask, shape[:-1] + (past_len + T,),
                                                            f" (input_ids {shape}, past length {past_len})")
    if token_type_ids is not None:
        tt = np.asarray(token_type_ids)
        if tt.dtype.kind in "iu" and tt.shape != shape:
            raise ValueError(f"token_type_ids must have the shape of input_ids {shape}, got {tt.shape}")
        token_type_ids = ids_in_range("token_type_ids", tt, cfg.vocab_size).reshape(B, T)  # read in the token table
    pos = (np.broadcast_to(np.arange(past_len, past_len + T), (B, T)) if position_ids is None  # padding does not
           else positions(position_ids, B, T, cfg.n_positions, shape))           # shift them
    if labels is not None:  # language-model labels: input_ids' shape, in [0, V) or -100 (ignored)
        labels = np.asarray(labels)
        if labels.dtype.kind in "iu" and labels.shape != shape:
            raise ValueError(f"labels must have the shape of input_ids {shape}, got {labels.shape}")
        labels = ids_in_range("labels", labels, cfg.vocab_size, allow=IGNORE_INDEX).astype(np.int64, copy=False)
    return Inputs(ids, embeds, None if mask is None else mask.reshape(B, past_len + T), token_type_ids, pos,
                  past, past_len, labels, shape, B, T)


def bert_inputs(bert, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds=None, past=None):
    """BERT inputs -> Inputs (token types always set, positions (B, T) or (1, T)); a past (prefix tuning)
    puts T_past keys before the tokens' own, the mask covering T_past + T and positions from T_past.
    A position table with a padding row p (RoBERTa's, p = pad_token_id) counts positions as transformers'
    create_position_ids_from_input_ids: over the real tokens from p + 1, pads at p, so left padding does
    not shift them:  pos = (cumsum(ids != p) + T_past) * (ids != p) + p;  given inputs_embeds p + 1 .. p + T."""
    cfg = bert.config
    dtype = bert.embeddings.LayerNorm.params["weight"].dtype
    shape, ids, embeds = token_inputs(input_ids, inputs_embeds, dtype, cfg.hidden_size, (2,))
    B, T = shape
    past_len = 0 if past is None else past_like(past, cfg.num_hidden_layers, B, cfg.num_attention_heads,
                                                 cfg.hidden_size // cfg.num_attention_heads, dtype)
    p = bert.embeddings.position_embeddings.padding_idx
    first = 0 if p is None or position_ids is not None else p + 1  # the first real token's position
    if first + past_len + T > cfg.max_position_embeddings:
        raise ValueError(f"input_ids has sequence length {past_len + T}: positions up to {first + past_len + T - 1} "
                         f"exceed max_position_embeddings {cfg.max_position_embeddings}")
    if ids is not None:
        ids_in_range("input_ids", ids, cfg.vocab_size)
    tt = np.zeros((B, T), dtype=np.int64) if token_type_ids is None else np.asarray(token_type_ids)
    if tt.dtype.kind in "iu" and tt.shape != (B, T):
        raise ValueError(f"token_type_ids must have shape {(B, T)} like input_ids, got {tt.shape}")
    tt = ids_in_range("token_type_ids", tt, cfg.type_vocab_size).astype(np.int64, copy=False)
    if position_ids is not None:
        pos = positions(position_ids, B, T, cfg.max_position_embeddings, (B, T), per_row=False)
    elif p is None or ids is None:
        pos = np.arange(first + past_len, first + past_len + T)[None]  # (1, T): broadcast over B
    else:
        pos = (np.cumsum(ids != p, axis=1) + past_len) * (ids != p) + p  # (B, T), RoBERTa's count
    mask = None if attention_mask is None else padding_mask(
        attention_mask, (B, past_len + T), " like input_ids" if not past_len else
        f" (input_ids {shape}, past length {past_len})")
    return Inputs(ids, embeds, mask, tt, pos, past, past_len, None, shape, B, T)


def distilbert_inputs(model, input_ids, attention_mask, inputs_embeds=None, past=None):
    """DistilBERT inputs -> Inputs: no token types; positions 0 .. T-1 for every row (T_past .. after a
    past), whatever the padding."""
    cfg = model.config
    dtype = model.embeddings.LayerNorm.params["weight"].dtype
    shape, ids, embeds = token_inputs(input_ids, inputs_embeds, dtype, cfg.dim, (2,))
    B, T = shape
    past_len = 0 if past is None else past_like(past, cfg.n_layers, B, cfg.n_heads, cfg.dim // cfg.n_heads, dtype)
    if past_len + T > cfg.max_position_embeddings:
        raise ValueError(f"input_ids has sequence length {past_len + T} > max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    if ids is not None:
        ids_in_range("input_ids", ids, cfg.vocab_size)
    mask = None if attention_mask is None else padding_mask(
        attention_mask, (B, past_len + T), " like input_ids" if not past_len else
        f" (input_ids {shape}, past length {past_len})")
    return Inputs(ids, embeds, mask, None, np.arange(past_len, past_len + T)[None], past, past_len, None, shape, B, T)


def output_grads(grads, names, outputs):
    """Gradients handed to backward(grad): per output in `names`, None or an array of that output's shape
    (floating point, cast to its dtype). grads: one array, or a tuple with one entry per output."""
    grads = grads if isinstance(grads, tuple) else (grads,)
    if len(grads) > len(names):
        raise ValueError(f"backward(grad) takes d {names[0]} or a tuple of gradients of {names}, "
                         f"got {len(grads)} arrays")
    out = []
    for name, g, ref in zip(names, grads + (None,) * (len(names) - len(grads)), outputs):
        if isinstance(g, (tuple, list)):
            raise ValueError(f"gradient of {name} must be one array, got a {type(g).__name__}: each output's "
                             "gradient is its own argument (backward(grad, mc_grad))")
        if g is not None:
            g = np.asarray(g)
            if ref is None or g.shape != ref.shape:
                raise ValueError(f"gradient of {name} must have shape {getattr(ref, 'shape', None)}, got {g.shape}")
            if g.dtype.kind != "f":
                raise ValueError(f"gradient of {name} must be floating point, got dtype {g.dtype}")
            g = g.astype(ref.dtype, copy=False)
        out.append(g)
    return out


def no_loss(what):
    raise ValueError(f"backward() without a gradient needs a loss: call the model with {what}")


def logits_grad(grad, logits, loss, needs="labels"):
    """d logits for backward(grad): the given `grad` (checked), else d loss / d logits through the
    loss's (backward, cache) pair, or an error naming the arguments (`needs`) that give a loss."""
    if grad is not None:
        return output_grads(grad, ("logits",), (logits,))[0]
    if loss is None:
        no_loss(needs)
    backward, cache = loss
    return backward(1.0, cache).reshape(logits.shape)


PROBLEM_LOSSES = {"single_label_classification": (cross_entropy_forward, cross_entropy_backward),
                  "regression": (mse_forward, mse_backward),
                  "multi_label_classification": (bce_with_logits_forward, bce_with_logits_backward)}


def classification_labels(config, labels, B, dtype):
    """Sequence classification's labels, checked before the forward runs, and transformers' loss for them by
    config.problem_type (when unset: regression if K == 1, single-label for integer labels, else multi-label;
    then set to it: by a forward whose labels fit it, not by one refused):
        regression                  loss = MSE(logits, labels)            labels (B,) or (B, 1) if K == 1
        single_label_classification loss = CE(logits, labels)            labels (B,) in [0, K) or -100
        multi_label_classification  loss = BCE(sigmoid(logits), labels)  labels (B, K) in [0, 1]
    -> (labels as the loss takes them with logits (B, K), the loss's forward, its backward): forward(logits,
    labels) = loss, cache; backward(dloss, cache) = d logits"""
    K = config.num_labels
    labels = np.asarray(labels)
    kind = config.problem_type or ("regression" if K == 1 else "single_label_classification"
                                   if labels.dtype.kind in "iu" else "multi_label_classification")
    if kind == "single_label_classification":
        if labels.dtype.kind in "iu" and labels.shape != (B,):
            raise ValueError(f"labels must have shape {(B,)}, got {labels.shape}")
        y = ids_in_range("labels", labels, K, allow=IGNORE_INDEX)
    elif labels.dtype.kind not in "iuf":
        raise ValueError(f"labels must be numeric for {kind}, got dtype {labels.dtype}")
    elif not np.isfinite(labels).all():
        raise ValueError(f"labels for {kind} must be finite, got NaN or inf")
    elif kind == "regression":
        y, shapes = labels.astype(dtype), ((B,), (B, 1)) if K == 1 else ((B, K),)
        if y.shape not in shapes:
            raise ValueError(f"labels must have shape {' or '.join(map(str, shapes))} for regression, got {y.shape}")
        y = y.reshape(B, K)  # K == 1: MSE of (B, 1) logits and labels, the mean of transformers' squeezed pair
    else:
        y = labels.astype(dtype)
        if y.shape != (B, K):
            raise ValueError(f"labels must have shape {(B, K)} for multi_label_classification, got {y.shape}")
        if ((y < 0) | (y > 1)).any():
            raise ValueError("labels for multi_label_classification must lie in [0, 1]")
    config.problem_type = kind
    return (y, *PROBLEM_LOSSES[kind])
