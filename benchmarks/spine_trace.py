"""How far a reader walks: the distinct numlm functions (and the files they live in) that one forward
with labels and one backward() run, traced with sys.settrace on the pure-NumPy path, tiny models,
after a warm-up call. Comprehensions and generator expressions are expressions inside a function,
not functions a reader walks to, and are not counted.

    python benchmarks/spine_trace.py            # the table
    python benchmarks/spine_trace.py --list     # and every function, in first-call order
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

import numlm

PACKAGE = str(Path(numlm.__file__).parent)
INLINE = {"<genexpr>", "<listcomp>", "<setcomp>", "<dictcomp>"}  # expressions, not functions a reader walks to


def trace(call):
    """The (file, function) pairs of numlm that `call()` runs, in first-call order."""
    seen = {}

    def tracer(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename.startswith(PACKAGE) and code.co_name not in INLINE:
            key = (os.path.relpath(code.co_filename, PACKAGE), code.co_qualname)
            seen.setdefault(key, None)
        return None

    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return list(seen)


def models():
    rng = np.random.default_rng(0)
    gpt = numlm.GPT2LMHeadModel(numlm.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    ids = rng.integers(0, 50, (2, 8))
    bert = numlm.BertForSequenceClassification(numlm.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3))
    mask = np.ones((2, 8), dtype=np.int64)
    mask[1, 6:] = 0
    roberta = numlm.RobertaForSequenceClassification(numlm.RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=18, num_labels=3))
    distil = numlm.DistilBertForSequenceClassification(numlm.DistilBertConfig(
        vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16, num_labels=3))
    labelled = dict(input_ids=ids, attention_mask=mask, labels=np.array([0, 2]))
    return [("GPT2LMHeadModel", gpt, dict(input_ids=ids, labels=ids)),
            ("BertForSequenceClassification", bert, labelled),
            ("RobertaForSequenceClassification", roberta, labelled),
            ("DistilBertForSequenceClassification", distil, labelled)]


def walks():
    """[(label, [(file, function), ...])] for each model's forward with labels and its backward()."""
    previous = numlm.set_numba(False)  # the NumPy path: the definition a reader reads
    try:
        listing = []
        for name, model, inputs in models():
            model(**inputs)  # warm-up: first-call imports and caches are not the reader's path
            model.backward()
            model.zero_grad()
            listing.append((f"`{name}` forward with labels", trace(lambda: model(**inputs))))
            listing.append(("its `backward()`", trace(model.backward)))
        return listing
    finally:
        numlm.set_numba(previous)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print every function traced")
    args = ap.parse_args()
    print("| pass | functions | files |\n| --- | --- | --- |")
    listing = walks()
    for label, fns in listing:
        print(f"| {label} | {len(fns)} | {len({f for f, _ in fns})} |")
    if args.list:
        for label, fns in listing:
            print(f"\n{label}:")
            for f, fn in fns:
                print(f"  {f}:{fn}")


if __name__ == "__main__":
    main()
