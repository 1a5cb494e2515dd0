"""Time LayerNorm, softmax and GELU forward+backward on a (16, 128, 768) float32 input, NumPy path vs
Numba path (median of several runs after a warmup call); with --gradcheck, also run the op
gradchecks of tests/test_ops.py and print the worst error measured per op.

    python benchmarks/bench_ops.py [--repeat 7] [--gradcheck]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from numlm import ops
from numlm.kernels import set_numba

ROOT = Path(__file__).resolve().parents[1]


def cases(x, dy):
    C = x.shape[-1]
    gamma, beta = np.ones(C, x.dtype), np.zeros(C, x.dtype)

    def layernorm():
        _, cache = ops.layernorm_forward(x, gamma, beta)
        ops.layernorm_backward(dy, cache)

    def softmax():
        _, cache = ops.softmax_forward(x)
        ops.softmax_backward(dy, cache)

    def gelu():
        _, cache = ops.gelu_forward(x)
        ops.gelu_backward(dy, cache)

    def gelu_tanh():
        _, cache = ops.gelu_tanh_forward(x)
        ops.gelu_backward(dy, cache)

    return {"layernorm": layernorm, "softmax": softmax, "gelu (erf)": gelu, "gelu (tanh)": gelu_tanh}


def median_time(fn, repeat):
    fn()  # warmup: compiles or loads the Numba cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing_table(repeat, shape=(16, 128, 768)):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    rows = []
    for name, fn in cases(x, dy).items():
        t = {}
        for flag in (False, True):
            previous = set_numba(flag)
            try:
                # the NumPy erf GELU calls math.erf per element (~1 s); fewer runs suffice
                t[flag] = median_time(fn, 1 if (name == "gelu (erf)" and not flag) else repeat)
            finally:
                set_numba(previous)
        rows.append((name, t[False], t[True]))
    load = os.getloadavg()[0]
    print(f"forward+backward, float32 {shape}, median ms; numba threads {numba.get_num_threads()}, "
          f"load average {load:.1f} on {os.cpu_count()} cores (parallel kernels suffer when it exceeds them)")
    print(f"{'op':<14}{'NumPy':>10}{'Numba':>10}{'speedup':>9}")
    for name, a, b in rows:
        print(f"{name:<14}{a * 1e3:>10.2f}{b * 1e3:>10.2f}{a / b:>8.1f}x")
    return rows


def gradcheck_table():
    with tempfile.TemporaryDirectory() as d:
        report = os.path.join(d, "worst.json")
        env = dict(os.environ, NUMLM_GRADCHECK_REPORT=report)
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "test_ops.py"), "-k", "gradcheck"], env=env, check=True,
                       cwd=ROOT)
        worst = json.loads(Path(report).read_text())
    print("worst float64 gradcheck error over the hypothesis runs (both paths)")
    for op, e in sorted(worst.items()):
        print(f"{op:<14}{e:>10.1e}")
    return worst


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--gradcheck", action="store_true", help="also run the op gradchecks, print worst errors")
    args = ap.parse_args()
    timing_table(args.repeat)
    if args.gradcheck:
        gradcheck_table()
