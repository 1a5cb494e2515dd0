"""Where each method sits in numlm's models, each on a hook the model's own code has (no wrappers):

- LoRA: a LoraLinear takes the place of each targeted Linear (same weight arrays, same key).
- Bottleneck adapters: they fill the models' adapter slots, which replace the sub-layer junction
  `LN(h + x)` (BERT's attention.output / output, GPT-1's blocks) or `h + x` (GPT-2's blocks) with
  the adapter in between, under AdapterHub's keys.
- Prompt tuning: the model's inputs_embeds, [prompt; word(ids)] (numlm.peft.model).
- Prefix tuning: the model's past_key_values, n learned keys/values per layer (numlm.peft.model).
"""
from ..models.bert import BertLayer, BertResidualOutput
from ..models.gpt import GPTBlock
from ..models.distilbert import TransformerBlock
from ..nn import Module, Embedding
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
    "mh" for attention.output, "out" for output) or "gpt2" / "openai-gpt" / "distilbert" (a block)."""
    sites = []
    for path, m in model.modules():
        if isinstance(m, BertLayer):
            i = int(path.rsplit(".", 1)[1])
            sites.append((i, "bert", path))
        elif isinstance(m, GPTBlock):
            i = int(path.rsplit(".", 1)[1])
            sites.append((i, "gpt2" if m.pre_ln else "openai-gpt", path))
        elif isinstance(m, TransformerBlock):  # DistilBERT: the block's slots, as GPT-1's (post-LN)
            sites.append((int(path.rsplit(".", 1)[1]), "distilbert", path))
    return sites


def install_adapters(model, name, config, C, rng, dtype):
    """Put a bottleneck adapter named `name` after the sub-layers config asks for (mh_adapter,
    output_adapter), skipping the layers in leave_out. Returns {adapter path: Adapter}."""
    m = config.bottleneck(C)
    made = {}
    sites = adapter_sites(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no transformer layers to put adapters in")
    layers = sorted({i for i, _, _ in sites})
    if any(isinstance(i, bool) or not isinstance(i, int) or i not in layers for i in config.leave_out):
        raise ValueError(f"adapter leave_out {config.leave_out!r} must name layers of the model, {layers[0]} .. {layers[-1]}")

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
        elif isinstance(m, (GPTBlock, TransformerBlock)):
            m.attention_adapters = m.output_adapters = None


def _get(model, path):
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


# ---------------------------------------------------------------------------------------- hooks

def backbone(model):
    """The model's transformer (GPT) or bert, whose backward leaves inputs_embeds_grad and past_grads."""
    return getattr(model, model.base_model_prefix, None) or model


def word_embeddings(model):
    """The token table (BERT word_embeddings, GPT-2 wte, GPT-1 tokens_embed)."""
    core = backbone(model)
    table = core.embeddings.word_embeddings if hasattr(core, "embeddings") else core.wte
    if not isinstance(table, Embedding):
        raise ValueError(f"{type(model).__name__} has no word-embedding table for prompt tuning")
    return table


__all__ = ["set_child", "install_adapters", "remove_adapters", "word_embeddings", "backbone"]
