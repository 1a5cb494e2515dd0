"""Where each method sits in numlm's models (the model's code is unchanged):

- LoRA: a LoraLinear takes the place of each targeted Linear (same weight arrays, same key).
- Bottleneck adapters: they fill the models' adapter slots (numlm.nn.add_residual), which replace
  the sub-layer junction `LN(h + x)` (BERT's attention.output / output, GPT-1's blocks) or `h + x`
  (GPT-2's blocks) with the adapter in between, under AdapterHub's keys.
- Prompt tuning: the word-embedding table is wrapped so the first n positions of the (B, n + T)
  input read the soft prompt instead of a token row (positions and token types are then the
  model's own, 0 .. n+T-1, as with transformers' inputs_embeds).
- Prefix tuning: each attention core is wrapped to put n learned keys/values before the real ones.
"""
import numpy as np

from ..models.bert_core import BertLayer, BertResidualOutput
from ..models.gpt_core import GPT2Block, OpenAIGPTBlock
from ..nn import Module, Attention, Embedding, split_heads, merge_heads
from .ops import prefix_attention_forward, prefix_attention_backward, prompt_backward
from .layers import Adapter, Adapters


def set_child(model, path, new):
    """Replace the module at dotted `path` of `model` by `new`."""
    parent_path, _, name = path.rpartition(".")
    parent = model
    for part in parent_path.split(".") if parent_path else []:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    if name.isdigit():
        parent.items[int(name)] = new
    else:
        setattr(parent, name, new)


# ---------------------------------------------------------------------------------------- adapters

class GPTAdapterSlot(Module):
    """`transformer.h.<i>.attention_adapters` / `output_adapters` (AdapterHub's GPT-2 names), which
    hold `adapters.<name>`; it fills the block's adapter slot of the same name."""

    def __init__(self, adapters):
        super().__init__()
        self.adapters = adapters

    def forward(self, h, x, ln=None):
        return self.adapters(h, x, ln)

    def backward(self, dout):
        return self.adapters.backward(dout)


def adapter_sites(model):
    """[(layer index, kind, module path)] of the places adapters go: kind "bert" (a BERT output module:
    "mh" for attention.output, "out" for output) or "gpt2" / "openai-gpt" (a block)."""
    sites = []
    for path, m in model.modules():
        if isinstance(m, BertLayer):
            i = int(path.rsplit(".", 1)[1])
            sites.append((i, "bert", path))
        elif isinstance(m, (GPT2Block, OpenAIGPTBlock)):
            i = int(path.rsplit(".", 1)[1])
            sites.append((i, "gpt2" if isinstance(m, GPT2Block) else "openai-gpt", path))
    return sites


def install_adapters(model, name, config, C, rng, dtype):
    """Put a bottleneck adapter named `name` after the sub-layers config asks for (mh_adapter,
    output_adapter), skipping the layers in leave_out. Returns {adapter path: Adapter}."""
    m = config.bottleneck(C)
    made = {}
    sites = adapter_sites(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no transformer layers to put adapters in")

    def new_adapter():
        ad = Adapter(C, m, config, dtype=dtype)
        ad.reset(rng)
        return ad

    for i, kind, path in sites:
        if i in config.leave_out:
            continue
        layer = _get(model, path)
        if kind == "bert":  # the slot of BertResidualOutput: LN(x + h) with the adapter in between
            for sub, flag in (("attention.output", config.mh_adapter), ("output", config.output_adapter)):
                if flag:
                    out = _get(layer, sub)
                    out.adapters = Adapters(name, new_adapter()).train(layer.training)
                    made[f"{path}.{sub}.adapters.{name}"] = out.adapters.adapter
        else:  # the block's attention_adapters / output_adapters slots
            for slot, flag in (("attention_adapters", config.mh_adapter), ("output_adapters", config.output_adapter)):
                if flag:
                    setattr(layer, slot, GPTAdapterSlot(Adapters(name, new_adapter())).train(layer.training))
                    made[f"{path}.{slot}.adapters.{name}"] = getattr(layer, slot).adapters.adapter
    if not made:
        raise ValueError("the adapter config puts no adapter anywhere (mh_adapter and output_adapter are "
                         "both off, or leave_out names every layer)")
    return made


def remove_adapters(model):
    """Empty every adapter slot: the model computes LN(x + h) / x + h again."""
    for _, m in list(model.modules()):
        if isinstance(m, BertResidualOutput):
            m.adapters = None
        elif isinstance(m, (GPT2Block, OpenAIGPTBlock)):
            m.attention_adapters = m.output_adapters = None


def _get(model, path):
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


# ---------------------------------------------------------------------------------------- prompts

class PromptedEmbedding(Embedding):
    """The word-embedding table with a soft prompt: while `prompt` is set, a (B, n + T) input's first
    n columns read prompt rows instead of token rows. Shares the table's arrays and key."""

    hands_grad_out = True

    def __init__(self, table):
        Module.__init__(self)
        self.padding_idx = table.padding_idx
        self.params, self.grads = table.params, table.grads
        self.training = table.training
        self.prompt = None      # the PromptEmbedding module while a prompted forward runs
        self.table = table

    def children(self):
        return []  # the table's parameters are this module's own

    def forward(self, ids):  # (B, n + T) -> (B, n + T, C)
        out = self.table.forward(ids)
        if self.prompt is None or ids.ndim != 2:
            self.cache = None
            return out
        p = self.prompt.params["prompt_embeddings"]  # (n, C)
        out[:, :p.shape[0]] = p  # prompt_forward: [prompt; emb]
        self.cache = self.prompt
        return out

    def backward(self, dout):
        if self.cache is None:
            return self.table.backward(dout)
        prompt = self.cache
        n = prompt.params["prompt_embeddings"].shape[0]
        demb, dprompt = prompt_backward(dout, n)
        if "weight" in self.table.grads:
            d = dout.copy()
            d[:, :n] = 0  # virtual positions read no token row
            self.table.backward(d)
        if "prompt_embeddings" in prompt.grads:
            prompt.grads["prompt_embeddings"] += dprompt
        del demb


def word_embedding_path(model):
    """Path of the token table (BERT word_embeddings, GPT-2 wte, GPT-1 tokens_embed)."""
    for suffix in ("embeddings.word_embeddings", "wte", "tokens_embed"):
        for path, m in model.modules():
            if (path == suffix or path.endswith("." + suffix)) and isinstance(m, Embedding):
                return path
    raise ValueError(f"{type(model).__name__} has no word-embedding table for prompt tuning")


# ---------------------------------------------------------------------------------------- prefixes

class PrefixAttention(Attention):
    """The attention core with n learned keys/values in front: K = [pk; k], V = [pv; v]; the padding
    mask gets n ones in front. `prefix` = (pk, pv) each (B, H, n, D) is set before each forward;
    after backward, `dprefix` holds (dpk, dpv)."""

    hands_grad_out = True

    def __init__(self, core):
        Module.__init__(self)
        self.__dict__.update({k: v for k, v in core.__dict__.items() if k not in ("params", "grads")})
        self.params, self.grads = core.params, core.grads
        self.core = core
        self.prefix = None      # (pk, pv) while a prefixed forward runs
        self.dprefix = None
        self._prefixed = False

    def children(self):
        return []

    def forward(self, q, k, v, attention_mask=None, past=None):
        self._prefixed = self.prefix is not None
        if not self._prefixed:
            return self.core.forward(q, k, v, attention_mask, past)
        if past is not None:
            raise ValueError("prefix tuning with a KV cache is not supported")
        q, k, v = (split_heads(t, self.n_head) for t in (q, k, v))  # (B, H, T, D)
        pk, pv = self.prefix
        B, n = q.shape[0], pk.shape[2]
        mask = np.ones((B, n + q.shape[2]), dtype=bool)
        if attention_mask is not None:
            am = np.asarray(attention_mask)
            if am.ndim != 2:
                raise ValueError("prefix tuning needs a (B, T) attention_mask")
            mask[:, n:] = am.astype(bool)
        p = self.dropout_p if self.training else 0.0
        out, cache = prefix_attention_forward(q, k, v, pk, pv, None if mask.all() else mask,
                                              self.causal, self.scale, self.causal_fill, p, self.rng)
        self.cache, self.probs = cache, cache[0].probs
        self.present = None
        return merge_heads(out)

    def backward(self, dout):
        if not self._prefixed:
            return self.core.backward(dout)
        dq, dk, dv, dpk, dpv = prefix_attention_backward(split_heads(dout, self.n_head), self.cache)
        self.dprefix = (dpk, dpv)
        return merge_heads(dq), merge_heads(dk), merge_heads(dv)


def attention_paths(model):
    return [p for p, m in model.modules() if isinstance(m, Attention)]


__all__ = ["set_child", "install_adapters", "remove_adapters", "PromptedEmbedding", "PrefixAttention",
           "word_embedding_path", "attention_paths"]
