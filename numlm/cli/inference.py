"""`numlm generate`, `fill-mask`, `classify`, `tag` and `answer`: registered on the main parser by
add_parsers(subparsers). Each reads a model directory (numlm's own checkpoints or transformers directories
with a tokenizer), or an adapter folder on one."""
import sys

import numpy as np


def _load(model_dir, dtype, base=None):
    """(model, tokenizer) of a model directory, or of an adapter folder (adapter_config.json) on its
    base: `base`, else what adapter_config.json's base_model_name_or_path names (folders and Hub names both)."""
    from pathlib import Path
    from ..data.tokenizer import Tokenizer
    from ..io import nonfinite_tensors
    from ..io.hub import resolve
    from ..models import from_pretrained
    model_dir = resolve(model_dir)  # a folder, or a Hub name through the Hugging Face cache
    adapter = model_dir / "adapter_config.json"
    if not adapter.is_file():
        if base is not None:
            raise ValueError(f"--base goes with an adapter folder; {model_dir} has no adapter_config.json")
        model = from_pretrained(model_dir, dtype=dtype).eval()
        tok = Tokenizer.from_pretrained(model_dir)
    else:
        from ..peft import PeftModel
        from ..peft.files import read_json
        d = read_json(adapter)
        named = d.get("base_model_name_or_path") or d.get("model_name")  # peft's, else AdapterHub's
        if base is None and not named:
            raise ValueError(f"{model_dir} is an adapter whose adapter_config.json names no base model: give "
                             "its base model folder or Hub name with --base")
        if base is None:  # as the working directory or the adapter folder sees it, else a Hub name
            base = next((p for p in (Path(named), model_dir / named) if p.is_dir()), named)
        try:
            base = resolve(base)
        except ValueError as e:
            raise ValueError(f"{model_dir} is an adapter on {str(base)!r}, which does not load ({e}): give its "
                             "base model folder or Hub name with --base") from None
        model = PeftModel.from_pretrained(from_pretrained(base, dtype=dtype).eval(), model_dir).eval()
        tok = Tokenizer.from_dir(model_dir if (Path(model_dir) / "tokenizer.json").is_file() else base)
    # a PeftModel's parameters() are its trainable tensors only: check its file's, then its base's
    bad = nonfinite_tensors(model.parameters()) if not hasattr(model, "base_model") else \
        nonfinite_tensors(model.state_dict()) or nonfinite_tensors(model.base_model.parameters())
    if bad:  # every output would be NaN: no text, no scores
        raise ValueError(f"the weights in {model_dir} hold NaN or inf ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); they cannot run")
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer in {model_dir} has {tok.vocab_size} tokens, the model only "
                         f"{model.config.vocab_size}")
    return model, tok


class TextStreamer:
    """Prints the decoded text of row 0 as tokens arrive: decodes everything generated so far and
    writes only the new characters (byte-level BPE pieces join up across tokens)."""

    def __init__(self, tok, out=None, prefix=""):
        self.tok, self.out, self.ids, self.shown = tok, out or sys.stdout, [], ""
        self.prefix = prefix  # the prompt, written with the first token (after generate checked its input)

    def _start(self):
        if self.prefix:
            self.out.write(self.prefix)
            self.prefix = ""

    def put(self, tokens):
        self._start()
        self.ids.append(int(np.asarray(tokens).reshape(-1)[0]))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def end(self):
        self._start()
        text = self.tok.decode(self.ids)
        self.out.write(text[len(self.shown):] + "\n")
        self.out.flush()


def cmd_generate(a):
    from ..decoding import generate, generation_config
    model, tok = _load(a.model, a.dtype, a.base)
    ids = tok.encode(a.prompt, add_special_tokens=False)
    if not ids:
        raise ValueError("--prompt: the prompt encodes to no tokens")
    gen = generation_config(model)  # its ids first, then the tokenizer's (generate itself: then the config's)
    eos = next((e for e in (gen.get("eos_token_id"), tok.eos_id, getattr(model.config, "eos_token_id", None))
                if e is not None), None)
    kw = dict(max_new_tokens=a.max_new_tokens, num_beams=a.num_beams, eos_token_id=eos,
              pad_token_id=next((p for p in (gen.get("pad_token_id"), tok.pad_id) if p is not None), None),
              repetition_penalty=a.repetition_penalty)
    if model.config.vocab_size > tok.vocab_size:  # a padded table: its extra rows decode to nothing
        kw["suppress_tokens"] = np.arange(tok.vocab_size, model.config.vocab_size)
    if a.temperature is not None or a.top_k is not None or a.top_p is not None or a.sample:
        kw.update(do_sample=True, temperature=1.0 if a.temperature is None else a.temperature,
                  top_k=a.top_k, top_p=1.0 if a.top_p is None else a.top_p, seed=a.seed)
    if a.num_beams > 1:  # beams change until the end: print the winner
        out = generate(model, [ids], **kw)
        print(a.prompt + tok.decode(out[0, len(ids):]))
    else:
        generate(model, [ids], streamer=TextStreamer(tok, prefix=a.prompt), **kw)
    return 0


def cmd_fill_mask(a):
    from ..inference import fill_mask
    model, tok = _load(a.model, a.dtype)
    mask = tok.backend.id_to_token(tok.mask_id) if tok.mask_id is not None else "[MASK]"
    text = a.text.replace("<mask>", mask).replace("[MASK]", mask)  # either spelling, as the model's tokenizer has it
    for i, row in enumerate(fill_mask(model, tok, text, top_k=a.top_k)):
        if i:
            print()
        for r in row:
            print(f"{r['score']:.4f}  {r['token']:<15s} {r['sequence']}")
    return 0


LINE_BREAKS = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})  # a result's text kept on its line


def cmd_classify(a):
    from ..inference import classify
    model, tok = _load(a.model, a.dtype, a.base)
    for text, r in zip(a.texts, classify(model, tok, a.texts, pairs=a.pair)):
        print(f"{r['score']:.4f}  {r['label']:<15s} {text.translate(LINE_BREAKS)}")
    return 0


def cmd_tag(a):
    from ..inference import tag
    model, tok = _load(a.model, a.dtype, a.base)
    for e in tag(model, tok, a.text, aggregation_strategy=a.aggregation):
        label = e.get("entity_group", e.get("entity"))
        words = a.text[e["start"]:e["end"]].translate(LINE_BREAKS)
        print(f"{e['score']:.4f}  {label:<10s} {e['start']:>4d}:{e['end']:<4d} {words}")
    return 0


def cmd_answer(a):
    from ..inference import answer
    model, tok = _load(a.model, a.dtype, a.base)
    found = answer(model, tok, a.question, a.context, top_k=a.top_k, max_answer_len=a.max_answer_len,
                   max_seq_len=a.max_seq_len, doc_stride=a.doc_stride, handle_impossible_answer=a.allow_no_answer)
    for r in found if isinstance(found, list) else [found]:
        print(f"{r['score']:.4f}  {r['start']:>4d}:{r['end']:<4d} {r['answer'].translate(LINE_BREAKS)}")
    return 0


def _encoder_command(sub, name, help, model_help):
    """a subcommand's parser with what every encoder task takes: the model, --base, --dtype"""
    p = sub.add_parser(name, help=help)
    p.add_argument("model", help=model_help + " with its tokenizer, or an adapter folder on one")
    p.add_argument("--base", help="the adapter's base model directory or Hub name (default: the one its "
                                  "adapter_config.json names)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    return p


def add_task_parsers(sub):
    from .args import count
    c = _encoder_command(sub, "classify", "the label of each text (a sequence classifier)",
                         "a *ForSequenceClassification directory")
    c.add_argument("texts", nargs="+", help="one or more texts")
    c.add_argument("--pair", nargs="+", help="the second text of each pair (as many as texts)")
    c.set_defaults(fn=cmd_classify)
    t = _encoder_command(sub, "tag", "the entities of a text (a token classifier, transformers' ner pipeline)",
                         "a *ForTokenClassification directory")
    t.add_argument("text")
    t.add_argument("--aggregation", choices=["none", "simple", "first", "average", "max"], default="simple",
                   help="per token (none), or tokens grouped into entities (default: simple)")
    t.set_defaults(fn=cmd_tag)
    q = _encoder_command(sub, "answer", "the answer to a question in a context (extractive QA)",
                         "a *ForQuestionAnswering directory")
    q.add_argument("--question", required=True)
    q.add_argument("--context", required=True)
    q.add_argument("--top-k", type=count(1), default=1)
    q.add_argument("--max-answer-len", type=count(1), default=15, help="in tokens")
    q.add_argument("--max-seq-len", type=count(1), help="tokens a window holds (default: 384 or fewer, the "
                                                        "tokenizer's model_max_length and the model's positions)")
    q.add_argument("--doc-stride", type=count(0), help="tokens a window overlaps the one before by "
                                                        "(default: half a window, at most 128)")
    q.add_argument("--allow-no-answer", action="store_true", help="let the empty answer compete")
    q.set_defaults(fn=cmd_answer)


def add_parsers(sub):
    from .args import count, number, positive
    g = sub.add_parser("generate", help="generate text with a GPT model (KV cache), streaming it as it comes")
    g.add_argument("model", help="model directory (config.json, model.safetensors, tokenizer), or an adapter "
                                 "folder (peft / AdapterHub) on a GPT")
    g.add_argument("--base", help="the adapter's base model directory or Hub name (default: the one its "
                                  "adapter_config.json names)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=count(1), default=50)
    g.add_argument("--temperature", type=positive, help="sample at this temperature (default: greedy)")
    g.add_argument("--top-k", type=count(1), help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=number(0, 1, high_open=False), help="sample from the nucleus holding probability p")
    g.add_argument("--sample", action="store_true", help="sample (temperature 1) instead of greedy")
    g.add_argument("--num-beams", type=count(1), default=1)
    g.add_argument("--repetition-penalty", type=positive, default=1.0)
    g.add_argument("--seed", type=count(0), default=0)
    g.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    g.set_defaults(fn=cmd_generate)

    f = sub.add_parser("fill-mask", help="the most likely tokens for each [MASK] of a text (BERT)")
    f.add_argument("model", help="model directory (BertForMaskedLM / BertForPreTraining + tokenizer)")
    f.add_argument("text", help="text with one or more [MASK]")
    f.add_argument("--top-k", type=count(1), default=5)
    f.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    f.set_defaults(fn=cmd_fill_mask)
    add_task_parsers(sub)
