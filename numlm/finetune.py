"""Fine-tuning a pretrained BERT or GPT on a task: the data encoded and batched (each batch padded to
its longest example, at most max_length tokens), the trainable parameters chosen by the method,
numlm.train's Trainer (AdamW, warmup then linear decay, clipping, checkpoints, resume), validation
each epoch, and the best model saved in transformers' format with its tokenizer.

    methods  full      every parameter
             freeze    the embeddings and the first K layers frozen (--freeze-layers K)
             head      only the task head (BERT's pooler + classifier for sequence classification)
             lora, adapter, prompt, prefix   numlm.peft
    unfreeze gradual   start with the head; unfreeze one layer more, top down, at equal step intervals
    tasks    seqcls, tokcls, qa, multiple-choice; causal-lm (a GPT's LM head on text: blocks of
             eos-joined documents, loss and perplexity, the best model by validation loss)

Every argument is checked before anything is written in the output folder.
"""
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from .data import datasets
from .data.tokenizer import Tokenizer
from .inference import best_spans
from .inspect import read_metrics
from .io import read_config, load_safetensors, check_folder_path
from .models.bert import BertModel
from .nn import no_grad
from .train import (Trainer, TrainConfig, latest_checkpoint, checkpoint_entries, clear_checkpoints, remove_stale_saves,
                    read_checkpoint_state, check_resume, fingerprint, tokenizer_fingerprint, resume_settings, _int,
                    _real)

TASKS = ("seqcls", "tokcls", "qa", "multiple-choice", "causal-lm")
METHODS = ("full", "freeze", "head", "lora", "adapter", "prompt", "prefix")
PEFT_METHODS = ("lora", "adapter", "prompt", "prefix")
DEFAULT_LR = {"head": 1e-3, "lora": 5e-4, "adapter": 1e-3, "prompt": 1e-2, "prefix": 1e-2}  # else 5e-5
DEFAULT_TARGET = {"bert": "query,value", "roberta": "query,value", "distilbert": "q_lin,v_lin",
                  "gpt2": "c_attn", "openai-gpt": "c_attn"}  # peft's defaults
ENCODERS = ("bert", "roberta", "distilbert")  # the BERT family: no LM objective, no pad id to set
DEFAULT_MAX_LENGTH = {"seqcls": 64, "tokcls": 64, "qa": 256, "multiple-choice": 128, "causal-lm": 128}
DATA_TASK = {"causal-lm": "lm"}  # the datasets' name of a task where it differs
IGNORE = -100
OUTPUTS = ("results.json", "metrics.jsonl", "training.png", "loss.png", "lr.png", "grad_norm.png", "update_ratio.png",
           "best", "checkpoints")


@dataclasses.dataclass
class FinetuneArgs:
    model_dir: str
    data: str
    out: str
    task: str = "seqcls"
    method: str = "full"
    epochs: int = 2
    max_steps: int = None           # stop earlier (the schedule runs over these steps)
    batch_size: int = 32
    lr: float = None                # 5e-5; 1e-3 head; 5e-4 LoRA
    warmup: float = 0.1             # fraction of the steps
    weight_decay: float = 0.01
    max_length: int = None          # 64 (seqcls, tokcls), 256 (qa), 128 (multiple-choice, causal-lm: the block)
    seed: int = 0
    freeze_layers: int = None       # freeze: default half the layers
    unfreeze: str = None            # "gradual"
    r: int = None                   # LoRA's (8); each method's options go with it alone (METHOD_OPTIONS)
    alpha: float = None             # LoRA's (16)
    target: str = None              # LoRA's modules: query,value (BERT), c_attn (GPT), as peft's defaults
    num_virtual_tokens: int = None  # prompt's and prefix's (20)
    reduction_factor: int = None    # adapter's (16)
    lm_coef: float = None           # GPT: 0.5 (GPT-1's lambda); BERT: not allowed
    num_labels: int = None
    max_examples: int = None        # at most this many examples (causal-lm: blocks) per split (quick runs)
    eval_batch_size: int = 64
    clip: float = 1.0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    allow_changes: bool = False     # --resume despite another data, tokenizer, batch size or fewer steps


METHOD_OPTIONS = {"r": ("lora",), "alpha": ("lora",), "target": ("lora",), "num_virtual_tokens": ("prompt", "prefix"),
                  "reduction_factor": ("adapter",)}
METHOD_DEFAULTS = {"r": 8, "alpha": 16.0, "num_virtual_tokens": 20, "reduction_factor": 16}


def _flag(name):
    return "--" + name.replace("_", "-")


def _positive(name, v, allow_none=True):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{_flag(name)} must be a positive integer, got {v!r}")


def _check_numbers(a):
    """The numeric, boolean and path fields: types, ranges, NaN and infinity."""
    for name in ("model_dir", "data", "out"):
        if not isinstance(getattr(a, name), (str, os.PathLike)) or not str(getattr(a, name)):
            raise ValueError(f"{name} must be a path, got {getattr(a, name)!r}")
    for name in ("epochs", "max_steps", "batch_size", "max_length", "num_labels", "max_examples",
                 "eval_batch_size", "r", "num_virtual_tokens", "reduction_factor"):
        _positive(name, getattr(a, name), allow_none=name not in ("epochs", "batch_size", "eval_batch_size"))
    _int(_flag("seed"), a.seed, 0)
    for name, want, ok, none in (("lr", "> 0", lambda v: v > 0, True),
                                 ("warmup", "in [0, 1) (a fraction of the steps)", lambda v: 0 <= v < 1, False),
                                 ("weight_decay", ">= 0", lambda v: v >= 0, False),
                                 ("alpha", "> 0", lambda v: v > 0, True),
                                 ("lm_coef", ">= 0", lambda v: v >= 0, True),
                                 ("clip", ">= 0 (0 disables clipping)", lambda v: v >= 0, False)):
        if not (none and getattr(a, name) is None):
            _real(_flag(name), getattr(a, name), want, ok)
    for name in ("resume", "overwrite", "progress", "allow_changes"):
        if not isinstance(getattr(a, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(a, name)!r}")
    for name, allowed in (("task", TASKS), ("method", METHODS), ("unfreeze", (None, "gradual"))):
        if not isinstance(getattr(a, name), (str, type(None))) or getattr(a, name) not in allowed:
            shown = ", ".join(str(x) for x in allowed if x is not None)
            raise ValueError(f"{_flag(name)} must be one of {shown}, got {getattr(a, name)!r}")
    if a.resume and a.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if a.allow_changes and not a.resume:  # it would do nothing
        raise ValueError("--allow-changes applies to --resume: a new run has nothing to change")


def targets(a, kind):
    """LoRA's target modules: --target (a comma-separated string or a list of names), else the
    model family's default (peft's): query,value for BERT, c_attn for GPT."""
    t = DEFAULT_TARGET[kind] if a.target is None else a.target
    if isinstance(t, str):
        t = t.split(",")
    if not isinstance(t, (list, tuple)) or not all(isinstance(x, str) for x in t):
        raise ValueError(f"--target must be module names, comma-separated or a list, got {a.target!r}")
    t = [x.strip() for x in t if x.strip()]
    if not t:
        raise ValueError("--target names no module")
    return t


def _model_kind(model_dir):
    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(f"model folder {str(d)!r} {'is a file, not a folder' if d.exists() else 'does not exist'}")
    if not (d / "config.json").is_file():
        raise ValueError(f"model folder {str(d)!r} has no config.json")
    if not (d / "tokenizer.json").is_file():
        raise ValueError(f"model folder {str(d)!r} has no tokenizer.json (save the tokenizer beside the model)")
    cfg = read_config(d)
    kind = cfg.get("model_type")
    if kind not in DEFAULT_TARGET:
        raise ValueError(f"model folder {str(d)!r} holds a {kind!r} model; numlm fine-tunes "
                         f"{', '.join(DEFAULT_TARGET)}")
    return kind, cfg


def _model_class(kind, task):
    from . import models as M
    table = {("bert", "seqcls"): M.BertForSequenceClassification, ("bert", "tokcls"): M.BertForTokenClassification,
             ("bert", "qa"): M.BertForQuestionAnswering, ("gpt2", "seqcls"): M.GPT2ForSequenceClassification,
             ("gpt2", "multiple-choice"): M.GPT2DoubleHeadsModel,
             ("openai-gpt", "multiple-choice"): M.OpenAIGPTDoubleHeadsModel,
             ("gpt2", "causal-lm"): M.GPT2LMHeadModel, ("openai-gpt", "causal-lm"): M.OpenAIGPTLMHeadModel,
             ("roberta", "seqcls"): M.RobertaForSequenceClassification,
             ("roberta", "tokcls"): M.RobertaForTokenClassification, ("roberta", "qa"): M.RobertaForQuestionAnswering,
             ("distilbert", "seqcls"): M.DistilBertForSequenceClassification,
             ("distilbert", "tokcls"): M.DistilBertForTokenClassification,
             ("distilbert", "qa"): M.DistilBertForQuestionAnswering}
    if (kind, task) not in table:
        can = [t for k, t in table if k == kind]
        raise ValueError(f"--task {task} is not available for a {kind} model (it supports {', '.join(can)})")
    return table[(kind, task)]


def _layers(kind, cfg):
    return int(cfg.get({"bert": "num_hidden_layers", "roberta": "num_hidden_layers", "distilbert": "n_layers"}
                       .get(kind, "n_layer")))


def peft_available():
    try:
        return importlib.util.find_spec("numlm.peft") is not None
    except (ImportError, ValueError):
        return False


def check_args(a):
    """Every check that needs no model weights; returns (kind, config, data, num_labels, lr, max_length)."""
    _check_numbers(a)
    kind, cfg = _model_kind(a.model_dir)
    cls = _model_class(kind, a.task)
    if a.lm_coef is not None and kind in ENCODERS:
        raise ValueError("--lm-coef is GPT-1's auxiliary language-model loss; it needs a GPT model")
    if a.task == "causal-lm":
        _check_causal_lm(a)
    _check_method(a, kind, cfg, cls)
    data = datasets.load(a.data)
    if data.task != DATA_TASK.get(a.task, a.task):
        raise ValueError(f"dataset {data.name!r} is a {data.task} dataset, not {DATA_TASK.get(a.task, a.task)}")
    num_labels = _check_labels(a, data, cfg)
    lr = a.lr if a.lr is not None else DEFAULT_LR.get(a.method, 5e-5)
    limit = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 512)
    if cfg.get("model_type") == "roberta":  # positions start after the padding row: pad_token_id + 1
        limit -= int(cfg.get("pad_token_id", 1)) + 1
    n = a.num_virtual_tokens if a.method in ("prompt", "prefix") else 0  # the virtual tokens take n positions
    max_length = a.max_length or min(DEFAULT_MAX_LENGTH[a.task], limit - n)
    if max_length + n > limit:
        extra = f" with the {n} virtual tokens" if n else ""
        raise ValueError(f"--max-length {max_length}{extra} exceeds the model's {limit} positions")
    _check_out(a)
    return kind, cfg, data, num_labels, lr, max_length


def _check_causal_lm(a):
    """What a causal LM has no use for: a task head (its head is the token table), GPT-1's auxiliary
    LM loss (the LM loss is the task); and its blocks need two tokens."""
    if a.method == "head":
        raise ValueError("--method head trains the task head alone; a causal LM's head is its token table: "
                         "use full, freeze, lora, adapter, prompt or prefix")
    if a.unfreeze:
        raise ValueError("--unfreeze gradual starts from a task head; --task causal-lm has none")
    if a.lm_coef is not None:
        raise ValueError("--lm-coef weighs GPT-1's auxiliary LM loss beside a task; --task causal-lm "
                         "trains the LM loss itself")
    if a.max_length is not None and a.max_length < 2:
        raise ValueError(f"--max-length {a.max_length}: a causal LM's block needs 2 tokens or more (one to read, "
                         "the next to predict)")


def _check_method(a, kind, cfg, cls):
    L = _layers(kind, cfg)
    if a.freeze_layers is not None:
        if isinstance(a.freeze_layers, bool) or not isinstance(a.freeze_layers, int) or not 0 <= a.freeze_layers <= L:
            raise ValueError(f"--freeze-layers must lie in [0, {L}] (the model has {L} layers), "
                             f"got {a.freeze_layers!r}")
        if a.method not in ("full", "freeze"):
            raise ValueError(f"--freeze-layers goes with --method full or freeze, not {a.method}")
    if a.method == "lora":
        names = _linear_names(kind, cfg, cls)
        bad = [t for t in targets(a, kind) if not any(n == t or n.endswith("." + t) for n in names)]
        if bad:
            short = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ValueError(f"--target {bad[0]!r} matches no module of the model (linear modules: {', '.join(short)})")
    if a.method in PEFT_METHODS:
        if not peft_available():
            raise ValueError(f"--method {a.method} is not available: this numlm has no numlm.peft "
                             f"(use --method full, freeze or head)")
        if a.unfreeze:
            raise ValueError(f"--unfreeze gradual goes with --method full, freeze or head, not {a.method}")
        if a.method in ("prompt", "prefix") and a.task == "multiple-choice":
            raise ValueError(f"--method {a.method} goes with --task seqcls, tokcls or qa, not {a.task}")


def _linear_names(kind, cfg, cls):
    """Dotted names of the model's linear modules, from a weightless skeleton of one layer."""
    from .nn import Linear
    small = dict(cfg, num_hidden_layers=1, n_layer=1, vocab_size=8)
    model = cls(cls.config_class.from_dict(small))
    return [n for n, m in model.modules() if isinstance(m, Linear)]


def _check_labels(a, data, cfg):
    if a.task not in ("seqcls", "tokcls"):
        return None
    archs = cfg.get("architectures") or []
    head = {"seqcls": ("ForSequenceClassification",), "tokcls": ("ForTokenClassification",)}[a.task]
    from_model = cfg.get("num_labels") or (len(cfg["id2label"]) if cfg.get("id2label") else None)
    if not any(x.endswith(head) for x in archs):
        from_model = None  # a pretrained backbone: the head is new
    K = a.num_labels or from_model or data.num_labels
    if K < 2 and a.task == "seqcls":
        who = ("--num-labels 1" if a.num_labels else "the model's config has num_labels=1" if from_model
               else f"{data.name}: the labels hold a single class")
        raise ValueError(f"{who}; classification needs 2 or more classes (one label is regression, which "
                         "numlm finetune does not train)")
    for split in ("train", "validation", "test"):
        for i, ex in enumerate(data.split(split)):
            labels = [ex["label"]] if a.task == "seqcls" else ex["labels"]
            for y in labels:
                if not 0 <= y < K:
                    where = f"line {ex['line']}" if "line" in ex else f"{split} example {i}"
                    raise ValueError(f"{data.name}: {where}: label {y} is outside num_labels={K} "
                                     f"(labels must lie in [0, {K - 1}])")
    return K


def _check_out(a):
    out = check_folder_path(a.out, "--out")
    from .recipes import run_files  # --overwrite removes OUTPUTS only: a pre-training run's others would stay
    if other := [n for n in run_files(out) if n not in OUTPUTS]:  # --resume would take its checkpoints
        raise ValueError(f"--out {str(out)!r} holds a pre-training run ({', '.join(other)}), not a fine-tuning "
                         "run; use another folder")
    if a.resume:
        if latest_checkpoint(out) is None:
            raise ValueError(f"--resume: no checkpoint in {str(out / 'checkpoints')!r}")
        return
    if out.is_dir() and any(out.iterdir()) and not a.overwrite:
        raise ValueError(f"--out {str(out)!r} is not empty; pass --resume to continue its run, --overwrite "
                         f"to start again, or another folder")
    if (out / "best").is_dir() and not (out / "best" / "tokenizer.json").is_file():  # _save_best writes one
        raise ValueError(f"--out {str(out)!r} holds best/, no model numlm saved (no tokenizer.json in it), which "
                         "--overwrite would delete; move it away, or use another folder")


# ---- encoding ----------------------------------------------------------------------------------
class Encoded:
    """One split, encoded once: per example a dict of 1-D int arrays (or (N, T) for multiple choice)
    plus what evaluation needs; `batch(idx)` pads the picked examples to their longest."""

    def __init__(self, rows, pad_id, kind):
        self.rows, self.pad_id, self.kind = rows, pad_id, kind

    def __len__(self):
        return len(self.rows)

    def batch(self, idx):
        rows = [self.rows[i] for i in idx]
        if self.kind == "multiple-choice":
            from .data import pack_choices
            b = pack_choices([r["choices"] for r in rows], self.pad_id)
            b["mc_labels"] = np.array([r["label"] for r in rows], np.int64)
            return b
        T = max(len(r["input_ids"]) for r in rows)
        B = len(rows)
        out = {"input_ids": np.full((B, T), self.pad_id, np.int64), "attention_mask": np.zeros((B, T), np.int64)}
        if "token_type_ids" in rows[0]:
            out["token_type_ids"] = np.zeros((B, T), np.int64)
        if "labels" in rows[0] and np.ndim(rows[0]["labels"]) == 1:
            out["labels"] = np.full((B, T), IGNORE, np.int64)
        if "lm_labels" in rows[0]:
            out["lm_labels"] = np.full((B, T), IGNORE, np.int64)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            out["input_ids"][b, :n] = r["input_ids"]
            out["attention_mask"][b, :n] = 1
            if "token_type_ids" in out:
                out["token_type_ids"][b, :n] = r["token_type_ids"]
            if "labels" in out:
                out["labels"][b, :n] = r["labels"]
            if "lm_labels" in out:
                out["lm_labels"][b, :n] = r["lm_labels"]
        if "label" in rows[0]:
            out["labels"] = np.array([r["label"] for r in rows], np.int64)
        if "start_positions" in rows[0]:
            out["start_positions"] = np.array([r["start_positions"] for r in rows], np.int64)
            out["end_positions"] = np.array([r["end_positions"] for r in rows], np.int64)
        return out


def _truncating(tok, max_length, fn, strategy="longest_first"):
    with tok.truncating(max_length, strategy=strategy):
        return fn()


def encode_lm(tok, examples, max_length):
    """Causal LM: the documents tokenized, each followed by the eos token (GPT-2's layout), the stream
    cut into blocks of max_length tokens (a last block of 2 or more tokens is kept); labels = input_ids
    (the model shifts them)."""
    from .data import pack_documents
    if tok.eos_id is None:
        raise ValueError("--task causal-lm: the tokenizer has no end-of-text token to end the documents with")
    stream = pack_documents(tok.encode_many([e["text"] for e in examples]), tok.eos_id) if examples else []
    rows = [{"input_ids": b, "labels": b} for b in
            (stream[i:i + max_length] for i in range(0, len(stream), max_length)) if len(b) >= 2]
    return Encoded(rows, tok.eos_id, "flat")


def encode(task, kind, tok, examples, max_length, lm=False):
    if task == "causal-lm":
        return encode_lm(tok, examples, max_length)
    pad = next((i for i in (tok.pad_id, tok.eos_id) if i is not None), 0)
    rows = []
    if task == "seqcls":
        pairs = [e.get("text_pair") for e in examples]
        enc = tok.encode_batch([e["text"] for e in examples], None if pairs[0] is None else pairs,
                               max_length=max_length, padding=False)
        for e, ids, tt in zip(examples, enc["input_ids"], enc["token_type_ids"]):
            r = {"input_ids": ids, "token_type_ids": tt, "label": e["label"]}
            if kind not in ("bert", "roberta"):  # GPT and DistilBERT take no token types
                del r["token_type_ids"]
                if lm:  # GPT-1's auxiliary LM loss reads the text itself
                    r["lm_labels"] = ids
            rows.append(r)
    elif task == "tokcls":
        encs = _truncating(tok, max_length, lambda: tok.backend.encode_batch([e["words"] for e in examples],
                                                                             is_pretokenized=True))
        for e, enc in zip(examples, encs):
            labels, prev = [], None
            for w in enc.word_ids:
                labels.append(IGNORE if w is None or w == prev else e["labels"][w])  # first piece of a word
                prev = w
            rows.append({"input_ids": np.array(enc.ids), "token_type_ids": np.array(enc.type_ids),
                         "labels": np.array(labels), "word_ids": enc.word_ids, "words": e["words"],
                         "word_labels": e["labels"]})
    elif task == "qa":
        try:
            encs = _truncating(tok, max_length, lambda: tok.backend.encode_batch(
                [(e["question"], e["context"]) for e in examples]), "only_second")
        except Exception as err:  # the tokenizers library: a question leaves the context no room
            if "truncat" not in str(err).lower():
                raise
            raise ValueError(f"a question fills the {max_length} tokens of --max-length and leaves no room for "
                             f"its context; raise --max-length") from None
        for e, enc in zip(examples, encs):
            s, t = e["answer_start"], e["answer_start"] + len(e["answer_text"])
            ctx = [i for i, q in enumerate(enc.sequence_ids) if q == 1]
            start = next((i for i in ctx if enc.offsets[i][1] > s), None)
            end = next((i for i in reversed(ctx) if enc.offsets[i][0] < t), None)
            inside = start is not None and end is not None and start <= end and enc.offsets[ctx[-1]][1] >= t
            rows.append({"input_ids": np.array(enc.ids), "token_type_ids": np.array(enc.type_ids),
                         "start_positions": start if inside else 0, "end_positions": end if inside else 0,
                         "answerable": inside, "offsets": enc.offsets, "seq": enc.sequence_ids,
                         "context": e["context"], "answer_text": e["answer_text"]})
    else:  # multiple choice, GPT-1's form: context [delim] choice [extract], with the eos token as both
        sep = tok.eos_id if tok.eos_id is not None else pad
        for e in examples:
            ctx = tok.encode(e["context"], add_special_tokens=False)
            seqs = []
            for c in e["choices"]:
                ans = tok.encode(c, add_special_tokens=False)[:max_length // 2 - 1]
                room = max_length - len(ans) - 2
                seqs.append((ctx[-room:] if room > 0 else []) + [sep] + ans + [sep])  # ctx[-0:] is all of it
            rows.append({"choices": seqs, "label": e["label"]})
    if kind == "distilbert":  # no token-type table
        for r in rows:
            r.pop("token_type_ids", None)
    return Encoded(rows, pad, "multiple-choice" if task == "multiple-choice" else "flat")


# ---- metrics -----------------------------------------------------------------------------------
def _spans(tags, names):
    """(start, end, type) entity spans of a BIO tag sequence (an I- after O or another type opens one)."""
    out, cur = [], None
    for i, t in enumerate(list(tags) + [None]):
        name = names[t] if t is not None else "O"
        if cur is not None and not (name.startswith("I-") and name[2:] == cur[2]):
            out.append((cur[0], i, cur[2]))
            cur = None
        if name.startswith("B-") or (name.startswith("I-") and cur is None):
            cur = (i, None, name[2:])
    return out


def f1(pred_spans, gold_spans):
    tp = len(pred_spans & gold_spans)
    p = tp / len(pred_spans) if pred_spans else 0.0
    r = tp / len(gold_spans) if gold_spans else 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


def evaluate(model, task, enc, label_names=None, batch_size=64, prefix="val"):
    """Loss and accuracy (seqcls, multiple-choice), token accuracy and entity F1 (tokcls), exact match
    (qa) of `enc`, in eval mode; a causal LM's loss and perplexity (evaluate_lm)."""
    if task == "causal-lm":
        return evaluate_lm(model, enc, batch_size, prefix)
    model.eval()
    n = len(enc)
    loss_sum, correct, total = 0.0, 0, 0
    pred_spans, gold_spans = set(), set()
    for i in range(0, n, batch_size):
        idx = list(range(i, min(n, i + batch_size)))
        b = enc.batch(idx)
        b.pop("lm_labels", None)
        if task == "multiple-choice":
            b.pop("labels", None)
        with no_grad():  # no caches for a backward: one layer's activations at a time
            out = model(**b)
        loss = out.mc_loss if task == "multiple-choice" else out.loss
        loss_sum += float(loss) * len(idx)
        if task in ("seqcls", "multiple-choice"):
            logits = out.mc_logits if task == "multiple-choice" else out.logits
            y = b["mc_labels"] if task == "multiple-choice" else b["labels"]
            correct += int((np.argmax(logits, -1) == y).sum())
            total += len(idx)
        elif task == "tokcls":
            pred = np.argmax(out.logits, -1)
            for k, j in enumerate(idx):
                r = enc.rows[j]
                words = [None] * len(r["words"])
                for t, w in enumerate(r["word_ids"]):
                    if w is not None and words[w] is None:
                        words[w] = int(pred[k, t])
                seen = [w for w in range(len(words)) if words[w] is not None]
                correct += sum(words[w] == r["word_labels"][w] for w in seen)
                total += len(seen)
                tags = [words[w] if words[w] is not None else 0 for w in range(len(words))]
                pred_spans |= {(j,) + s for s in _spans(tags, label_names)}
                gold_spans |= {(j,) + s for s in _spans(r["word_labels"], label_names)}
        else:
            s, e = np.asarray(out.start_logits), np.asarray(out.end_logits)
            for k, j in enumerate(idx):
                r = enc.rows[j]
                ctx = np.array([q == 1 for q in r["seq"]])
                # the pipeline's span search; answers of up to 16 tokens, finetune's rule since its first
                # release (the pipeline's default is 15), so the exact-match scores keep their meaning
                starts, ends, _, _ = best_spans(s[k][:len(ctx)], e[k][:len(ctx)], ctx, max_answer_len=16)
                a, z = int(starts[0]), int(ends[0])
                text = r["context"][r["offsets"][a][0]:r["offsets"][z][1]] if r["seq"][a] == 1 else ""
                correct += int(text.strip() == r["answer_text"].strip())
                total += 1
    res = {f"{prefix}_loss": loss_sum / max(n, 1)}
    key = {"seqcls": "accuracy", "multiple-choice": "accuracy", "tokcls": "accuracy", "qa": "exact_match"}[task]
    res[f"{prefix}_{key}"] = correct / max(total, 1)
    if task == "qa":
        res[f"{prefix}_accuracy"] = res[f"{prefix}_exact_match"]
    if task == "tokcls":
        res[f"{prefix}_f1"] = f1(pred_spans, gold_spans)
    return res


def evaluate_lm(model, enc, batch_size=64, prefix="val"):
    """A causal LM's loss as the mean over every predicted token of the split (each batch's mean
    loss weighted by its count of predicted tokens) and perplexity = exp(loss). A token is predicted
    where its label is not -100 and something precedes it: the block's tokens after the first, and
    with prompt tuning the first too (the last virtual token predicts it, as in peft)."""
    model.eval()
    first = 0 if isinstance(model, _Adapted) and model.pm.kind == "PROMPT_TUNING" else 1
    loss_sum, count = 0.0, 0
    for i in range(0, len(enc), batch_size):
        b = enc.batch(range(i, min(len(enc), i + batch_size)))
        n = int((b["labels"][:, first:] != IGNORE).sum())
        with no_grad():
            out = model(**b)
        loss_sum += float(out.loss) * n
        count += n
    loss = loss_sum / max(count, 1)
    return {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 700.0))}


def score(task, res, prefix="val"):
    """What picks the best model, higher is better: accuracy (exact match for qa), equal accuracies
    going to the lower loss (on a small validation split the first of them is the least trained); a
    causal LM's loss alone."""
    loss = -res[f"{prefix}_loss"]
    return (loss,) if task == "causal-lm" else (res[f"{prefix}_accuracy"], loss)


def baselines(task, data, label_names=None):
    """The trivial predictor's test score: the majority class (seqcls); every word O (tokcls: its
    accuracy, F1 0); the first speaker of the context (qa); the most frequent position (multiple-choice)."""
    test = data.test
    if task == "causal-lm":
        return {}  # the model before training is the reference (results' val_loss_before)
    if task == "seqcls":
        y = np.array([e["label"] for e in test])
        return {"majority_test_accuracy": float(np.bincount(y).max() / len(y))}
    if task == "tokcls":
        y = np.concatenate([e["labels"] for e in test])
        return {"all_O_test_accuracy": float((y == 0).mean()), "all_O_test_f1": 0.0}
    if task == "qa":
        first = [e["context"].split(":", 1)[0].strip() == e["answer_text"] for e in test]
        return {"first_speaker_test_exact_match": float(np.mean(first))}
    y = np.array([e["label"] for e in test])
    return {"majority_test_accuracy": float(np.bincount(y).max() / len(y))}


# ---- the batches the Trainer draws -------------------------------------------------------------
class EpochStream:
    """Shuffled epochs (numpy default_rng(seed).permutation per epoch) cut into batches; the last
    batch of an epoch may be smaller. `on_batch(step)` runs before each batch (gradual unfreezing)."""

    def __init__(self, enc, batch_size, seed, prepare=None, on_batch=None):
        self.enc, self.bs, self.prepare, self.on_batch = enc, batch_size, prepare, on_batch
        self.rng = np.random.default_rng(seed)
        self.epoch, self.pos, self.step = 0, 0, 0
        self.order = self.rng.permutation(len(enc))

    def next_batch(self):
        if self.pos >= len(self.order):
            self.epoch, self.pos = self.epoch + 1, 0
            self.order = self.rng.permutation(len(self.enc))
        if self.on_batch is not None:
            self.on_batch(self.step)
        idx = self.order[self.pos:self.pos + self.bs]
        self.pos += self.bs
        self.step += 1
        b = self.enc.batch(idx)
        return self.prepare(b) if self.prepare is not None else b

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "step": self.step, "order": self.order.tolist(),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, s):
        """The position of a checkpoint; over data of another size (--allow-changes) a new epoch."""
        self.epoch, self.pos, self.step = int(s["epoch"]), int(s["pos"]), int(s["step"])
        self.order = np.array(s["order"], dtype=np.int64)
        self.rng.bit_generator.state = s["rng"]
        if len(self.order) != len(self.enc):
            self.epoch, self.pos = self.epoch + 1, 0
            self.order = self.rng.permutation(len(self.enc))


# ---- methods -----------------------------------------------------------------------------------
def _backbone_prefix(model):
    return model.base_model_prefix + "."


def _layer_prefixes(model, kind):
    p = _backbone_prefix(model)
    L = _layers(kind, model.config.to_dict())
    layer = {"bert": "encoder.layer", "roberta": "encoder.layer", "distilbert": "transformer.layer"}.get(kind, "h")
    return [f"{p}{layer}.{i}." for i in range(L)]


def _is_head(model, name):
    return not name.startswith(_backbone_prefix(model)) or ".pooler." in name


def frozen_layers(a, L):
    """K, the first layers full or freeze fine-tuning fixes (with the embeddings) of L: --freeze-layers,
    else half of them for freeze, none for full"""
    return a.freeze_layers if a.freeze_layers is not None else L // 2 if a.method == "freeze" else 0


def apply_method(model, kind, a):
    """Freeze what the method leaves fixed; returns a function(step) for gradual unfreezing or None."""
    names = list(model.parameters())
    layers = _layer_prefixes(model, kind)
    if a.method in ("full", "freeze"):
        K = frozen_layers(a, len(layers))
        if K > 0:  # the embeddings and the first K layers
            model.freeze([n for n in names if not _is_head(model, n)
                          and not any(n.startswith(lp) for lp in layers[K:]) and not _is_final_norm(model, n)])
    elif a.method == "head":
        model.freeze([n for n in names if not _is_head(model, n)])
    if a.unfreeze != "gradual":
        return None
    # what --method freeze (or --freeze-layers) fixes stays frozen; head only is where gradual starts
    fixed = set(names) - set(model.trainable_parameters()) if a.method in ("full", "freeze") else set()
    # groups top down: the head first, then the last layer (with a final LayerNorm), ..., layer 0, embeddings
    head = [n for n in names if _is_head(model, n)]
    groups = [head]
    for i in reversed(range(len(layers))):
        groups.append([n for n in names if n.startswith(layers[i])
                       or (i == len(layers) - 1 and _is_final_norm(model, n))])
    groups.append([n for n in names if not _is_head(model, n) and not any(g for g in groups if n in g)])
    total = [None]

    def on_batch(step):
        k = 1 + (step * len(groups)) // max(total[0], 1)  # groups trainable at this step
        want = {n for g in groups[:k] for n in g} - fixed
        cur = set(model.trainable_parameters())
        if want != cur:
            model.freeze(sorted(cur - want))
            model.unfreeze(sorted(want - cur))
    on_batch.total = total
    return on_batch


def _is_final_norm(model, name):
    return ".ln_f." in name


# ---- the run -----------------------------------------------------------------------------------
def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _save_best(model, tok, out):
    """out/best replaced by the model and tokenizer, written aside first: an error or Ctrl-C on the way
    leaves the earlier best (or the new one) and no partial folder"""
    final, tmp, old = Path(out) / "best", Path(out) / f".tmp-best-{os.getpid()}", Path(out) / f".old-best-{os.getpid()}"
    try:
        for p in (tmp, old):  # left by a process killed while saving (a container reuses its pid)
            shutil.rmtree(p, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save(tmp)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
    finally:
        if old.exists() and not final.exists():
            os.rename(old, final)
        for p in (tmp, old):
            shutil.rmtree(p, ignore_errors=True)


def plot(out_dir, task):
    """training.png: train loss and validation loss (left), validation accuracy (right; a causal LM's
    perplexity)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(out_dir)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    key = "val_perplexity" if task == "causal-lm" else "val_accuracy"
    acc = [(r["step"], r[key]) for r in rows if key in r]
    if tr:
        ax1.plot(*zip(*tr), label="train")
    if va:
        ax1.plot(*zip(*va), "o-", label="validation")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats)")
    ax1.legend()
    if acc:
        ax2.plot(*zip(*acc), "o-")
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation " + {"qa": "exact match", "causal-lm": "perplexity"}.get(task, "accuracy"))
    fig.tight_layout()
    path = Path(out_dir) / "training.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finetune(a, data=None, out=None, log=print, **options):
    """Run a fine-tuning; returns the results dict also written to results.json (its "plots": the
    PNGs drawn, None without matplotlib), or {"step", "interrupted": True} after Ctrl-C / SIGTERM.

        finetune(FinetuneArgs(...))
        finetune(model_dir, data="rotten-tomatoes", out="runs/rt", method="lora", max_steps=150)

    The keyword options are FinetuneArgs' fields (the command's flags with underscores). Everything
    is checked, the model built and the data encoded before an earlier run (--overwrite) is removed."""
    a = make_args(a, data, out, **options)
    kind, cfg, data, num_labels, lr, max_length = check_args(a)
    tok = Tokenizer.from_file(Path(a.model_dir) / "tokenizer.json")  # its own padding is switched off
    lm = kind not in ENCODERS and (a.lm_coef is None or a.lm_coef > 0)
    lm_coef = (0.5 if a.lm_coef is None else a.lm_coef) if kind not in ENCODERS else None
    split, enc = _encode_splits(a, kind, tok, data, max_length, lm)
    steps_per_epoch = math.ceil(len(enc["train"]) / a.batch_size)
    if not enc["train"].rows:  # QA keeps the answerable examples only
        raise ValueError(f"{data.name}: no training example left to learn from (QA trains on answerable ones)")
    steps = min(a.epochs * steps_per_epoch, a.max_steps or math.inf)
    run = _run_record(a, kind, cfg, tok, split, max_length, lm_coef)
    out = Path(a.out)
    tc = TrainConfig(out_dir=str(out), max_steps=steps, lr=lr, weight_decay=a.weight_decay, schedule="linear",
                     warmup=int(a.warmup * steps), clip=a.clip, eval_every=steps_per_epoch,
                     save_every=steps_per_epoch, keep_last=1, log_every=10, progress=a.progress)
    if a.resume:
        _check_resume(a, read_checkpoint_state(latest_checkpoint(out)), run, steps, tc)
    model = _build_model(a, kind, cfg, tok, data, num_labels)
    if a.method in PEFT_METHODS:
        model = _apply_peft(model, kind, a)
    if a.task == "causal-lm":  # the starting point (on --resume too: the same seeded model, before its checkpoint)
        before = evaluate_lm(model, enc["validation"], a.eval_batch_size)
        log(f"before training: val_loss {before['val_loss']:.4f}, val_perplexity {before['val_perplexity']:.4f}")
    on_batch = apply_method(model, kind, a) if a.method not in PEFT_METHODS else None
    if on_batch is not None:
        on_batch.total[0] = steps
    best = _best_so_far(out, a, model) if a.resume else {"score": (-math.inf,), "step": None}
    ctx = {"best": best, "eval_seconds": 0.0, "before": before if a.task == "causal-lm" else {},
           "trainable": sum(v.size for v in model.trainable_parameters().values())}  # before any unfreezing

    def validate(m):
        return _validate(m, a, enc["validation"], data.label_names, tok, out, ctx, steps_per_epoch, log)

    prepare = _l3_objective(a.task, lm_coef if lm else None)
    stream = EpochStream(enc["train"], a.batch_size, a.seed, prepare=prepare, on_batch=on_batch)
    ctx["trainer"] = trainer = Trainer(model, stream, tc, evaluate=validate, run=run)  # checks tc
    _clear_out(out, a.overwrite, [a.model_dir] + ([a.data] if os.path.exists(a.data) else []))
    if a.resume:
        trainer.resume()
        log(f"resumed from step {trainer.step}")
    if on_batch is not None:
        on_batch(trainer.step)
    t0 = time.perf_counter()
    res = trainer.run()
    if res.get("interrupted"):
        return res
    train_seconds = time.perf_counter() - t0 - ctx["eval_seconds"] - trainer.plot_seconds  # steps and checkpoints
    return _finish(a, model, trainer, enc, split, data, ctx, lr, max_length, lm_coef, num_labels, train_seconds)


def _encode_splits(a, kind, tok, data, max_length, lm):
    """(the examples, their Encoded) per split; --max-examples cuts the examples (a causal LM's blocks)."""
    cut = a.max_examples if a.task != "causal-lm" else None
    split = {s: data.split(s)[:cut] if cut else data.split(s) for s in ("train", "validation", "test")}
    enc = {s: encode(a.task, kind, tok, ex, max_length, lm=lm) for s, ex in split.items()}
    if a.task == "qa":
        enc["train"].rows = [r for r in enc["train"].rows if r["answerable"]]
    if a.task == "causal-lm":
        for s, e in enc.items():
            e.rows = e.rows[:a.max_examples] if a.max_examples else e.rows
            if not e.rows:
                raise ValueError(f"{data.name}: the {s} split holds no text (a block needs 2 tokens or more)")
    _check_encoded(a, enc, max_length)
    return split, enc


def _check_encoded(a, enc, max_length):
    """What encoding gives fits --max-length (a choice's context or a token row cut to fit), and a
    token-classification run has labelled tokens to learn from"""
    longest = max((max(map(len, r["choices"])) if "choices" in r else np.shape(r["input_ids"])[-1]
                   for e in enc.values() for r in e.rows), default=0)
    if longest > max_length:
        raise ValueError(f"--max-length {max_length} is too short for --task {a.task}: its examples "
                         f"encode to {longest} tokens at the least cut")
    if a.task == "tokcls" and not any((np.asarray(r["labels"]) != -100).any() for r in enc["train"].rows):
        raise ValueError(f"--max-length {max_length} leaves no labelled token in the training examples")


def _files_sha256(d):
    """sha256 over a model folder's config and weight files"""
    h = hashlib.sha256()
    for f in sorted([d / "config.json", *d.glob("*.safetensors"), *d.glob("*.safetensors.index.json")]):
        with open(f, "rb") as r:
            while chunk := r.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _check_resume(a, state, run, steps, tc):
    """The checkpoint's task and method always (its files fit no other model); its data, tokenizer,
    batch size, max length, optimisation settings and step unless --allow-changes."""
    saved = state.get("run") if isinstance(state.get("run"), dict) else {}
    for k in ("task", "method"):
        if k in saved and saved[k] != run[k]:
            raise ValueError(f"--resume: the checkpoint holds a --{k} {saved[k]} run, not {run[k]}; resume with "
                             f"--{k} {saved[k]}, or start a new run (--overwrite, or another --out)")
    train = resume_settings(tc)
    saved = state.get("train_config") if isinstance(state.get("train_config"), dict) else {}
    if saved.get("max_steps") != tc.max_steps:  # --warmup is a fraction: other steps, other warmup steps
        del train["warmup"]
    check_resume(state, run, steps, a.allow_changes, train)


def _run_record(a, kind, cfg, tok, split, max_length, lm_coef):
    """What --resume must share with the checkpoint (check_resume's `run`)."""
    return {"task": a.task, "method": a.method, **method_settings(a, kind, cfg), "lm_coef": lm_coef,
            "batch_size": a.batch_size, "max_length": max_length,
            "tokenizer_sha256": tokenizer_fingerprint(tok),
            "data_sha256": fingerprint([split["train"], split["validation"]]),
            "model_sha256": _files_sha256(Path(a.model_dir))}  # an adapter's checkpoint holds no base weights


def method_settings(a, kind, cfg):
    """What the method trains with besides its name, as the run records it for --resume: the layers
    frozen and the unfreezing (full, freeze, head), LoRA's r, alpha and targets, an adapter's
    reduction factor, a prompt's or prefix's virtual tokens."""
    if a.method in ("full", "freeze", "head"):
        K = frozen_layers(a, _layers(kind, cfg))
        return {**({"freeze_layers": K} if a.method != "head" else {}), "unfreeze": a.unfreeze or "none"}
    if a.method == "lora":
        return {"r": a.r, "alpha": float(a.alpha), "target": ",".join(targets(a, kind))}
    if a.method == "adapter":
        return {"reduction_factor": a.reduction_factor}
    return {"num_virtual_tokens": a.num_virtual_tokens}


def _l3_objective(task, lm_coef):
    """GPT-1's L3 = L2 + lm_coef * L1 when on: the batches give the models lm_coef with the LM labels
    (multiple choice's `labels`, classification's `lm_labels`); off, multiple choice has no LM labels."""
    def prepare(b):
        if lm_coef is not None and task in ("multiple-choice", "seqcls"):
            b["lm_coef"] = lm_coef
        elif task == "multiple-choice":
            b.pop("labels")
        return b
    return prepare


def _build_model(a, kind, cfg, tok, data, num_labels):
    """The task model from the model folder: its labels named by the data, GPT's pad id set."""
    cls = _model_class(kind, a.task)
    over = {}
    if num_labels is not None:
        over["num_labels"] = num_labels
        names = data.label_names
        if names and len(names) == num_labels:  # the saved model predicts by name
            over["id2label"] = {str(i): str(n) for i, n in enumerate(names)}
            over["label2id"] = {str(n): i for i, n in enumerate(names)}
    if kind not in ENCODERS and cfg.get("pad_token_id") is None:
        over["pad_token_id"] = tok.pad_id if tok.pad_id is not None else tok.eos_id
    model = cls.from_pretrained(a.model_dir, seed=a.seed, **over)
    if a.task == "seqcls":  # the head reads [CLS] alone: a BERT encoder's layers skip the padding rows
        for _, m in model.modules():
            if isinstance(m, BertModel):
                m.skip_padding = True
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer in {a.model_dir} has {tok.vocab_size} tokens, the model only "
                         f"{model.config.vocab_size}")
    return model


def _best_so_far(out, a, model):
    """The best validation row up to the checkpoint a resumed run continues from; its weights in
    best/ read now, as _finish loads them back after training."""
    task = a.task
    best = {"score": (-math.inf,), "step": None}
    remove_stale_saves(out, "best")  # killed mid-swap: the best/ set aside is the one of the rows read below
    rows = read_metrics(out) if (out / "metrics.jsonl").is_file() else []  # a torn or damaged line is skipped
    done = read_checkpoint_state(latest_checkpoint(out))["step"]
    keys = ["val_loss"] + ([] if task == "causal-lm" else ["val_accuracy"])
    vals = [r for r in rows if all(isinstance(r.get(k), float) for k in keys)
            and isinstance(r.get("step"), int) and r["step"] <= done]
    if vals and (out / "best").is_dir():
        top = max(vals, key=lambda r: score(task, r))
        best.update(score=score(task, top), step=top["step"], res=top)
        try:
            _best_weights(model, out, a.method in PEFT_METHODS)
        except (OSError, ValueError) as e:
            raise ValueError(f"--resume: {str(out / 'best')!r}, the best model (step {top['step']}), cannot be read "
                             f"({e}); put it back, or start again with --overwrite") from None
    return best


def _best_weights(model, out, peft_run):
    """out/best's weights: an adapter's its own files (peft's or AdapterHub's), keyed as its state_dict."""
    return model.read_checkpoint(out / "best") if peft_run else load_safetensors(out / "best")


def _validate(model, a, enc, label_names, tok, out, ctx, steps_per_epoch, log):
    """One validation pass; a new best is saved to out/best."""
    t = time.perf_counter()
    res = evaluate(model, a.task, enc, label_names, a.eval_batch_size)
    step, best = ctx["trainer"].step, ctx["best"]
    if score(a.task, res) > best["score"]:
        best.update(score=score(a.task, res), step=step, res=dict(res))
        _save_best(model, tok, out)
    res["epoch"] = step / steps_per_epoch
    log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
    ctx["eval_seconds"] += time.perf_counter() - t
    return res


def _clear_out(out, overwrite, inputs=()):
    """--overwrite: the earlier run's outputs removed (every check has passed), unless an input lies
    in one (a base model in out/best); out created."""
    if overwrite and out.is_dir():
        held = [out / n for n in OUTPUTS if n != "checkpoints"] + checkpoint_entries(out)  # what goes
        inside = [str(i) for i in inputs for h in held if Path(i).resolve().is_relative_to(h.resolve())]
        if inside:
            raise ValueError(f"--overwrite would delete {inside[0]!r}, an input of this run, with the earlier run "
                             f"in {str(out)!r}; copy it elsewhere or use another --out")
        for name in OUTPUTS:
            p = out / name
            if name == "checkpoints":  # its step folders, not a user's files there
                clear_checkpoints(out)
            elif p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        remove_stale_saves(out, "best", put_back=False)  # else a resume of the new run took one for its best
    out.mkdir(parents=True, exist_ok=True)


def _finish(a, model, trainer, enc, split, data, ctx, lr, max_length, lm_coef, num_labels, train_seconds):
    """The best weights back, the test split scored, results.json and the plots written."""
    out, best = Path(a.out), ctx["best"]
    peft_run = a.method in PEFT_METHODS
    if best["step"] is not None and best["step"] != trainer.step:  # at the last step the model is the best
        model.load_state_dict(_best_weights(model, out, peft_run), strict=False)
    test = evaluate(model, a.task, enc["test"], data.label_names, a.eval_batch_size, prefix="test")
    total = model.get_nb_trainable_parameters()[1] if peft_run else model.num_parameters()
    test_data = data if not a.max_examples else dataclasses.replace(data, test=split["test"])
    chosen = {} if a.task == "causal-lm" else {"val_accuracy": best["score"][0]}
    before = {f"{k}_before": v for k, v in ctx["before"].items()}
    results = {**best.get("res", {}), **chosen, **before, "best_step": best["step"], **test,
               "trainable_params": int(ctx["trainable"]), "total_params": int(total),
               "train_seconds": round(train_seconds, 1), "validation_seconds": round(ctx["eval_seconds"], 1),
               "peak_mb": round(_peak_mb(), 1), "steps": trainer.step,
               "train_examples": len(enc["train"]), "validation_examples": len(enc["validation"]),
               "test_examples": len(enc["test"]), "lr": lr, "max_length": max_length, "lm_coef": lm_coef,
               "num_labels": num_labels, "label_names": data.label_names,
               **baselines(a.task, test_data), "args": dataclasses.asdict(a)}
    drawn = plot(out, a.task)
    results["plots"] = None if drawn is None else [str(drawn)] + [str(p) for p in trainer.plots or []]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def make_args(a, data=None, out=None, **options):
    """FinetuneArgs from a model folder and keyword options (or `a` itself when it is FinetuneArgs)."""
    if isinstance(a, FinetuneArgs):
        if data is not None or out is not None or options:
            raise ValueError("pass either FinetuneArgs or a model folder with data=, out= and options, not both")
        return _method_defaults(a)
    if data is None or out is None:
        raise ValueError("finetune(model_dir, data=..., out=...): data and out are required")
    fields = {f.name for f in dataclasses.fields(FinetuneArgs)} - {"model_dir", "data", "out"}
    bad = sorted(set(options) - fields)
    if bad:
        raise ValueError(f"finetune: unknown option {bad[0]!r} (options: {', '.join(sorted(fields))})")
    return _method_defaults(FinetuneArgs(model_dir=str(a), data=str(data), out=str(out), **options))


def _method_defaults(a):
    """a with its method's own options defaulted; an option of another method is refused (it did nothing)."""
    if not isinstance(a.method, str) or a.method not in METHODS:
        return a  # _check_numbers names it
    for name, methods in METHOD_OPTIONS.items():
        if getattr(a, name) is not None and a.method not in methods:
            raise ValueError(f"{_flag(name)} goes with --method {' or '.join(methods)}, not {a.method}")
    return dataclasses.replace(a, **{k: v for k, v in METHOD_DEFAULTS.items()
                                     if getattr(a, k) is None and a.method in METHOD_OPTIONS[k]})


def _apply_peft(model, kind, a):
    """numlm.peft's adapter on the model (the task head trained too, as peft's modules_to_save)."""
    from . import peft
    task_type = {"seqcls": "SEQ_CLS", "tokcls": "TOKEN_CLS", "qa": "QUESTION_ANS", "causal-lm": "CAUSAL_LM"}.get(a.task)
    if a.method == "lora":
        cfg = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.1, task_type=task_type,
                              target_modules=targets(a, kind))
    elif a.method == "adapter":
        cfg = peft.SeqBnConfig(reduction_factor=a.reduction_factor)
    elif a.method == "prompt":
        cfg = peft.PromptTuningConfig(num_virtual_tokens=a.num_virtual_tokens, task_type=task_type)
    else:
        cfg = peft.PrefixTuningConfig(num_virtual_tokens=a.num_virtual_tokens, task_type=task_type)
    base = str(Path(a.model_dir).resolve())  # numlm generate finds the base there
    if a.method == "adapter":  # AdapterHub's adapter_config.json names it model_name
        model.config._name_or_path = base
    else:
        cfg.base_model_name_or_path = base
    shift = a.num_virtual_tokens if a.method == "prompt" and a.task in ("tokcls", "qa") else 0
    return _Adapted(peft.get_peft_model(model, cfg), shift)


class _Adapted:
    """A PeftModel as the Trainer sees a model: the same calls, plus modules() over the base model
    and the prompt table (where the dropout generators live).

    Prompt tuning puts n virtual tokens before the text, so the per-token outputs have n + T positions:
    the answer span (start, end) moves to (start + n, end + n) for the loss (token labels get n
    ignored positions inside the PeftModel), and the virtual tokens' logits are dropped from the
    outputs, which are then aligned with the text again."""

    def __init__(self, pm, shift=0):
        self.pm, self.shift = pm, shift

    def __getattr__(self, name):
        return getattr(self.pm, name)

    def __call__(self, *args, **kwargs):
        n = self.shift
        if not n:
            return self.pm(*args, **kwargs)
        for k in ("start_positions", "end_positions"):
            if kwargs.get(k) is not None:
                kwargs[k] = np.asarray(kwargs[k]) + n
        out = self.pm(*args, **kwargs)
        for k in ("logits", "start_logits", "end_logits"):
            if out.get(k) is not None:
                out[k] = out[k][:, n:]                  # (B, n + T, ...) -> (B, T, ...)
        return out

    def modules(self):
        yield from self.pm.base_model.modules()
        if self.pm.prompt is not None:
            yield from self.pm.prompt.modules("prompt.")
