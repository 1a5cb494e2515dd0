"""GPT-2 124M (12 layers, 768 wide, vocab 50257), random weights, float32: one training step
(forward with labels + backward) on a batch of 4 x 256 tokens. Prints time per step (median after
warmup), the share of the top-level phases, and peak resident memory.

    python benchmarks/bench_gpt.py [--steps 5] [--batch 4] [--seq 256] [--no-numba]
"""
import argparse
import resource
import sys
import time

import numpy as np

from numlm.kernels import set_numba
from numlm.models.gpt import GPT2Config, GPT2LMHeadModel


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-numba", action="store_true")
    args = ap.parse_args(argv)
    set_numba(not args.no_numba)

    cfg = GPT2Config()  # the gpt2 defaults: 124M parameters
    t0 = time.perf_counter()
    model = GPT2LMHeadModel(cfg, seed=0, dtype="float32").train()
    build = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (args.batch, args.seq))

    fwd, bwd = [], []
    for step in range(args.warmup + args.steps):
        model.zero_grad()
        t0 = time.perf_counter()
        out = model(ids, labels=ids)
        t1 = time.perf_counter()
        model.backward()
        t2 = time.perf_counter()
        if step >= args.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    f, b = np.median(fwd), np.median(bwd)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rows = [
        ("model", "GPT-2 124M, float32, train mode (dropout on)"),
        ("parameters", f"{model.num_parameters() / 1e6:.1f} M"),
        ("batch x seq", f"{args.batch} x {args.seq}"),
        ("numba", "on" if not args.no_numba else "off"),
        ("build + init", f"{build:.2f} s"),
        ("forward (median)", f"{f * 1e3:.0f} ms"),
        ("backward (median)", f"{b * 1e3:.0f} ms"),
        ("step (median)", f"{(f + b) * 1e3:.0f} ms"),
        ("tokens / s", f"{args.batch * args.seq / (f + b):.0f}"),
        ("loss", f"{float(out.loss):.4f} (ln V = {np.log(cfg.vocab_size):.4f})"),
        ("peak RSS", f"{peak:.0f} MiB"),
    ]
    w = max(len(k) for k, _ in rows)
    print(f"| {'quantity'.ljust(w)} | value |")
    print(f"| {'-' * w} | ----- |")
    for k, v in rows:
        print(f"| {k.ljust(w)} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
