"""Where each method sits in numlm's models, by module replacement (the model's code is unchanged):

- LoRA: a LoraLinear takes the place of each targeted Linear (same weight arrays, same key).
- Bottleneck adapters: the sub-layer junction `LN(h + x)` (BERT's attention.output / output, GPT-1's
  blocks) or `h + x` (GPT-2's blocks) is rebuilt with the adapter in between, under AdapterHub's keys.
- Prompt tuning: the word-embedding table is wrapped so the first n positions of the (B, n + T)
  input read the soft prompt instead of a token row (positions and token types are then the
  model's own, 0 .. n+T-1, as with transformers' inputs_embeds).
- Prefix tuning: each attention core is wrapped to put n learned keys/values before the real ones.
"""
import numpy as np

from ..models.bert_core import BertLayer
from ..models.gpt_core import GPT2Block, OpenAIGPTBlock
from ..nn import Module, Attention, Embedding, split_heads, merge_heads
from .ops import prefix_attention_forward, prefix_attention_backward, prompt_backward
from .layers import Adapter, AdapterJunction, Adapters


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

class BottleneckLayer(Module):
    """AdapterHub's adapter layer: `adapters.<name>` is the Adapter; junction(h, x, ln) applies it
    where the sub-layer output h meets the residual x."""

    def _init_adapters(self, name, adapter):
        self.adapters = Adapters(name, adapter)
        self._junction = AdapterJunction(self.adapters)

    def junction(self, h, x, ln):
        return self._junction.forward(h, x, ln)

    def junction_backward(self, dout):
        return self._junction.backward(dout)

    def children(self):
        return [(k, v) for k, v in vars(self).items() if isinstance(v, Module) and k != "_junction"]


class GPTAdapterSlot(BottleneckLayer):
    """`transformer.h.<i>.attention_adapters` / `output_adapters` (AdapterHub's GPT-2 names)."""

    def __init__(self, name, adapter):
        super().__init__()
        self._init_adapters(name, adapter)


class AdaptedBertOutput(BottleneckLayer):
    """BERT's attention.output / output with an adapter: out = junction(Dropout(h W + b), x, LN)."""

    def __init__(self, orig, name, adapter):
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = orig.dense, orig.LayerNorm, orig.dropout
        self._init_adapters(name, adapter)
        self._orig = (orig,)  # a tuple: not a child
        self.training = orig.training

    def forward(self, h, x):  # h: (B, T, c_in), x: (B, T, C) -> (B, T, C)
        return self.junction(self.dropout(self.dense(h)), x, self.LayerNorm)

    def backward(self, dy):  # -> dh, dx
        dhh, dx = self.junction_backward(dy)
        return self.dense.backward(self.dropout.backward(dhh)), dx

    def unwrap(self):
        return self._orig[0]


class _AdaptedGPTBlock(Module):
    """A GPT block's own sub-layers (ln_1, attn, ln_2, mlp) with adapter junctions after attention
    and after the MLP (None: no adapter there), registered in the original block's order."""

    order = ("ln_1", "attn", "ln_2", "mlp")

    def __init__(self, orig, att, out):
        super().__init__()
        for name in self.order:
            setattr(self, name, getattr(orig, name))
        self.attention_adapters, self.output_adapters = att, out
        self._orig = (orig,)  # a tuple: not a child
        self.training = orig.training

    def unwrap(self):
        return self._orig[0]


class AdaptedGPT2Block(_AdaptedGPTBlock):
    """pre-LN with adapters: x1 = J_att(attn(ln_1(x)), x);  x2 = J_out(mlp(ln_2(x1)), x1),
    J = h + x without an adapter (AdapterHub passes no LayerNorm for GPT-2)."""

    def forward(self, x, attention_mask=None, past=None):
        h = self.attn(self.ln_1(x), attention_mask, past)
        x1 = x + h if self.attention_adapters is None else self.attention_adapters.junction(h, x, None)
        m = self.mlp(self.ln_2(x1))
        return x1 + m if self.output_adapters is None else self.output_adapters.junction(m, x1, None)

    def backward(self, dout):
        # x2 = J_out(m, x1), m = mlp(ln_2(x1)):  dx1 = dx1(J) + ln_2'(mlp'(dm))
        dm, dx1 = (dout, dout) if self.output_adapters is None else self.output_adapters.junction_backward(dout)
        dx1 = dx1 + self.ln_2.backward(self.mlp.backward(dm))
        # x1 = J_att(h, x), h = attn(ln_1(x)):  dx = dx(J) + ln_1'(attn'(dh))
        dh, dx = (dx1, dx1) if self.attention_adapters is None else self.attention_adapters.junction_backward(dx1)
        return dx + self.ln_1.backward(self.attn.backward(dh))


class AdaptedOpenAIGPTBlock(_AdaptedGPTBlock):
    """post-LN with adapters: n = J_att(attn(x), x, ln_1);  h = J_out(mlp(n), n, ln_2),
    J = LN(h + x) without an adapter."""

    order = ("attn", "ln_1", "mlp", "ln_2")

    def forward(self, x, attention_mask=None, past=None):
        a = self.attn(x, attention_mask, past)
        n = self.ln_1(x + a) if self.attention_adapters is None else self.attention_adapters.junction(a, x, self.ln_1)
        m = self.mlp(n)
        return self.ln_2(n + m) if self.output_adapters is None else self.output_adapters.junction(m, n, self.ln_2)

    def backward(self, dh):
        if self.output_adapters is None:  # h = ln_2(n + m)
            dm = dn = self.ln_2.backward(dh)
        else:
            dm, dn = self.output_adapters.junction_backward(dh)
        dn = dn + self.mlp.backward(dm)
        if self.attention_adapters is None:  # n = ln_1(x + a)
            da = dx = self.ln_1.backward(dn)
        else:
            da, dx = self.attention_adapters.junction_backward(dn)
        return dx + self.attn.backward(da)


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
        if kind == "bert":
            for sub, flag in (("attention.output", config.mh_adapter), ("output", config.output_adapter)):
                if flag:
                    ad = new_adapter()
                    orig = _get(layer, sub)
                    set_child(model, f"{path}.{sub}", AdaptedBertOutput(orig, name, ad))
                    made[f"{path}.{sub}.adapters.{name}"] = ad
        else:
            att = out = None
            if config.mh_adapter:
                att = GPTAdapterSlot(name, new_adapter())
                made[f"{path}.attention_adapters.adapters.{name}"] = att.adapters.adapter
            if config.output_adapter:
                out = GPTAdapterSlot(name, new_adapter())
                made[f"{path}.output_adapters.adapters.{name}"] = out.adapters.adapter
            cls = AdaptedGPT2Block if isinstance(layer, GPT2Block) else AdaptedOpenAIGPTBlock
            set_child(model, path, cls(layer, att, out))
    if not made:
        raise ValueError("the adapter config puts no adapter anywhere (mh_adapter and output_adapter are "
                         "both off, or leave_out names every layer)")
    return made


def remove_adapters(model):
    """Put the original modules back (their parameters are the ones the adapted modules used)."""
    for path, m in list(model.modules()):
        if isinstance(m, (AdaptedBertOutput, AdaptedGPT2Block, AdaptedOpenAIGPTBlock)):
            orig = m.unwrap()
            orig.train(m.training)
            set_child(model, path, orig)


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
        out, self.cache = prefix_attention_forward(q, k, v, pk, pv, None if mask.all() else mask,
                                                   self.causal, self.scale, self.causal_fill, p, self.rng)
        self.probs = self.cache[0].probs
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
