"""`numlm gradcheck [MODEL_DIR]`, `numlm attention` and `numlm plot`: registered on the main parser
by add_parsers(subparsers)."""
import sys
from pathlib import Path

import numpy as np


def op_table(a):
    """Check every op's hand-written backward against central differences and print the errors
    (the layers' ops as numlm.nn.OPS holds them, so a --break shows)."""
    from .. import ops
    from ..nn import OPS
    rng = np.random.default_rng(a.seed)
    x = rng.standard_normal((2, 5, 8))
    q, k, v = (rng.standard_normal((2, 2, 5, 4)) for _ in range(3))
    cases = {
        "linear": (*OPS["linear"], (x, rng.standard_normal((8, 6)), rng.standard_normal(6)), {}),
        "embedding": (*OPS["embedding"], (rng.integers(0, 9, (2, 5)), rng.standard_normal((9, 4))), {}),
        "layernorm": (*OPS["layernorm"], (x, rng.standard_normal(8), rng.standard_normal(8)), {}),
        "gelu (erf)": (*OPS["gelu"], (x,), {}),
        "gelu (tanh)": (*OPS["gelu_new"], (x,), {}),
        "softmax": (ops.softmax_forward, ops.softmax_backward, (x * 5,), {}),
        "attention (causal + padding)": (*OPS["attention"],
                                         (q, k, v, np.array([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])), {"causal": True}),
        "dropout": (*OPS["dropout"], (x, 0.2, np.random.default_rng(0)), {}),
        "cross-entropy": (ops.cross_entropy_forward, ops.cross_entropy_backward,
                          (rng.standard_normal((6, 11)) * 4, np.array([1, 3, -100, 10, 0, 2])), {}),
    }
    return print_op_table(cases, 1e-6 if a.tol is None else a.tol)


def print_op_table(cases, tol=1e-6):
    """Check each case (forward, backward, inputs, kwargs) and print one row per input; 0 when every
    error is a number below tol, else 1 (a non-finite or uninformative check is not a pass)."""
    from collections import Counter
    from ..gradchecking import Verdict, gradcheck
    print(f"{'op':32s} {'input':8s} {'max relative error':>20s}")
    errors = []
    for name, (f, b, inputs, kw) in cases.items():
        for inp, err in gradcheck(f, inputs, b, kwargs=kw).items():
            errors.append(err)
            print(f"{name:32s} {inp:8s} {err:20.2e}")
    measured = [e for e in errors if not isinstance(e, Verdict)]
    verdicts = Counter(e.label for e in errors if isinstance(e, Verdict))
    print(f"worst error {max(measured, default=0.0):.2e} (float64 central differences, random upstream gradient)"
          + "".join(f"; {n} {label}" for label, n in verdicts.items()))
    return 0 if max(errors) < tol else 1


def cmd_gradcheck(a):
    """With a model directory: the whole-checkpoint check; without: every op's backward."""
    from ..inspect import broken_backward, check_checkpoint, BREAKS, DEFAULT_TEXT
    if a.model is None:
        if a.text is not None or a.params is not None:
            raise ValueError("--text and --params need a MODEL_DIR")
        if a.break_ is None:
            return op_table(a)
        with broken_backward(a.break_) as what:
            print(f"broken on purpose: {what}")
            return op_table(a)
    from tqdm.auto import tqdm
    if a.break_ is not None:
        print(f"broken on purpose: {BREAKS[a.break_][0]}")
    bars = []  # made at the first entry checked: a refused input prints its one line alone

    def progress(i, n):
        if not bars:
            bars.append(tqdm(total=n, unit="param", file=sys.stderr, dynamic_ncols=True, leave=False))
        bars[0].update(1)
    try:
        res = check_checkpoint(a.model, text=DEFAULT_TEXT if a.text is None else a.text,
                               params=3 if a.params is None else a.params, seed=a.seed,
                               tol=1e-5 if a.tol is None else a.tol,
                               break_=a.break_, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    print(res.table())
    return 0 if res.passed else 1


def cmd_attention(a):
    from .inference import _load
    from ..inspect import attention_maps, draw_attention
    from ..io import check_folder_path
    out = Path(a.out)
    if out.suffix.lower() != ".png" or out.is_dir():
        raise ValueError(f"--out must name a .png file, got {a.out!r}")
    check_folder_path(out.parent, "--out")
    model, tok = _load(a.model, "float32")
    tokens, maps = attention_maps(model, tok, a.text)
    base = getattr(model, "base_model", model)
    kind = "causal" if base.config.model_type in ("gpt2", "openai-gpt") else "bidirectional"
    path = draw_attention(tokens, maps, out, layer=a.layer, head=a.head,
                          title=f"{type(base).__name__} attention ({kind}): {' '.join(tokens)}")
    L, H, T, _ = maps.shape
    print(f"{L} layers x {H} heads over {T} tokens -> {path}")
    return 0


def cmd_plot(a):
    from ..inspect import plot_run, read_metrics
    if not any(isinstance(r.get("step"), int) for r in read_metrics(a.run)):
        raise ValueError(f"{str(Path(a.run) / 'metrics.jsonl')!r} holds no metrics rows (empty, or not a numlm "
                         f"run's metrics.jsonl): nothing to plot")
    paths = plot_run(a.run)
    if paths is None:
        raise ValueError("numlm plot needs matplotlib: pip install matplotlib")
    for p in paths:
        print(p)
    return 0


def add_parsers(sub):
    from .args import count, number
    from ..inspect import BREAKS
    g = sub.add_parser("gradcheck", help="check every op's backward, or a whole checkpoint's gradients, "
                       "against numerical gradients")
    g.add_argument("model", nargs="?", help="model directory: check its gradients on real text (float64)")
    g.add_argument("--text", help="the text the model is checked on (keep it short: each entry costs two forwards)")
    g.add_argument("--params", type=count(1), help="entries checked per parameter: its largest, one drawn among all, "
                                                      "the rest among the non-zero ones (default 3)")
    g.add_argument("--seed", type=count(0), default=0)
    g.add_argument("--tol", type=number(0.0, 1.0), default=None,  # a relative error of 1 is a zero gradient
                   help="largest relative error that passes, below 1 (default 1e-5 for a model, 1e-6 for the op table)")
    g.add_argument("--break", dest="break_", choices=sorted(BREAKS),
                   help="corrupt one op's backward on purpose, to see the check catch it")
    g.set_defaults(fn=cmd_gradcheck)

    at = sub.add_parser("attention", help="draw a model's attention maps on a text as heatmaps")
    at.add_argument("model", help="model directory (config.json, model.safetensors, tokenizer)")
    at.add_argument("--text", required=True)
    at.add_argument("--layer", type=count(0), help="only this layer's heads")
    at.add_argument("--head", type=count(0), help="only this head (with --layer: one map, large)")
    at.add_argument("--out", default="attention.png", help="PNG file to write")
    at.set_defaults(fn=cmd_attention)

    p = sub.add_parser("plot", help="draw a run's loss, learning rate and per-layer gradient flow as PNGs")
    p.add_argument("run", help="run folder holding metrics.jsonl (e.g. runs/demo)")
    p.set_defaults(fn=cmd_plot)
