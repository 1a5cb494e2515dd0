"""Training-step throughput (float32): the PyTorch anchor workloads, run by numlm.

One step = zero_grad + forward + loss + backward + AdamW update (lr 1e-4, weight decay 0.01), on
random token ids made once outside the timed region, no dropout:
  gpt-mini  : GPT-2 (pre-LN), L=4, heads=4, d=256, d_ff=1024, T=128, V=8192, B=16, tied LM head
  gpt-small : L=6, heads=6, d=384, d_ff=1536, T=256, V=8192, B=8
  bert-mini : BERT (post-LN) L=4, H=256, A=4, I=1024, T=128, V=8192, B=16; MLM loss on 19 masked
              positions per row (head on every position, as transformers) + NSP
tokens/s = B*T / step time, median over the timed steps. Prints a table.

    python benchmarks/bench_train.py [--workloads gpt-mini,gpt-small,bert-mini] [--steps 8]
"""
import argparse
import resource
import time

import numpy as np

from numlm.models import GPT2LMHeadModel, BertForPreTraining
from numlm.models.gpt import GPT2Config
from numlm.models.bert import BertConfig
from numlm.optim import AdamW
from numlm.train import reuse_freed_memory

WORKLOADS = {
    "gpt-mini": dict(arch="gpt", L=4, d=256, H=4, ff=1024, T=128, V=8192, B=16),
    "gpt-small": dict(arch="gpt", L=6, d=384, H=6, ff=1536, T=256, V=8192, B=8),
    "bert-mini": dict(arch="bert", L=4, d=256, H=4, ff=1024, T=128, V=8192, B=16),
}
# PyTorch eager figures from the anchors' README, same machine class (tokens/s)
ANCHOR = {"gpt-mini": 3908, "gpt-small": 1691, "bert-mini": 3656}


def build(w, rng):
    if w["arch"] == "gpt":
        cfg = GPT2Config(vocab_size=w["V"], n_positions=w["T"], n_embd=w["d"], n_layer=w["L"], n_head=w["H"],
                         n_inner=w["ff"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg, seed=0)
        ids = rng.integers(0, w["V"], (w["B"], w["T"]))
        batch = {"input_ids": ids, "labels": ids}
    else:
        cfg = BertConfig(vocab_size=w["V"], hidden_size=w["d"], num_hidden_layers=w["L"], num_attention_heads=w["H"],
                         intermediate_size=w["ff"], max_position_embeddings=w["T"], hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        model = BertForPreTraining(cfg, seed=0)
        ids = rng.integers(5, w["V"], (w["B"], w["T"]))
        labels = np.full_like(ids, -100)
        n = int(0.15 * w["T"])
        for r in range(w["B"]):
            pos = rng.choice(np.arange(1, w["T"]), n, replace=False)
            labels[r, pos] = ids[r, pos]
        types = np.zeros_like(ids)
        types[:, w["T"] // 2:] = 1
        batch = {"input_ids": ids, "token_type_ids": types, "labels": labels,
                 "next_sentence_label": rng.integers(0, 2, w["B"])}
    return model.astype("float32").train(), batch


def bench(name, steps, warmup=2):
    w = WORKLOADS[name]
    model, batch = build(w, np.random.default_rng(0))
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        model.zero_grad()
        model(**batch)
        model.backward()
        opt.step(model.grad_arrays())
        if i >= warmup:
            times.append(time.perf_counter() - t)
    tok = w["B"] * w["T"]
    return tok / np.median(times), tok / np.max(times), tok / np.min(times)


def main():
    reuse_freed_memory()  # what numlm's Trainer does
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    print(f"{'workload':10s} {'numlm tok/s':>12s} {'(min-max)':>16s} {'PyTorch tok/s':>14s} {'ratio':>6s}")
    for name in a.workloads.split(","):
        med, lo, hi = bench(name, a.steps)
        ref = ANCHOR[name]
        print(f"{name:10s} {med:12,.0f} {f'{lo:,.0f}-{hi:,.0f}':>16s} {ref:14,d} {med / ref:6.2f}")
    print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
