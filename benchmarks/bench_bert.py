"""BERT-base forward + backward time and peak memory (float32), random weights.

Config: transformers' bert-base-uncased (12 layers, hidden 768, 12 heads, intermediate 3072,
vocab 30522, 110M parameters in BertForPreTraining), batch B x T = 2 x 128 of random ids, MLM
labels on 15% of the positions plus NSP labels, dropout as configured (train mode, p = 0.1) or off
(--eval). Prints median time of forward, backward and the sum over --steps timed steps after one
warm-up step (which also compiles the Numba kernels), and the process's peak resident memory.

    python benchmarks/bench_bert.py [--steps 5] [--batch 2] [--seq 128] [--eval] [--profile]
"""
import argparse
import cProfile
import pstats
import resource
import time

import numpy as np

from numlm.models.bert import BertConfig, BertForPreTraining


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--eval", action="store_true", help="dropout off")
    ap.add_argument("--profile", action="store_true", help="cProfile one step, print the top functions")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = BertForPreTraining(BertConfig(), seed=0, dtype="float32")
    model.train(not args.eval)
    t_init = time.perf_counter() - t0
    mem_model = peak_mb()
    rng = np.random.default_rng(0)
    B, T, V = args.batch, args.seq, model.config.vocab_size
    ids = rng.integers(999, V, (B, T))
    labels = np.where(rng.random((B, T)) < 0.15, ids, -100)
    batch = dict(input_ids=ids, attention_mask=np.ones((B, T), dtype=np.int64),
                 token_type_ids=(np.arange(T) >= T // 2).astype(np.int64)[None].repeat(B, 0),
                 labels=labels, next_sentence_label=rng.integers(0, 2, B))

    def step():
        model.zero_grad()
        a = time.perf_counter()
        model(**batch)
        b = time.perf_counter()
        model.backward()
        c = time.perf_counter()
        return b - a, c - b

    step()  # warm-up: Numba compilation, first-touch of gradient buffers
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    times = np.array([step() for _ in range(args.steps)])
    fwd, bwd = np.median(times[:, 0]), np.median(times[:, 1])
    tot = np.median(times.sum(axis=1))
    print(f"BertForPreTraining (bert-base) {model.num_parameters() / 1e6:.1f}M parameters, float32, "
          f"B x T = {B} x {T}, dropout {'off' if args.eval else 'on'}, {args.steps} steps (median)")
    print(f"| {'phase':<18} | {'value':>12} |")
    print(f"| {'-' * 18} | {'-' * 12} |")
    for name, v in [("init (s)", t_init), ("forward (s)", fwd), ("backward (s)", bwd), ("fwd+bwd (s)", tot),
                    ("tokens/s", B * T / tot), ("RSS after init (MB)", mem_model), ("peak RSS (MB)", peak_mb())]:
        print(f"| {name:<18} | {v:>12.3f} |")


if __name__ == "__main__":
    main()
