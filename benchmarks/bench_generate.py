"""Greedy generation speed of a random GPT-2 124M (float32) with and without the KV cache.

Config: transformers' gpt2 (12 layers, n_embd 768, 12 heads, vocab 50257, 1024 positions), random
weights, batch 1, a --prompt-token random prompt (default 32), --new-tokens greedy tokens (default 128),
no EOS so every run generates them all. Each mode runs in its own subprocess so its peak resident
memory (model included) is its own. Prints new tokens/s, time per token and peak memory.

    python benchmarks/bench_generate.py [--prompt 32] [--new-tokens 128] [--mode both|cache|nocache]
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(mode, prompt_len, new_tokens):
    from numlm.decoding import generate
    from numlm.models.gpt import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(), seed=0, dtype="float32").eval()
    mem_model = peak_mb()
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, prompt_len))
    use_cache = mode == "cache"
    generate(model, ids, max_new_tokens=2, eos_token_id=[], use_cache=use_cache)  # warm-up (Numba compile)
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], use_cache=use_cache)
    dt = time.perf_counter() - t0
    assert out.shape == (1, prompt_len + new_tokens)
    return {"mode": mode, "seconds": dt, "tokens_per_s": new_tokens / dt, "ms_per_token": 1e3 * dt / new_tokens,
            "peak_mb": peak_mb(), "model_mb": mem_model}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--mode", choices=["both", "cache", "nocache"], default="both")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child-process output
    a = ap.parse_args()
    if a.mode != "both":
        res = run(a.mode, a.prompt, a.new_tokens)
        print(json.dumps(res) if a.json else res)
        return
    print(f"GPT-2 124M float32, batch 1, {a.prompt}-token prompt, {a.new_tokens} new tokens, greedy")
    print(f"{'mode':10s} {'tokens/s':>9s} {'ms/token':>9s} {'total s':>8s} {'peak MB':>8s} {'model MB':>9s}")
    for mode in ("cache", "nocache"):
        p = subprocess.run([sys.executable, __file__, "--mode", mode, "--prompt", str(a.prompt),
                            "--new-tokens", str(a.new_tokens), "--json"], capture_output=True, text=True)
        if p.returncode:
            sys.exit(p.stderr)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{mode:10s} {r['tokens_per_s']:9.1f} {r['ms_per_token']:9.1f} {r['seconds']:8.2f} "
              f"{r['peak_mb']:8.0f} {r['model_mb']:9.0f}")


if __name__ == "__main__":
    main()
