"""PeftModel: a numlm model with one parameter-efficient adapter, trained and saved as peft or
AdapterHub would, keyed as in their files.

    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))
    out = pm(input_ids=ids, attention_mask=mask, labels=y); pm.backward()
    pm.gradients()   # {key in adapter_model.safetensors: gradient}, trainable tensors only
"""
import copy
import re
import warnings
from pathlib import Path

import numpy as np

from ..io import check_folder_path
from ..models.pretrained import PreTrainedModel, as_ids
from ..nn import Linear
from ..ops._check import ids_in_range
from .config import (LoraConfig, IA3Config, PromptTuningConfig, PrefixTuningConfig, BnConfig, TASK_HEADS,
                     LORA_TARGETS, IA3_TARGETS, IA3_FEEDFORWARD)
from .layers import LoraLinear, DoraLinear, IA3Linear, PromptEmbedding
from .ops import prompt_forward, prompt_backward, prefix_forward, prefix_backward
from .placement import set_child, install_adapters, remove_adapters, word_embeddings, backbone
from . import files

# models whose labels are per token: prompt tuning prefixes them with n times -100
TOKEN_LABEL_CLASSES = ("GPT2LMHeadModel", "OpenAIGPTLMHeadModel", "BertForMaskedLM", "BertForTokenClassification",
                       "RobertaForMaskedLM", "RobertaForTokenClassification", "DistilBertForMaskedLM",
                       "DistilBertForTokenClassification")


def export_param(module, name):
    """A parameter in transformers' layout (nn.Linear weights transposed back to (C_out, C_in))."""
    a = module.params[name]
    return a.T.copy() if isinstance(module, Linear) and module.torch_layout and name == "weight" else a.copy()


def _import_params(slots, state):
    """Copy {key: transformers-layout array} into the parameters `slots` maps them to; a wrong shape is an
    error naming the key, raised before anything is copied."""
    todo = []
    for key, value in state.items():
        module, name = slots[key]
        p = module.params[name]
        t = isinstance(module, Linear) and module.torch_layout and name == "weight"
        want = p.shape[::-1] if t else p.shape
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":  # text or objects would fail (or turn NaN) part-way through the copy
            raise ValueError(f"adapter tensor {key!r} holds {value.dtype} values, not numbers")
        if value.shape != want:
            raise ValueError(f"adapter tensor {key!r} has shape {value.shape}, but the base model needs {want}")
        todo.append((p, value.T if t else value))
    for p, value in todo:
        p[...] = value


def _model_type(model):
    return getattr(model.config, "model_type", "")


def _matches(path, targets):
    """peft's rule: a list matches a module whose name is a target or ends with '.' + target;
    a string is a regex that must match the whole path."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _freeze_all(model):
    model.freeze()


class PeftModel:
    """A numlm model with one adapter. `base_model` is the numlm model itself, changed in place
    (LoRA linears, adapters, prompt table or prefix cores put in); everything not trained is frozen."""

    def __init__(self, model, config, adapter_name="default", seed=0):
        if not isinstance(model, PreTrainedModel):
            raise ValueError(f"model must be a numlm model, got {type(model).__name__}")
        if isinstance(model, PeftModel) or getattr(model, "_peft", None) is not None:
            raise ValueError("this model already carries an adapter")
        if not isinstance(config, (LoraConfig, IA3Config, PromptTuningConfig, PrefixTuningConfig, BnConfig)):
            raise ValueError(f"config must be a LoraConfig, IA3Config, PromptTuningConfig, PrefixTuningConfig, "
                             f"SeqBnConfig or DoubleSeqBnConfig, got {type(config).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without dots (a key part), got {adapter_name!r}")
        self.base_model = model
        self.peft_config = config
        self.adapter_name = adapter_name
        self.kind = config.peft_type
        self.library = "adapterhub" if isinstance(config, BnConfig) else "peft"
        self.prompt = None
        self._slots = {}      # file key -> (module, parameter name); the trainable tensors
        self._head_keys = set()
        self._head_root = {}  # head key -> the key prefix of the module peft wraps (a head's root)
        self._aliases = {}    # file key -> the file key of the same tensor (peft saves some twice)
        self._read_aliases = {}  # the same, as other peft versions spell them: read, never written
        self._originals = {}  # file key -> an untrained tensor peft saves too (a head's original_module)
        self._hub_head = {"config": None, "kept": []}  # AdapterHub: head_config.json, base tensors kept as equal
        self._last = None
        _check_task(model, self._task_type())
        self._before = {path: dict(m.grads) for path, m in model.modules()}  # what trained before
        given = copy.deepcopy(vars(config))  # installing fills in the model's sizes and default targets
        try:
            self._install(np.random.default_rng(seed), model.dtype)
        except BaseException:  # a refused target or config, or an interrupt: the model and config as they were
            self._restore()
            vars(config).clear()
            vars(config).update(given)
            raise
        model._peft = self

    def _install(self, rng, dtype):
        _freeze_all(self.base_model)
        if self.kind == "LORA":
            self._install_lora(rng)
        elif self.kind == "IA3":
            self._install_ia3(rng)
        elif self.kind in ("PROMPT_TUNING", "PREFIX_TUNING"):
            self._install_prompt(rng, dtype)
        else:
            self._install_bottleneck(rng, dtype)
        self._install_heads()
        if getattr(self.peft_config, "bias", "none") == "all":
            self._install_biases()
        for m, k in self._slots.values():  # the trainable tensors get their gradient arrays
            if k not in m.grads:
                m.grads[k] = np.zeros_like(m.params[k])

    # ---- installing -----------------------------------------------------------------------------
    def _task_type(self):
        return getattr(self.peft_config, "task_type", None)

    def _target_linears(self, targets, defaults):
        """[(path, Linear)] that `targets` names (peft's defaults for the model type when None), the task
        heads excluded; a matched module that is not a Linear is refused, as peft refuses it."""
        cfg, model = self.peft_config, self.base_model
        if targets is None:
            mt = _model_type(model)
            if mt not in defaults:
                raise ValueError(f"target_modules is None and numlm has no default for model type {mt!r}; "
                                 "name the modules")
            targets = sorted(defaults[mt])
        heads = set(TASK_HEADS.get(cfg.task_type, [])) | set(cfg.modules_to_save or [])
        named = [(p, m) for p, m in model.modules() if p and _matches(p, targets)  # nothing in a trained head
                 and not any(f".{h}." in f".{p}." for h in heads)]
        other = [(p, m) for p, m in named if not isinstance(m, Linear)]
        if other:
            raise ValueError(f"target_modules {targets!r} match {other[0][0]} ({type(other[0][1]).__name__}), "
                             f"not a Linear: {self.kind} adapts only Linear modules (nn.Linear, Conv1D)")
        linears = [(p, m) for p, m in model.modules() if isinstance(m, Linear)]
        if not named:
            names = sorted({p.rsplit(".", 1)[-1] for p, _ in linears})
            raise ValueError(f"target_modules {targets!r} match no Linear module of {type(model).__name__}; "
                             f"its Linear modules are named {names}")
        if isinstance(targets, list):
            # a target inside a trained head is skipped, as peft skips it, but it is no typo
            missing = [t for t in targets if not any(p == t or p.endswith("." + t) for p, _ in model.modules() if p)]
            if missing:  # as `numlm finetune --target` does: a name that matches nothing is a typo, not a no-op
                raise ValueError(f"target_modules {missing} match no module of {type(model).__name__}")
        for path, lin in named:  # peft's fan_in_fan_out follows the layer (one value for all)
            if not lin.torch_layout and not cfg.fan_in_fan_out:
                warnings.warn(f"{path} is a Conv1D (weight (C_in, C_out)): setting fan_in_fan_out=True, as peft does")
                cfg.fan_in_fan_out = True
            elif lin.torch_layout and cfg.fan_in_fan_out:
                warnings.warn(f"{path} is an nn.Linear: setting fan_in_fan_out=False, as peft does")
                cfg.fan_in_fan_out = False
        return targets, named

    def _install_lora(self, rng):
        cfg, model = self.peft_config, self.base_model
        targets, hit = self._target_linears(cfg.target_modules, LORA_TARGETS)
        cfg.target_modules = targets
        layer = DoraLinear if cfg.use_dora else LoraLinear
        for path, lin in hit:
            lora = layer(lin, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora)
            lora.reset_lora(rng, cfg.init_lora_weights)
            lora.lora_dropout.rng = model.rng
            set_child(model, path, lora)
            subs = ("lora_A", "lora_B") + (("lora_magnitude_vector",) if cfg.use_dora else ())
            for sub in subs:
                key = f"base_model.model.{path}.{sub}" + ("" if sub == "lora_magnitude_vector" else ".weight")
                self._slots[key] = (getattr(lora, sub), "weight")
            if cfg.bias != "none" and "bias" in lora.params:  # peft keys the target's bias under its base_layer
                self._slots[f"base_model.model.{path}.base_layer.bias"] = (lora, "bias")
        self._targets_hit = [p for p, _ in hit]

    def _install_ia3(self, rng):
        """peft's IA3: every target Linear rescaled (its output, or its input when it is a feed-forward
        module: a plain suffix match, so BERT's attention.output.dense counts), l = 1 at the start."""
        cfg = self.peft_config
        targets, hit = self._target_linears(cfg.target_modules, IA3_TARGETS)
        ff, mt = cfg.feedforward_modules, _model_type(self.base_model)
        if ff is None:  # peft: the model type's default, whether target_modules were given or not
            if mt not in IA3_FEEDFORWARD:
                raise ValueError(f"feedforward_modules is None and numlm has no default for model type {mt!r}")
            ff = sorted(IA3_FEEDFORWARD[mt])
        cfg.target_modules, cfg.feedforward_modules = targets, ff
        for path, lin in hit:
            is_ff = re.fullmatch(ff, path) is not None if isinstance(ff, str) else any(path.endswith(f) for f in ff)
            ia3 = IA3Linear(lin, is_ff)
            if cfg.init_ia3_weights is False:
                ia3.ia3_l.params["weight"][...] = rng.standard_normal(ia3.ia3_l.params["weight"].shape)
            set_child(self.base_model, path, ia3)
            self._slots[f"base_model.model.{path}.ia3_l"] = (ia3.ia3_l, "weight")
        self._targets_hit = [p for p, _ in hit]

    def _install_biases(self):
        """LoRA's bias="all": every parameter named *bias* trains (peft: `"bias" in name`), under its own
        key; a trained head's bias is saved twice more, as peft does: `<head>.modules_to_save.<sub>.bias` (the
        same tensor) and `<head>.original_module.<sub>.bias` (the base model's, untrained; read back by
        nobody), <sub> the module within the head peft wraps (none for a Linear head)."""
        taken = {id(m) for m, k in self._slots.values() if k == "bias"}
        for path, m in self.base_model.modules():
            for k in m.params:
                if "bias" not in k or not path or (id(m) in taken and k == "bias"):
                    continue
                self._slots[f"base_model.model.{path}.{k}"] = (m, k)
        for key in sorted(self._head_keys):
            m, k = self._slots[key]
            if "bias" in k:  # peft wraps the whole head: <head>.modules_to_save.<sub-module>.bias
                root = self._head_root[key]
                rest = key[len(root) + 1:]
                self._aliases[f"{root}.modules_to_save.{rest}"] = key
                if "." in rest:  # peft keeps the adapter name there since its state-dict refactor
                    for name in {"default", self.adapter_name}:
                        self._read_aliases[f"{root}.modules_to_save.{name}.{rest}"] = key
                self._originals[f"{root}.original_module.{rest}"] = m.params[k].copy()

    def _install_prompt(self, rng, dtype):
        cfg, model = self.peft_config, self.base_model
        c = model.config
        C, L, H = c.hidden_size, _layers(c), _heads(c)
        if wrong := [f"{k} {getattr(cfg, k)} (the model's {v})" for k, v in
                     (("token_dim", C), ("num_layers", L), ("num_attention_heads", H)) if getattr(cfg, k) not in (None, v)]:
            raise ValueError(f"the {self.kind} config does not fit {type(model).__name__}: {', '.join(wrong)}")
        cfg.token_dim, cfg.num_layers, cfg.num_attention_heads = C, L, H
        cfg.num_transformer_submodules = 1
        n = cfg.num_virtual_tokens
        if n >= c.max_tokens:
            raise ValueError(f"num_virtual_tokens {n} leaves no room in the position table "
                             f"({c.max_tokens} positions)")
        width = C if self.kind == "PROMPT_TUNING" else L * 2 * C
        if self.kind == "PREFIX_TUNING":
            cfg.encoder_hidden_size = C
        self.prompt = PromptEmbedding(n, width, dtype=dtype)
        self.prompt.reset(rng)
        self._slots["prompt_embeddings"] = (self.prompt, "prompt_embeddings")
        # the model's own hooks carry them: the prompt enters as inputs_embeds, the prefix as past_key_values
        self._word = word_embeddings(model)

    def _install_bottleneck(self, rng, dtype):
        model = self.base_model
        C = model.config.hidden_size
        made = install_adapters(model, self.adapter_name, self.peft_config, C, rng, dtype)
        for path, ad in made.items():
            for sub, lin in (("adapter_down.0", ad.adapter_down[0]), ("adapter_up", ad.adapter_up)):
                for k in lin.params:
                    self._slots[f"{path}.{sub}.{k}"] = (lin, k)

    def _install_heads(self):
        """The task head is trained for the new task (peft's modules_to_save per task type;
        AdapterHub: a classification / QA head on the model)."""
        model = self.base_model
        if self.library == "adapterhub":
            names = ["classifier", "score", "qa_outputs"]
        else:
            names = list(TASK_HEADS.get(self._task_type(), [])) + list(self.peft_config.modules_to_save or [])
            if self.peft_config.modules_to_save is None and names:
                self.peft_config.modules_to_save = list(TASK_HEADS.get(self._task_type(), []))
        prefix = {"LORA": "base_model.model.", "IA3": "base_model.model.", "adapterhub": ""}.get(
            "adapterhub" if self.library == "adapterhub" else self.kind, "base_model.")
        # peft's rule is key.endswith(name), no dot: DistilBERT's pre_classifier is a "classifier" too
        sep = "." if self.library == "adapterhub" else ""
        hit = [(p, m, [h for h in names if p == h or p.endswith(sep + h)]) for p, m in model.modules() if p]
        found = {h for _, _, hs in hit for h in hs}
        asked = [] if self.library == "adapterhub" else self.peft_config.modules_to_save or []
        if missing := [h for h in asked if h not in found and h not in TASK_HEADS.get(self._task_type(), [])]:
            raise ValueError(f"modules_to_save {missing} match no module of {type(model).__name__}")
        _refuse_tied(model, [p for p, _, hs in hit if hs])
        for path, head, hs in hit:
            if not hs:
                continue
            for sub, m in head.modules(f"{path}."):  # a head may be a module of modules (RoBERTa's classifier)
                m.unfreeze([k for k in m.params])
                for k in m.params:
                    key = f"{prefix}{sub}.{k}"
                    self._slots[key] = (m, k)
                    self._head_keys.add(key)
                    self._head_root.setdefault(key, f"{prefix}{path}")

    # ---- the forward/backward contract ----------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, labels=None, token_type_ids=None, position_ids=None,
                **kwargs):
        if args_given := [k for k in ("inputs_embeds", "past_key_values") if kwargs.get(k) is not None]:
            raise ValueError(f"{args_given} are not supported through a PeftModel")
        if input_ids is None:
            raise ValueError("input_ids are required")
        kw = dict(kwargs)
        if self.kind == "PROMPT_TUNING":
            return self._prompt_forward(input_ids, attention_mask, labels, token_type_ids, position_ids, kw)
        if self.kind == "PREFIX_TUNING":
            return self._prefix_forward(input_ids, attention_mask, labels, token_type_ids, position_ids, kw)
        for k, v in (("attention_mask", attention_mask), ("labels", labels), ("token_type_ids", token_type_ids),
                     ("position_ids", position_ids)):
            if v is not None:
                kw[k] = v
        out = self.base_model(input_ids, **kw)
        self._last = ("plain",)
        return out

    def _ids(self, input_ids):
        ids = as_ids("input_ids", input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, T) with prompt or prefix tuning, got {ids.shape}")
        ids_in_range("input_ids", ids, self._word.params["weight"].shape[0])
        n, P = self.peft_config.num_virtual_tokens, self.base_model.config.max_tokens
        if n + ids.shape[1] > P:
            raise ValueError(f"num_virtual_tokens {n} + {ids.shape[1]} tokens = {n + ids.shape[1]} exceed the "
                             f"position table ({P} positions)")
        return ids, n

    def _prompt_forward(self, input_ids, attention_mask, labels, token_type_ids, position_ids, kw):
        """peft: inputs_embeds = [prompt; word(ids)], mask prefixed with n ones, token types with n
        zeros, a causal LM's labels with n times -100; position ids are ignored (a warning)."""
        ids, n = self._ids(input_ids)
        B = ids.shape[0]
        if attention_mask is not None:
            kw["attention_mask"] = prefixed_mask(attention_mask, B, ids.shape[1], n)
        token_type_ids = self._ignored(token_type_ids)
        if token_type_ids is not None:
            kw["token_type_ids"] = prefixed("token_type_ids", token_type_ids, ids.shape, n, 0)
        if position_ids is not None:
            warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
        if labels is not None:
            if type(self.base_model).__name__ in TOKEN_LABEL_CLASSES:
                labels = prefixed("labels", labels, ids.shape, n, -100)
            kw["labels"] = labels
        if kw.get("lm_labels") is not None:  # GPT-1's L3 for classification: the virtual tokens predict nothing
            kw["lm_labels"] = prefixed("lm_labels", kw["lm_labels"], ids.shape, n, -100)
        word = self._word  # the token table: its cache (the ids) is the last forward's until the model takes these
        kept = word.cache, getattr(word, "called_under_no_grad", False)
        try:
            # e = [prompt; word(ids)]  (B, n + T, C)
            embeds, _ = prompt_forward(word(ids), self.prompt.params["prompt_embeddings"])
            out = self.base_model(inputs_embeds=embeds, **kw)
        except ValueError:  # refused: backward() still differentiates the last forward
            word.cache, word.called_under_no_grad = kept
            raise
        self._last = ("prompt", n)
        return out

    def _prefix_forward(self, input_ids, attention_mask, labels, token_type_ids, position_ids, kw):
        """peft: past_key_values from the prefix table, mask prefixed with n ones; the model counts the
        positions after the n prefix positions (given position ids are shifted by n)."""
        ids, n = self._ids(input_ids)
        B, T = ids.shape
        c = self.base_model.config
        past, pc = prefix_forward(self.prompt.params["prompt_embeddings"], B, _layers(c), _heads(c))
        mask = prefixed_mask(attention_mask, B, T, n)
        # without position_ids the model counts them after the past, as transformers (BERT, GPT: n .. n+T-1;
        # RoBERTa: its own count shifted by n)
        pos = None if position_ids is None else as_ids("position_ids", position_ids) + n
        token_type_ids = self._ignored(token_type_ids)
        for k, v in (("labels", labels), ("token_type_ids", token_type_ids), ("position_ids", pos)):
            if v is not None:
                kw[k] = v
        out = self.base_model(ids, attention_mask=mask, past_key_values=tuple(past), **kw)
        self._last = ("prefix", pc)
        return out

    def _ignored(self, token_type_ids):
        """peft's prompt learning drops token types for a causal LM or feature extraction, warning as it
        does (_adjust_prompt_learning_kwargs); returns the token types kept."""
        if token_type_ids is not None and self._task_type() in ("CAUSAL_LM", "FEATURE_EXTRACTION"):
            warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
            return None
        return token_type_ids

    def objective(self, out):
        return self.base_model.objective(out)

    def generation_inputs(self, ids, mask, pos, past):
        """What peft's generate feeds the base model at one decoding step, as keyword arguments:
        LoRA and adapters: the step's own. Prompt and prefix tuning: n virtual tokens before the
        prompt, so the mask gets n ones in front; prefix tuning's prefix is the first past, positions
        shifted by n; prompt tuning's prompt enters as inputs_embeds = [prompt; word(ids)] at the
        prefill, positions 0 .. n+T-1 and then the cache length (peft drops the position ids)."""
        if self.kind not in ("PROMPT_TUNING", "PREFIX_TUNING"):
            return dict(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past)
        B, n, c = len(ids), self.peft_config.num_virtual_tokens, self.base_model.config
        table = self.prompt.params["prompt_embeddings"]
        if mask is not None:
            mask = np.concatenate([np.ones((B, n), dtype=np.asarray(mask).dtype), mask], axis=1)
        if self.kind == "PREFIX_TUNING":
            if past is None:
                past = tuple(prefix_forward(table, B, _layers(c), _heads(c))[0])
            return dict(input_ids=ids, attention_mask=mask, position_ids=pos + n, past_key_values=past)
        if past is not None:
            start = past[0][0].shape[2]
            return dict(input_ids=ids, attention_mask=mask, position_ids=np.arange(start, start + ids.shape[1])[None],
                        past_key_values=past)
        embeds, _ = prompt_forward(self._word(ids), table)  # (B, n + T, C)
        return dict(inputs_embeds=embeds, attention_mask=mask, position_ids=np.arange(n + ids.shape[1])[None])

    def backward(self, grad=None):
        """d out.loss (or of the main output, given `grad`) into every trainable tensor."""
        if self._last is None:
            raise ValueError("backward() needs a forward pass first")
        self.base_model.backward(grad) if grad is not None else self.base_model.backward()
        kind, core = self._last[0], backbone(self.base_model)
        if kind == "prompt":  # e = [prompt; word(ids)]
            d_word, dprompt = prompt_backward(core_embeds_grad(core), self._last[1])
            if "weight" in self._word.grads:  # the token table trains too
                self._word.backward(d_word)
        elif kind == "prefix":  # past = view(prompt)
            dprompt = prefix_backward(core.past_grads, self._last[1])
        if kind != "plain" and "prompt_embeddings" in self.prompt.grads:
            self.prompt.add_grad("prompt_embeddings", dprompt)

    # ---- parameters, gradients ------------------------------------------------------------------
    def parameters(self):
        """{file key: array} of the trainable tensors (numlm's layout; what the optimizer updates)."""
        return {k: m.params[n] for k, (m, n) in self._slots.items() if n in m.grads}

    def grad_arrays(self):
        """{file key: gradient array}, the mirror of parameters()."""
        return {k: m.grads[n] for k, (m, n) in self._slots.items() if n in m.grads}

    trainable_parameters = parameters

    def gradients(self):
        """{key as in the adapter's safetensors file: gradient} (transformers' layout), trainable only."""
        out = {}
        for k, (m, n) in self._slots.items():
            if n in m.grads:
                g = m.grads[n]
                out[k] = g.T.copy() if isinstance(m, Linear) and m.torch_layout and n == "weight" else g.copy()
        for alias, source in self._aliases.items():
            if source in out:
                out[alias] = out[source].copy()
        return out

    def state_dict(self):
        """{file key: array} of the adapter (and trained head), transformers' layout; the keys peft
        writes twice (aliases) and the untrained tensors it writes too (originals) included."""
        out = {k: export_param(m, n) for k, (m, n) in self._slots.items()}
        out.update({alias: out[source].copy() for alias, source in self._aliases.items()})
        out.update({k: v.copy() for k, v in self._originals.items()})
        return out

    def _extra_keys(self, state):
        """Drop from `state` the keys peft writes but reads back nowhere: an alias must equal its source
        (else a ValueError naming it), an original is the base model's own tensor."""
        state = dict(state)
        for alias, source in {**self._aliases, **self._read_aliases}.items():
            if alias in state and source in state and not np.array_equal(state[alias], state[source]):
                raise ValueError(f"adapter tensor {alias!r} differs from {source!r}, the same tensor in peft's files")
            state.pop(alias, None)
        for k in self._originals:
            state.pop(k, None)
        return state

    def load_state_dict(self, state, strict=True):
        """Copy {file key: array} into the adapter; unknown keys and wrong shapes name the key."""
        state = self._extra_keys(state)
        unknown = sorted(k for k in state if k not in self._slots)
        missing = sorted(k for k in self._slots if k not in state)
        if unknown:
            raise ValueError(f"adapter key {unknown[0]!r} does not fit {type(self.base_model).__name__} with this "
                             f"adapter (unexpected keys {unknown})")
        if strict and missing:
            raise ValueError(f"adapter lacks keys {missing}")
        _import_params(self._slots, state)
        return missing, unknown

    def modules(self):
        """(dotted name, module) of the base model's tree and the prompt table (the Trainer finds
        the dropout generators here)."""
        yield from self.base_model.modules()
        if self.prompt is not None:
            yield "prompt_encoder", self.prompt

    def read_checkpoint(self, path):
        """{file key: array} of an adapter folder this PeftModel saved (the Trainer's checkpoints)."""
        path = Path(path)
        if self.library == "peft":
            return files.load_tensors(path / files.PEFT_WEIGHTS)
        state = files.load_tensors(path / files.HUB_WEIGHTS)
        if (path / files.HUB_HEAD).is_file():
            state.update(files.load_tensors(path / files.HUB_HEAD))
        return state

    def zero_grad(self):
        self.base_model.zero_grad()
        if self.prompt is not None:
            self.prompt.zero_grad()

    def train(self, mode=True):
        self.base_model.train(mode)
        if self.prompt is not None:
            self.prompt.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def rng(self):
        return self.base_model.rng

    @property
    def config(self):
        return self.base_model.config

    @property
    def dtype(self):
        return self.base_model.dtype

    def get_nb_trainable_parameters(self):
        """(trainable, all): all counts the base model's parameters and the adapter's."""
        trainable = sum(a.size for a in self.parameters().values())
        total = self.base_model.num_parameters() + (0 if self.prompt is None else self.prompt.num_parameters())
        return trainable, total

    def print_trainable_parameters(self):
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # ---- merging --------------------------------------------------------------------------------
    def merge_and_unload(self):
        """LoRA and IA3: the adapter merged into every adapted linear (LoRA W += s B A; DoRA
        W = (m / n) (W + s B A); IA3 W and b rescaled); returns the plain numlm model (the same object,
        its adapted linears replaced by ordinary Linears), trainable where it was before get_peft_model."""
        if self.kind not in ("LORA", "IA3"):
            raise ValueError(f"merge_and_unload needs a LoRA or IA3 adapter; this one is {self.kind} "
                             "(prompts, prefixes and bottleneck adapters have no weights to merge)")
        return self._unload(merge=True)

    def unload(self):
        """The base model without the adapter (LoRA not merged), trainable where it was before."""
        return self._unload(merge=False)

    def _restore(self):
        """Undo a failed install or load: the adapter out, the model's own freezing back."""
        self._unload(merge=False)

    def _unload(self, merge):
        """The adapter out; each module (by its path: IA3's unwrapped Linear is a new object) trains
        what it trained before get_peft_model, the model's own freezing kept."""
        model = self.base_model
        for path, m in list(model.modules()):
            if isinstance(m, (LoraLinear, IA3Linear)):
                set_child(model, path, m.unwrap(merge))
        remove_adapters(model)
        for path, m in model.modules():
            if path in self._before:
                m.grads.clear()
                m.grads.update(self._before[path])
        model._peft = None
        return model

    # ---- files ----------------------------------------------------------------------------------
    def save_pretrained(self, path):
        """The library's own files: peft's adapter_config.json + adapter_model.safetensors, or
        AdapterHub's adapter_config.json + adapter.safetensors (+ head_config.json + model_head.safetensors),
        renamed in together: a save that fails leaves the folder as it was. float32 unless the model is float64."""
        path = check_folder_path(path, "save_pretrained")
        state = self.state_dict()
        model = self.base_model
        if self.library == "peft":
            d = files.peft_config_to_dict(self.peft_config)
            d["inference_mode"] = True
            d["base_model_name_or_path"] = self.peft_config.base_model_name_or_path
            return files.write_files(path, {files.CONFIG: files.json_writer(d),
                                            files.PEFT_WEIGHTS: files.tensors_writer(state)})
        c = model.config
        head = {k: v for k, v in state.items() if k in self._head_keys}
        body = {k: v for k, v in state.items() if k not in self._head_keys}
        hub_head = self._hub_head
        if hub_head["kept"]:
            sd = model.state_dict()
            head.update({k: sd[k] for k in hub_head["kept"]})
        named = {files.CONFIG: files.json_writer({
            "config": files.hub_config_to_dict(self.peft_config), "hidden_size": c.hidden_size,
            "model_class": type(model).__name__, "model_name": getattr(c, "_name_or_path", None),
            "model_type": _model_type(model), "name": self.adapter_name, "version": files.ADAPTERS_VERSION}),
            files.HUB_WEIGHTS: files.tensors_writer(body)}
        if head:
            n = getattr(c, "num_labels", None)
            named[files.HUB_HEAD_CONFIG] = files.json_writer(hub_head["config"] or {
                "config": None, "hidden_size": c.hidden_size, "label2id": files.hub_label2id(c),
                "model_class": type(model).__name__, "model_name": None, "model_type": _model_type(model),
                "name": None, "num_labels": n, "version": files.ADAPTERS_VERSION})
            named[files.HUB_HEAD] = files.tensors_writer(head)
        return files.write_files(path, named)

    @classmethod
    def from_pretrained(cls, model, path, is_trainable=False, adapter_name=None):
        """Load a peft or an AdapterHub adapter folder onto `model` (a numlm model, changed in place).
        As peft: frozen for inference unless is_trainable=True."""
        if not isinstance(model, PreTrainedModel):  # before the files are read against its config
            raise ValueError(f"model must be a numlm model (numlm.from_pretrained(folder)), got {type(model).__name__}")
        kind = files.folder_kind(path)
        path, head, head_config = Path(path), {}, None
        where = str(path / files.CONFIG)
        d = files.read_json(path / files.CONFIG)
        if kind == "peft":
            config = files.peft_config_from_dict(d, where)
            name = adapter_name or "default"
            state = files.load_tensors(path / files.PEFT_WEIGHTS)
        else:
            config = files.hub_config_from_dict(d, where)
            mt = d.get("model_type")
            if mt is not None and mt != _model_type(model):
                raise ValueError(f"{where}: an adapter for model type {mt!r}, the base model is "
                                 f"{_model_type(model)!r}")
            if d.get("hidden_size") not in (None, model.config.hidden_size):
                raise ValueError(f"{where}: hidden_size {d.get('hidden_size')} does not match the base model's "
                                 f"{model.config.hidden_size}")
            name = adapter_name or d.get("name") or "default"
            state = files.load_tensors(path / files.HUB_WEIGHTS)
            if d.get("name") and name != d["name"]:  # adapter_name renames the keys' adapters.<name>.
                state = {k.replace(f".adapters.{d['name']}.", f".adapters.{name}."): v for k, v in state.items()}
            if (path / files.HUB_HEAD).is_file():
                head = files.load_tensors(path / files.HUB_HEAD)
                if (path / files.HUB_HEAD_CONFIG).is_file():
                    head_config = files.read_json(path / files.HUB_HEAD_CONFIG)
                    if not files.head_fits_class(head_config, type(model).__name__, path / files.HUB_HEAD_CONFIG):
                        head, head_config = {}, None
                state.update(head)
            elif (path / files.HUB_HEAD_PICKLE).is_file():
                raise ValueError(f"adapter folder {str(path)!r} holds its head only as a pickle "
                                 f"({files.HUB_HEAD_PICKLE}). " + files.CONVERT.format(
                                     src=path / files.HUB_HEAD_PICKLE, dst=path / files.HUB_HEAD))
        if getattr(config, "inference_mode", None) is not None:
            config.inference_mode = not is_trainable
        pm = cls(model, config, adapter_name=name)
        try:
            state = pm._static_head(state, head, head_config, path)
            pm._load_file_state(state, path)
        except BaseException:
            pm._restore()
            raise
        if head and head_config is not None:  # AdapterHub names the model's labels from the head's
            files.set_hub_labels(model.config, head_config)
        if not is_trainable:
            pm._freeze_adapter()
        return pm

    def _freeze_adapter(self):
        """For inference: every tensor the adapter trains (its own and the head's) without a gradient"""
        for m, n in self._slots.values():
            m.grads.pop(n, None)

    def _static_head(self, state, head, head_config, path):
        """AdapterHub's model_head.safetensors holds the model's own head when it is a static transformers
        head (GPT-2's lm_head). A tensor equal to the base model's is accepted (kept, and saved again); a
        different one is loaded where numlm has its own slot for it, and refused by name where numlm ties
        it to another tensor (the LM head to the token embedding). Returns `state` without the kept keys."""
        model = self.base_model
        sd = model.state_dict()
        slots = {k: (m, n) for k, (m, n, _) in model._slots().items()}
        self._hub_head = {"config": head_config, "kept": []}
        state = dict(state)
        for key in sorted(k for k in head if k not in self._slots and k in sd):
            a, b = np.asarray(head[key]), sd[key]
            low = np.float32 if np.float32 in (a.dtype, b.dtype) else np.float64
            if a.shape == b.shape and np.array_equal(a.astype(low), b.astype(low)):
                self._hub_head["kept"].append(key)
                state.pop(key)
            elif key in model.tied:
                raise ValueError(f"adapter {str(path)!r}: {files.HUB_HEAD} holds {key!r}, which differs from "
                                 f"the base model's {model.tied[key]!r} it is tied to; numlm keeps it tied, so "
                                 "this head cannot be loaded")
            else:  # numlm's own slot for it: loaded (and saved again) as the adapter's head
                self._slots[key] = slots[key]
                self._head_keys.add(key)
                m, n = slots[key]
                m.grads.setdefault(n, np.zeros_like(m.params[n]))
        return state

    def _load_file_state(self, state, path):
        state = self._extra_keys(state)
        unknown = sorted(k for k in state if k not in self._slots)
        if unknown:
            raise ValueError(f"adapter {str(path)!r}: key {unknown[0]!r} does not fit {type(self.base_model).__name__} "
                             f"(no such module or parameter{'; also ' + str(unknown[1:]) if unknown[1:] else ''})")
        optional = self._head_keys if self.library == "adapterhub" else set()  # peft needs its modules_to_save
        missing = sorted(k for k in self._slots if k not in state and k not in optional)
        if missing:
            raise ValueError(f"adapter {str(path)!r} lacks {missing[0]!r}, which {type(self.base_model).__name__} "
                             f"with this config needs ({len(missing)} missing)")
        _import_params(self._slots, state)


def _refuse_tied(model, paths):
    """A trained module holding one of a tied pair (GPT-2's wte and lm_head, BERT's word_embeddings and MLM
    decoder) is refused: peft trains an untied copy of it and keeps the other on the original table, which
    numlm's tied tensors cannot do."""
    for p in paths:
        for alias, source in model.tied.items():
            here, other = (alias, source) if alias.startswith(p + ".") else (source, alias)
            if here.startswith(p + "."):
                raise ValueError(
                    f"modules_to_save names {p}, whose {here.rsplit('.', 1)[-1]} numlm ties to {other}: peft trains "
                    f"an untied copy of {p} and leaves {other.rsplit('.', 1)[0]} on the original; numlm cannot train "
                    f"or load such an adapter (leave {p.rsplit('.', 1)[-1]} out of modules_to_save)")


def get_peft_model(model, config, adapter_name="default", seed=0):
    """Put the adapter `config` describes into `model` (changed in place) and freeze everything
    else but the task head; returns the PeftModel. The adapter is initialised as its library
    does (seeded): LoRA B = 0 and bottleneck adapters near zero start from the base model. A config
    with inference_mode=True gives a frozen adapter, as peft's does."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    rows = _text_init(model, config)  # before the model changes
    pm = PeftModel(model, config, adapter_name=adapter_name, seed=seed)
    if rows is not None:
        pm.prompt.params["prompt_embeddings"][...] = rows
    if getattr(config, "base_model_name_or_path", "") is None:  # as peft: the folder the model was loaded from
        config.base_model_name_or_path = getattr(model.config, "_name_or_path", None) or None
    if getattr(config, "inference_mode", False):
        pm._freeze_adapter()
    return pm


def _text_init(model, config):
    """peft's prompt_tuning_init="TEXT": the word embeddings of the init text's tokens (the tokenizer's
    special tokens included), repeated and cut to num_virtual_tokens, through float32 as peft casts them.
    None for a random init; SAMPLE_VOCAB (torch's random draw) is refused."""
    init = getattr(config, "prompt_tuning_init", "RANDOM")
    if init == "RANDOM" or not isinstance(model, PreTrainedModel):  # PeftModel refuses the latter
        return None
    if init != "TEXT":
        raise ValueError(f"prompt_tuning_init={init!r} is not supported by get_peft_model (numlm initialises "
                         "'RANDOM' or 'TEXT'); a folder made with it loads (the prompt is in its file)")
    if not config.tokenizer_name_or_path or not config.prompt_tuning_init_text or config.tokenizer_kwargs:
        raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path "
                         "(numlm takes no tokenizer_kwargs)")
    from ..data.tokenizer import Tokenizer
    ids = Tokenizer.from_pretrained(config.tokenizer_name_or_path).encode(config.prompt_tuning_init_text)
    table = word_embeddings(model).params["weight"]
    if not ids or max(ids) >= len(table):
        raise ValueError(f"prompt_tuning_init_text tokenizes to ids {ids}, which the model's "
                         f"{len(table)}-row token table does not hold")
    n = config.num_virtual_tokens
    ids = (ids * -(-n // len(ids)))[:n]
    return table[ids].astype(np.float32)


TASK_CLASSES = {"SEQ_CLS": "ForSequenceClassification", "TOKEN_CLS": "ForTokenClassification",
                "QUESTION_ANS": "ForQuestionAnswering", "CAUSAL_LM": "LMHeadModel"}


def _check_task(model, task_type):
    want = TASK_CLASSES.get(task_type)
    if want is not None and not type(model).__name__.endswith(want):
        raise ValueError(f"task_type {task_type} needs a *{want} model, got {type(model).__name__}")


def _layers(c):
    return getattr(c, "num_hidden_layers", None) or c.n_layer


def _heads(c):
    return getattr(c, "num_attention_heads", None) or c.n_head


def prefixed_mask(attention_mask, B, T, n):
    """[1 ... 1 (n); attention_mask]: the virtual tokens are always seen. None stays None (nothing masked)."""
    if attention_mask is None:
        return None
    m = np.asarray(attention_mask)
    if m.shape != (B, T):
        raise ValueError(f"attention_mask must have shape {(B, T)} like input_ids, got {m.shape}")
    return np.concatenate([np.ones((B, n), dtype=m.dtype), m], axis=1)


def prefixed(name, a, shape, n, fill):
    """[fill (n times); a] per row: a per-token input (B, T) with the virtual tokens' entries in front."""
    a = as_ids(name, a)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} like input_ids, got {a.shape}")
    return np.concatenate([np.full((shape[0], n), fill, dtype=np.int64), a], axis=1)


def core_embeds_grad(core):
    """d inputs_embeds of the last backward (GPT: the decoder's, BERT: its embeddings')"""
    return core.embeddings.inputs_embeds_grad if hasattr(core, "embeddings") else core.inputs_embeds_grad
