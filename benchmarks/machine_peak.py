#!/usr/bin/env python
"""The machine's own limits, the figures that carry across machines: float32 sgemm GFLOP/s (square
products, numpy's BLAS on all the process's cores) and the memory bandwidth a GEMV streams (GPT-2's
tied LM head, 154 MB, four copies in turn so that no cache holds it, in both layouts: y = W x reads
W's rows as dot products, y^T = x^T W^T its columns as a sum of scaled rows; each in numpy's BLAS
and in numlm's own loops, rows_gemv and cols_gemv; the fastest of the four is the limit: with
OpenBLAS on the machines here ~26-30 and ~31-47 GB/s from run to run, numlm's row loop ~35-60), with
the CPU model and the BLAS kernels numpy runs. Prints one JSON line.

    python benchmarks/machine_peak.py [--sizes 512 1024 2048] [--samples 9]
"""
import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _benchutil, and the numlm of this clone

import numpy as np  # noqa: E402

from _benchutil import Sample  # noqa: E402


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def timed(fn, work, samples):
    """Median of work / seconds over the quiet samples (all samples when none is quiet)."""
    for _ in range(3):
        fn()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.1:
        fn()
        reps += 1
    reps = max(1, int(0.2 * reps / (time.perf_counter() - t0)))
    rates, quiet = [], []
    for _ in range(samples):
        with Sample() as s:
            for _ in range(reps):
                fn()
        rates.append(work * reps / s.dt)
        if s.foreign is not None and s.foreign <= 0.05:
            quiet.append(rates[-1])
    return statistics.median(quiet or rates), len(quiet)


# GEMVs cycle over this many copies of the 154 MB table: one copy fits the L3 of some EPYCs (3D V-Cache,
# 96 MB a CCD; one GEMV's two halves on two CCDs), which served it at up to 54 GB/s; decoding streams
# ~0.5 GB a token, so the limit is the bandwidth from memory
COPIES = 4


def gemv_rate(copies, fn, a):
    """GB/s of fn over the copies in turn, each call a different one (timed's median)"""
    turn = [0]

    def next_copy():
        fn(copies[turn[0] % len(copies)])
        turn[0] += 1
    return timed(next_copy, copies[0].nbytes / 1e9, a.samples)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--samples", type=int, default=9)
    a = ap.parse_args()
    from numlm.kernels.matmul import COLS_PARTS, blas_core, cols_gemv, rows_gemv
    rng = np.random.default_rng(0)
    sgemm = {}
    for n in a.sizes:
        x, y = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        out = np.empty((n, n), np.float32)
        sgemm[n] = timed(lambda: np.matmul(x, y, out=out), 2 * n ** 3 / 1e9, a.samples)[0]
    W = rng.standard_normal((50257, 768), dtype=np.float32)
    v, out = rng.standard_normal(768, dtype=np.float32), np.empty(50257, np.float32)
    gemv_rows = gemv_rate([W] + [W.copy() for _ in range(COPIES - 1)], lambda w: np.matmul(w, v, out=out), a)
    Wt = np.ascontiguousarray(W.T)
    x, out_t = v[None], out[None]
    gemv_columns = gemv_rate([Wt] + [Wt.copy() for _ in range(COPIES - 1)],
                             lambda w: np.matmul(x, w, out=out_t), a)
    parts = np.empty((COLS_PARTS, 1, Wt.shape[1]), np.float32)
    loop_rows = gemv_rate([W] + [W.copy() for _ in range(COPIES - 1)], lambda w: rows_gemv(w, x, out_t), a)
    loop_columns = gemv_rate([Wt] + [Wt.copy() for _ in range(COPIES - 1)],
                             lambda w: cols_gemv(x, w, parts, out_t), a)
    by_layout = {"W x": gemv_rows, "x^T W^T": gemv_columns, "W x, numlm's loop": loop_rows,
                 "x^T W^T, numlm's loop": loop_columns}
    print(json.dumps({"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "blas_core": blas_core(),
                      "sgemm_gflops": max(sgemm.values()), "sgemm_by_size": sgemm,
                      "gemv_gb_per_s": max(by_layout.values()), "gemv_by_layout": by_layout}))


if __name__ == "__main__":
    main()
