"""The `numlm` command: main, the parser and the pre-training commands here; one module per other
group of subcommands (finetune, inference, inspect, profile) and the argument types (args).
Every error, in any subcommand, reaches the user as one line `numlm <command>: error: <what>` with
exit code 2 (`--debug` adds the traceback); an interrupt (Ctrl-C or SIGTERM) exits 130."""
import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
import warnings

import numpy as np

from .args import count, number, path, positive  # noqa: F401  (subcommand modules import them from cli.args)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`numlm <command>: error: ...`, exit 2) and the command's name
    recorded for the errors raised while it runs."""

    def parse_known_args(self, args=None, namespace=None):
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace._prog = self.prog  # a subcommand's parser runs later and overrides this
        return super().parse_known_args(args, namespace)

    def error(self, message):
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


DEMO_OUT = "runs/demo"


def cmd_demo(a):
    """Train a byte-level BPE tokenizer and a small GPT-2 on Shakespeare (or Python's docs), then sample."""
    from ..recipes import pretrain, run_files
    overwrite = a.overwrite or a.out == DEMO_OUT
    if not overwrite and (earlier := run_files(a.out)):  # pretrain's refusal would offer --resume
        raise ValueError(f"{a.out!r} already holds a run ({', '.join(earlier)}); pass --overwrite to start "
                         f"the demo there, or another --out")
    t0 = time.perf_counter()
    model, tok, res = pretrain("gpt2", size="mini", data=a.data, vocab_size=a.vocab_size, out_dir=a.out,
                               block_size=128, batch_size=16, seed=a.seed, time_budget=a.minutes * 60,
                               lr=1e-3, overwrite=overwrite, encoding=a.encoding)
    if res.get("interrupted"):
        print(f"{a._prog}: interrupted", file=sys.stderr)
        return 130
    print(f"validation loss {res['initial']['val_loss']:.3f} -> {res['val_loss']:.3f} nats "
          f"(perplexity {res['initial']['val_ppl']:.0f} -> {res['val_ppl']:.1f}; unigram baseline "
          f"{res['unigram_loss']:.3f}); "
          f"{res['tokens']:,} tokens in {res['time']:.0f} s ({res['tokens'] / res['time']:,.0f} tokens/s)")
    print(f"model and tokenizer saved to {res['model_dir']}")
    _samples(model, tok, a.seed)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def _samples(model, tok, seed, prompts=("ROMEO:", "First Citizen:\n", "The king")):
    try:
        from ..decoding import generate
    except ImportError:
        return
    rng = np.random.default_rng(seed)
    model.eval()
    for p in prompts:
        ids = np.array([tok.encode(p)], dtype=np.int64)
        out = generate(model, ids, max_new_tokens=60, do_sample=True, top_k=40, temperature=0.8, rng=rng,
                       eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
        seqs = out.sequences if hasattr(out, "sequences") else out
        print("-" * 60)
        print(tok.decode(list(seqs[0]), skip_special_tokens=True))
    print("-" * 60)


def cmd_pretrain(a):
    from ..recipes import pretrain
    _, _, res = pretrain(a.arch, size=a.size, config_path=a.config, data=a.data, tokenizer_path=a.tokenizer,
                         vocab_size=a.vocab_size, out_dir=a.out, block_size=a.block_size,
                         batch_size=a.batch_size, steps=a.steps, lr=a.lr, warmup=a.warmup, seed=a.seed,
                         dtype=a.dtype, resume=a.resume, overwrite=a.overwrite, grad_accum=a.grad_accum,
                         time_budget=None if a.minutes is None else a.minutes * 60, encoding=a.encoding,
                         allow_changes=a.allow_changes)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=1))
    if res.get("interrupted"):
        print(f"{a._prog}: interrupted; --resume continues the run in {a.out}", file=sys.stderr)
        return 130
    return 0


def cmd_tokenizer_train(a):
    from pathlib import Path
    from ..data.tokenizer import save_paths
    from ..recipes import load_corpus, train_tokenizer
    files = [p for p in save_paths(a.out) if p is not None]  # tokenizer.json and its tokenizer_config.json
    if a.data is not None and Path(a.data).resolve() in {Path(p).resolve() for p in (a.out, *files)}:
        raise ValueError(f"--out {a.out!r} would overwrite the input --data {a.data!r}")
    if not a.overwrite and (held := [p.name for p in files if p.is_file()]):
        raise ValueError(f"--out {a.out!r} already holds {' and '.join(held)} (a model's or a run's tokenizer "
                         "goes with its weights); pass --overwrite to replace it")
    name, docs = load_corpus(a.data, a.encoding)
    tok = train_tokenizer("bert" if a.kind == "wordpiece" else "gpt2", docs, a.vocab_size)
    path = tok.save(a.out)
    print(f"{a.kind} tokenizer with {tok.vocab_size} tokens trained on {name}, saved to {path}")
    return 0


def cmd_prepare(a):
    from ..data import Tokenizer, prepare
    from ..data.pretrain import check_prepared_files
    from ..recipes import load_corpus
    check_prepared_files(a.out, [a.tokenizer] + [a.data] * (a.data is not None))
    tok = Tokenizer.from_file(a.tokenizer)
    if a.data is not None:  # streamed file by file: the corpus need not fit in memory
        name, meta = a.data, prepare(a.data, tok, a.out, encoding=a.encoding)
    else:
        name, docs = load_corpus(None)
        meta = prepare(docs, tok, a.out)
    print(f"{meta['length']:,} tokens from {meta['num_documents']} documents of {name} -> {a.out} ({meta['dtype']})")
    return 0


def cmd_eval(a):
    from ..models import from_pretrained
    from ..recipes import (load_corpus, eval_gpt, eval_bert, eval_seed, pretraining_run, eval_tokenizer,
                           trained_on_other_documents)
    model = from_pretrained(a.model, dtype=a.dtype)
    tok, where = eval_tokenizer(a.model)  # a folder, or a Hub name through the HF cache
    if tok.vocab_size != model.config.vocab_size:
        raise ValueError(f"the tokenizer in {where} has {tok.vocab_size} tokens, the model {model.config.vocab_size}")
    from ..decoding import has_lm_head
    if type(model).__name__ != "BertForPreTraining" and not has_lm_head(model):  # the causal path shifts labels
        raise ValueError(f"{a.model}: eval scores BertForPreTraining (MLM + NSP) or a causal LM, not "
                         f"{type(model).__name__}")
    positions = model.config.max_tokens
    if a.block_size > positions:
        raise ValueError(f"--block-size {a.block_size} is above the model's {positions} positions; pass "
                         f"--block-size {positions} or less")
    held_out = a.data is None  # the default corpus: the part pretrain holds out, not the text it trains on
    bert = type(model).__name__ == "BertForPreTraining"
    if not bert and a.seed is not None:  # it would do nothing
        raise ValueError("--seed draws a BERT's sentence pairs and held-out documents; a causal LM's eval draws "
                         "nothing: drop --seed")
    name, docs = load_corpus(a.data, a.encoding)
    found = pretraining_run(a.model) if held_out else (False, None)
    seed = eval_seed(a.model, a.seed, docs, found) if bert and held_out else 0 if a.seed is None else a.seed
    if bert:
        out = eval_bert(model, docs, tok, a.block_size, a.batch_size, seed, a.batches, held_out)
    else:
        out = eval_gpt(model, docs, tok, a.block_size, a.batch_size, a.batches, held_out)
    held = f" (the part pretrain holds out for validation{f' with seed {seed}' if bert else ''})"
    if held_out and trained_on_other_documents(found, docs):  # true of the part, not of this model's run
        held = f" (the part pretrain would hold out for validation{f' with seed {seed}' if bert else ''}; " \
               f"the model was pre-trained on other documents)"
    out["scored"] += f" of {name}" + (held if held_out else "")
    print(json.dumps(out, indent=1))
    return 0


MINUTES = number(0, 1e9)  # a budget in seconds stays finite


def build_parser():
    p = Parser(prog="numlm", description="BERT and GPT in plain NumPy: pre-train, evaluate, "
               "generate and check gradients.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True)
    _add_demo_and_data(sub)
    _add_pretrain_and_eval(sub)
    from .inspect import add_parsers as add_inspect_parsers  # gradcheck, attention, plot
    add_inspect_parsers(sub)
    try:
        from .inference import add_parsers
    except ImportError:
        pass
    else:
        add_parsers(sub)
    from .finetune import add_parsers as add_finetune
    add_finetune(sub)
    from .profile import add_parser as add_profile
    add_profile(sub)
    return p


ENCODING = dict(default="utf-8", help="the corpus files' text encoding (default utf-8, read strictly)")


def _add_demo_and_data(sub):
    d = sub.add_parser("demo", help="train a tokenizer and a small GPT-2 on Shakespeare, then print samples")
    d.add_argument("--data", type=path, help="a text file or folder instead of the default corpus")
    d.add_argument("--out", type=path, default=DEMO_OUT)
    d.add_argument("--overwrite", action="store_true",
                   help=f"start again over a run in --out (the default, {DEMO_OUT}, is the demo's own: always)")
    d.add_argument("--minutes", type=MINUTES, default=4.25, help="time budget from start to the end of training")
    d.add_argument("--vocab-size", type=count(1), default=4096)
    d.add_argument("--encoding", **ENCODING)
    d.add_argument("--seed", type=count(0), default=0)
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train a WordPiece (BERT) or byte-level BPE (GPT) tokenizer")
    tt.add_argument("--kind", choices=["bpe", "wordpiece"], default="bpe")
    tt.add_argument("--vocab-size", type=count(1), default=8192)
    tt.add_argument("--encoding", **ENCODING)
    tt.add_argument("--data", type=path, help="text file or folder (default: the default corpus)")
    tt.add_argument("--out", type=path, required=True, help="tokenizer.json path or folder")
    tt.add_argument("--overwrite", action="store_true", help="replace a tokenizer already at --out")
    tt.set_defaults(fn=cmd_tokenizer_train)

    pr = sub.add_parser("prepare", help="tokenize a corpus once into a memory-mapped token file")
    pr.add_argument("--tokenizer", type=path, required=True)
    pr.add_argument("--data", type=path)
    pr.add_argument("--encoding", **ENCODING)
    pr.add_argument("--out", type=path, required=True, help="token file (.bin)")
    pr.set_defaults(fn=cmd_prepare)


def _add_pretrain_and_eval(sub):
    pt = sub.add_parser("pretrain", help="pre-train BERT (MLM + NSP) or GPT (causal LM) from scratch")
    pt.add_argument("--arch", choices=["bert", "gpt2", "openai-gpt"], default="gpt2")
    pt.add_argument("--size", choices=["tiny", "mini", "small", "base"], default="mini")
    pt.add_argument("--config", type=path, help="a transformers config.json instead of --size")
    pt.add_argument("--data", type=path, help="text file or folder (default: the default corpus)")
    pt.add_argument("--tokenizer", type=path, help="an existing tokenizer.json (default: train one)")
    pt.add_argument("--vocab-size", type=count(1),
                    help="the size of the tokenizer a run trains (default 8192; on --resume the run's own)")
    pt.add_argument("--encoding", **ENCODING)
    pt.add_argument("--out", type=path, default="runs/pretrain")
    pt.add_argument("--steps", type=count(1), help="optimizer steps (default 300; with --resume, the run's own)")
    pt.add_argument("--minutes", type=MINUTES, help="size the run to this time budget instead of --steps")
    pt.add_argument("--batch-size", type=count(1), default=16)
    pt.add_argument("--block-size", type=count(2), default=128)
    pt.add_argument("--grad-accum", type=count(1), default=1)
    pt.add_argument("--lr", type=positive)
    pt.add_argument("--warmup", type=count(0))
    pt.add_argument("--seed", type=count(0), default=0)
    pt.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    pt.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    pt.add_argument("--allow-changes", action="store_true", help="--resume although the corpus, tokenizer, "
                    "model config, --seed, --lr, --warmup or --grad-accum differ from the checkpoint's, or --steps is "
                    "below its step (its batch and block size and --dtype cannot)")
    pt.add_argument("--overwrite", action="store_true", help="start again in an --out that holds a run")
    pt.set_defaults(fn=cmd_pretrain)

    e = sub.add_parser("eval", help="loss and perplexity of a saved model on all of --data")
    e.add_argument("model", type=path, help="model directory (config.json, model.safetensors, tokenizer.json)")
    e.add_argument("--data", type=path)
    e.add_argument("--encoding", **ENCODING)
    e.add_argument("--block-size", type=count(2), default=128)
    e.add_argument("--batch-size", type=count(1), default=8)
    e.add_argument("--batches", type=count(1), help="score only this many batches (default: all of --data)")
    e.add_argument("--seed", type=count(0), help="BERT's masking and NSP draws (default 0); without --data also "
                   "the documents held out: by default the seed the model's pre-training run recorded, and only it; "
                   "required when no checkpoint records it")
    e.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    e.set_defaults(fn=cmd_eval)


def describe(e):
    """One line saying what went wrong; numlm's own errors already name the file, argument and value."""
    if isinstance(e, OSError) and e.strerror:
        files = [str(f) for f in (e.filename, e.filename2) if f]
        msg = e.strerror + (": " + " -> ".join(repr(f) for f in files) if files else "")
    elif isinstance(e, (ValueError, RuntimeError)) and str(e):
        msg = str(e)
    elif isinstance(e, KeyError):
        msg = f"missing key {e}"
    else:
        msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return " ".join(msg.split())


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (timeout, schedulers, container stops) ends a command as Ctrl-C does


def main(argv=None):
    """Run one command; the exit code: 0 finished, 1 a check failed (gradcheck), 2 bad input or an
    error, 130 interrupted (Ctrl-C or SIGTERM; a training run has saved its checkpoint), 141 the reader
    of the output went away (numlm ... | head), quietly, as a command SIGPIPE ends."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a one-line usage error already printed
        return e.code
    prog = args._prog

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _stop) if in_main else None
    with warnings.catch_warnings():
        warnings.showwarning = one_line
        try:
            return args.fn(args)
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # what is left to print goes nowhere, the exit's flush included
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except Exception as e:
            if debug:
                traceback.print_exc()
            print(f"{prog}: error: {describe(e)}", file=sys.stderr)
            return 2
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
