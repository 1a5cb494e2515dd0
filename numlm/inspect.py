"""See inside a model: whole-checkpoint gradient checks, attention maps, gradient flow during
training, and the plots of a run.

Everything here uses a model's public surface only (forward, backward, objective, parameters,
grad_arrays, output_attentions), so it works for every numlm model class.
"""
import contextlib
import functools
import json
import math
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .gradchecking import (ENTRIES, PROJECTION, REFERENCE, REF_RATIO, NonFinite, Uninformative, Verdict,
                           central_differences, check_eps, check_tol, largest, largest_at, last_forward_kept,
                           stream)
from .inference import text_ids
from .kernels.matmul import one_blas_thread  # thousands of forwards of a few tokens gain nothing from threads
from .nn import OPS, eval_mode
from .optim import sum_squares

__all__ = ["check_model", "check_checkpoint", "ModelCheck", "ParamCheck", "BREAKS", "broken_backward",
           "attention_maps", "AttentionMaps", "draw_attention", "layer_of", "GradientFlow", "plot_run",
           "write_plots", "plots_line"]

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."


# ---- whole-model gradient check ----------------------------------------------------------------
class ParamCheck(NamedTuple):
    name: str
    shape: tuple
    checked: int
    error: float       # max |analytic - numeric| / scale over the checked entries, or a Verdict
    scale: float       # the largest |gradient| entry checked (the parameter's largest analytic one among them)


class ModelCheck(NamedTuple):
    rows: list         # ParamCheck per parameter, then the input embeddings
    objective: str
    tokens: int
    seconds: float
    tol: float

    @property
    def worst(self):
        return max(self.rows, key=lambda r: r.error)  # a Verdict (non-finite, uninformative) compares as inf

    @property
    def passed(self):
        return self.worst.error <= self.tol

    def table(self):
        w = max(len(r.name) for r in self.rows)
        lines = [f"{'parameter':{w}s} {'shape':>12s} {'checked':>7s} {'max |grad|':>10s} {'max rel. error':>14s}"]
        for r in self.rows:
            lines.append(f"{r.name:{w}s} {str(tuple(r.shape)):>12s} {r.checked:7d} {r.scale:10.1e} {r.error:14.2e}")
        return "\n".join(lines + [self.summary()])

    def summary(self):
        """The verdict in one line: the worst measured error, then the rows that are not numbers."""
        measured = [r for r in self.rows if not isinstance(r.error, Verdict)]
        b = max(measured, key=lambda r: r.error, default=None)
        parts = [f"worst: {b.name} {b.error:.2e}" if b is not None else "no row measured"]
        parts[0] += f" ({'pass' if self.passed else 'FAIL'}: tolerance {self.tol:.0e})"
        for kind, why in ((NonFinite, "a NaN or inf gradient"),
                          (Uninformative, "gradients too small to compare (for a bare backbone, another "
                                          "seed draws another projection)")):
            n = sum(isinstance(r.error, kind) for r in self.rows)
            if n:
                parts.append(f"{n} {kind.label}: {why}")
        return "; ".join(parts + [f"{sum(r.checked for r in self.rows)} entries, objective {self.objective}, "
                                  f"{self.tokens} tokens, {self.seconds:.1f} s"])


def objective_inputs(model, input_ids):
    """Keyword arguments that give `model` a loss on `input_ids` (B, T): the text itself as the
    LM / MLM target, class 0 for classifier heads. {} for a bare backbone (no loss)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    B, T = ids.shape
    name = type(model).__name__
    cfg = model.config
    if T < 2 and ("LMHead" in name or "DoubleHeads" in name):  # numlm's are causal: labels shift by one
        raise ValueError(f"{name}'s LM objective needs at least 2 tokens (each predicts the next), got {T}")
    zeros = np.zeros(B, dtype=np.int64)
    if "DoubleHeads" in name:  # one choice per row, summarised at its last token
        return {"input_ids": ids[:, None], "labels": ids[:, None], "mc_token_ids": np.full((B, 1), T - 1),
                "mc_labels": zeros}
    if "PreTraining" in name:
        return {"input_ids": ids, "labels": ids, "next_sentence_label": zeros}
    if "LMHead" in name or "MaskedLM" in name:
        return {"input_ids": ids, "labels": ids}
    if "NextSentence" in name:
        return {"input_ids": ids, "labels": zeros}
    if "SequenceClassification" in name:
        K = cfg.num_labels
        if getattr(cfg, "problem_type", None) == "regression" or K == 1:
            return {"input_ids": ids, "labels": np.zeros(B) if K == 1 else np.zeros((B, K))}
        if getattr(cfg, "problem_type", None) == "multi_label_classification":
            return {"input_ids": ids, "labels": np.zeros((B, K))}
        return {"input_ids": ids, "labels": zeros}
    if "TokenClassification" in name:
        return {"input_ids": ids, "labels": np.zeros((B, T), dtype=np.int64)}
    if "QuestionAnswering" in name:
        return {"input_ids": ids, "start_positions": zeros, "end_positions": np.full(B, T - 1)}
    return {"input_ids": ids}


def _input_embedding_name(params):
    for suffix in ("word_embeddings.weight", "wte.weight", "tokens_embed.weight"):
        for k in params:
            if k.endswith(suffix):
                return k
    return None


def _analytic(model, kw, rng):
    """One forward and backward; returns (the scalar function of a forward's output, its gradients,
    the scalar's formula, whether it is a random projection). The scalar is model.objective(out)
    (what backward() differentiates) when the forward has a loss, else sum(last_hidden_state * R)
    (+ sum(pooler_output * R')) for R, R' drawn from rng."""
    out = model(**kw)
    model.zero_grad()
    if model.objective(out) is not None:
        model.backward()
        return model.objective, {k: g.copy() for k, g in model.grad_arrays().items()}, "model.objective(out)", False
    h = out.last_hidden_state
    R = rng.standard_normal(h.shape)
    Rp = rng.standard_normal(out.pooler_output.shape) if out.get("pooler_output") is not None else None

    def value(o):
        s = np.sum(o.last_hidden_state * R)
        return s if Rp is None else s + np.sum(o.pooler_output * Rp)
    model.backward(R if Rp is None else (R, Rp))
    what = "sum(last_hidden_state * R)" + ("" if Rp is None else " + sum(pooler_output * R')")
    return value, {k: g.copy() for k, g in model.grad_arrays().items()}, what, True


def check_model(model, input_ids, params=3, seed=0, eps=1e-6, tol=1e-5, break_=None, progress=None):
    """Float64 numerical gradient check of a whole model on `input_ids` (1, T).

    For every parameter, `params` entries (see _targets: its largest analytic entry, one drawn
    among all, the others among the non-zero ones, so an embedding table is not checked only where
    it is zero, nor a gradient a backward left at zero only where it is not) are compared with
    central differences  (f(w + eps) - f(w - eps)) / (2 eps)  of the scalar backward() differentiates;
    then `params` entries of the input tokens' embedding rows (the input embeddings' gradient).
    A row's error is  max |analytic - numeric| / max(largest |analytic|, largest |numeric|, floor)
    over its checked entries, with floor = 1e-3 times the largest numerical entry checked in the whole
    model (which no backward can inflate): a parameter whose gradient is zero in exact arithmetic (a key bias: softmax ignores a
    constant added to a row) then compares rounding noise with the model's gradient scale, and a
    wrong gradient still shows unless it is below tol * 1e-3 of the model's largest. Each
    parameter's largest analytic entry is checked, so an absurd one fails its row instead of
    shrinking the others' errors.
    A NaN or inf in either gradient makes the row NonFinite. A bare backbone (no loss) is checked
    on a random projection R of its outputs, drawn from a stream of gradcheck's own (see
    gradchecking.stream); a row whose gradients are tiny against those of an independent
    projection is Uninformative. Both compare as inf: the check does not pass.
    `break_` names an entry of BREAKS to corrupt while the analytic gradient is taken. The model's
    train/eval modes, accumulated gradients and last forward (what a backward() differentiates) are
    as they were afterwards, whether the check passes or raises.
    Each checked entry costs two forwards: keep the text short."""
    ids = _check_model_args(model, input_ids, params, seed, eps, tol, progress)
    grads = {k: g.copy() for k, g in model.grad_arrays().items()}
    try:
        with one_blas_thread(), eval_mode(model), last_forward_kept(model):
            return _check_model(model, ids, params, seed, eps, tol, break_, progress)
    finally:  # the model as it was: (its modes by eval_mode) the gradients it had accumulated
        for k, g in model.grad_arrays().items():
            g[...] = grads[k]


def _check_model_args(model, input_ids, params, seed, eps, tol, progress):
    """check_model's arguments, each refused by name; -> the ids (1, T)"""
    if hasattr(model, "base_model"):  # its objective is the base model's with the adapter's inputs
        raise ValueError(f"check_model takes a numlm model, not a {type(model).__name__}: check an adapter with "
                         f"numlm.gradcheck(peft_model, inputs)")
    if model.dtype != np.float64:
        raise ValueError(f"a gradient check needs a float64 model, got {model.dtype} (load with dtype='float64')")
    if isinstance(params, bool) or not isinstance(params, (int, np.integer)) or params < 1:
        raise ValueError(f"params must be a positive integer, got {params!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    check_eps(eps)
    check_tol(tol)
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be a callable or None, got {type(progress).__name__}")
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must be integer token ids of shape (1, T), got shape {ids.shape} dtype {ids.dtype}")
    if not model.trainable_parameters():
        raise ValueError("nothing to check: every parameter of the model is frozen")
    return ids


def _check_model(model, ids, params, seed, eps, tol, break_, progress):
    t0 = time.perf_counter()
    kw = objective_inputs(model, ids)
    value, grads, what, projected = _analytic(model, kw, stream(seed, PROJECTION))
    # a projection's gradients against an independent one's tell a degenerate draw
    reference = _analytic(model, kw, stream(seed, REFERENCE))[1] if projected else None
    if break_ is not None:
        with broken_backward(break_):
            value, broken, _, _ = _analytic(model, kw, stream(seed, PROJECTION))
        if all(np.array_equal(broken[k], g) for k, g in grads.items()):
            raise ValueError(f"breaking {break_!r} did not change this model's gradients: "
                             f"{type(model).__name__} does not use it")
        grads = broken

    def f():
        return float(value(model(**kw)))

    targets = _targets(model.parameters(), grads, ids, params, stream(seed, ENTRIES))
    numerics = []
    for i, (_, _, _, w, idx) in enumerate(targets):
        numerics.append(central_differences(f, w.reshape(-1), idx, eps))
        if progress is not None:
            progress(i + 1, len(targets))
    # the floor from the numerical gradients: no backward, however wrong, raises it
    floor = 1e-3 * max(largest(n) for n in numerics)
    rows = [_row(name, shape, grads[key], numeric, idx, None if reference is None else largest(reference[key]), floor)
            for (name, key, shape, _, idx), numeric in zip(targets, numerics)]
    return ModelCheck(rows, what, int(ids.shape[1]), time.perf_counter() - t0, tol)


def _targets(weights, grads, ids, params, rng):
    """(row name, parameter, row shape, weight, checked flat entries) for every trainable parameter,
    then for the input tokens' rows of the input embeddings."""
    targets = []
    for name, w in weights.items():
        if name not in grads:  # frozen: no gradient to check
            continue
        targets.append((name, name, w.shape, w, _entries(grads[name], params, rng)))
    emb = _input_embedding_name(weights)
    if emb is not None and emb in grads:
        w = weights[emb]
        rows = np.unique(ids)
        pick = rng.choice(len(rows) * w.shape[1], min(params, len(rows) * w.shape[1]), replace=False)
        flat = rows[pick // w.shape[1]] * w.shape[1] + pick % w.shape[1]
        targets.append((f"input embeddings ({emb}[input_ids])", emb, (ids.shape[1], w.shape[1]), w, flat))
    return targets


def _entries(g, params, rng):
    """min(params, g.size) flat entries of one parameter's gradient g: its largest |entry| (an absurd
    one fails there), one drawn among all (a region a backward left at zero), the rest among the
    non-zero ones (where a sparse gradient, an embedding table's, says something), then among all."""
    if params >= g.size:
        return np.arange(g.size)
    top = largest_at(g)
    chosen = [top]
    if params > 1:
        other = int(rng.integers(g.size - 1))
        chosen.append(other + (other >= top))  # any entry but top
    nonzero = np.flatnonzero(g)
    pool = nonzero[~np.isin(nonzero, chosen)]
    picked = rng.choice(pool, min(params - len(chosen), len(pool)), replace=False)
    chosen += picked.tolist()
    if len(chosen) < params:  # fewer non-zero entries than asked for
        rest = np.setdiff1d(np.arange(g.size), chosen)
        chosen += rng.choice(rest, params - len(chosen), replace=False).tolist()
    return np.array(chosen)


def _row(name, shape, g, numeric, idx, ref, floor):
    """One parameter's check over its compared entries idx: the error against max(their largest
    analytic or numeric entry, floor); NonFinite when a NaN or inf is in either gradient (anywhere
    in the analytic one); Uninformative when the projection's gradient is tiny against the one an
    independent projection gives (ref), or when every gradient of the model is zero."""
    compared = g.reshape(-1)[idx]
    gmax = max(largest(compared), largest(numeric))
    scale = max(gmax, floor)
    if not (np.isfinite(g).all() and np.isfinite(numeric).all()):
        err = NonFinite()
    elif scale == 0 or (ref is not None and ref > floor and gmax <= REF_RATIO * ref):
        err = Uninformative()
    else:
        err = float(np.abs(compared - numeric).max(initial=0.0)) / scale
    return ParamCheck(name, tuple(shape), len(idx), err, gmax)


def check_checkpoint(model_dir, text=DEFAULT_TEXT, params=3, seed=0, tol=1e-5, break_=None, progress=None):
    """check_model on a model directory (loaded in float64) and `text` tokenized by its tokenizer."""
    from .data import Tokenizer
    from .models import from_pretrained
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    model = from_pretrained(model_dir, dtype="float64")
    tok = Tokenizer.from_pretrained(model_dir)  # a folder, or a Hub name through the Hugging Face cache
    return check_model(model, text_ids(model, tok, text), params=params, seed=seed, tol=tol, break_=break_,
                       progress=progress)


# ---- deliberately broken backwards -------------------------------------------------------------
def _cache_field(cache, name, index):
    return getattr(cache, name) if hasattr(cache, name) else cache[index]


def _layernorm_no_mean(original, dy, cache, *more, **kw):
    """dx without its  - mean(dxhat)  term"""
    dx, dgamma, dbeta = original(dy, cache, *more, **kw)
    rstd, gamma = _cache_field(cache, "rstd", 1), _cache_field(cache, "gamma", 2)
    return dx + rstd[..., None] * (dy * gamma).mean(axis=-1, keepdims=True), dgamma, dbeta


def _attention_no_scale(original, dout, cache, *more, **kw):
    """dq and dk without the 1/sqrt(D) of  s = q k^T / sqrt(D)"""
    dq, dk, dv = original(dout, cache, *more, **kw)
    r = dq.dtype.type(math.sqrt(dq.shape[-1]))
    return dq * r, dk * r, dv


def _gelu_no_pdf_term(original, dy, cache, *more, **kw):
    """dy/dx = Phi(x) only: GELU differentiated as if Phi(x) were a constant (the x phi(x) term lost)"""
    x, approximate = _cache_field(cache, "x", 0), _cache_field(cache, "approximate", 1)
    if approximate:
        cdf = 0.5 * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    else:
        from .ops.activations import erf
        cdf = 0.5 * (1.0 + erf(x / math.sqrt(2)))
    return dy * cdf.astype(x.dtype)


def _linear_no_bias(original, dy, cache, *more, **kw):
    """the bias gradient forgotten (left at zero)"""
    dx, dw, db = original(dy, cache, *more, **kw)
    return dx, dw, None if db is None else np.zeros_like(db)


# name -> (what goes wrong, the keys of numlm.nn.OPS whose backward it corrupts, the corruption)
BREAKS = {
    "layernorm": ("LayerNorm's backward loses its mean term", ("layernorm",), _layernorm_no_mean),
    "attention": ("attention's backward forgets the 1/sqrt(D) scale in dq and dk", ("attention",),
                  _attention_no_scale),
    "gelu": ("GELU's backward loses its x phi(x) term", ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"),
             _gelu_no_pdf_term),
    "linear": ("linear's backward forgets the bias gradient", ("linear",), _linear_no_bias),
}


@contextlib.contextmanager
def broken_backward(name):
    """Corrupt one op's backward (see BREAKS) inside the block, in the table numlm.nn.OPS that every
    layer reads its ops from; restored on exit. numlm.ops itself is untouched."""
    if name not in BREAKS:
        raise ValueError(f"unknown break {name!r}; choose from {sorted(BREAKS)}")
    _, keys, corrupt = BREAKS[name]
    saved = {k: OPS[k] for k in keys}
    for k, (forward, backward) in saved.items():
        OPS[k] = (forward, functools.partial(corrupt, backward))
    try:
        yield BREAKS[name][0]
    finally:
        OPS.update(saved)


# ---- attention maps ----------------------------------------------------------------------------
class AttentionMaps(NamedTuple):
    tokens: list       # T token strings
    maps: np.ndarray   # (L, H, T, T): maps[l, h, i, j] = how much query i attends to key j


def token_labels(tokenizer, ids):
    """Readable token strings: byte-level BPE's space and newline markers shown as they print."""
    out = []
    for i in ids:
        t = tokenizer.id_to_token(int(i)) or f"<{int(i)}>"
        out.append(t.replace("\u0120", " ").replace("\u010a", "\\n").replace("\u0109", "\\t"))
    return out


def attention_maps(model, tokenizer, text):
    """The attention probabilities of every layer and head on `text` (one sequence, eval mode):
    AttentionMaps(tokens, maps (L, H, T, T)), exactly the model's output_attentions."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    if getattr(model, "kind", None) in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise ValueError(f"attention maps of a {model.kind.lower().replace('_', ' ')} model are not drawn: its "
                         "virtual tokens are keys no text token names (LoRA, IA3 and adapters are)")
    ids = text_ids(model, tokenizer, text)
    if ids.shape[1] == 0:
        raise ValueError(f"the tokenizer turned {text!r} into no tokens")
    with eval_mode(model):
        out = model(input_ids=ids, output_attentions=True)
    if out.get("attentions") is None:
        raise ValueError(f"{type(model).__name__} returned no attentions")
    maps = np.stack([np.asarray(a)[0] for a in out.attentions])  # (L, H, T, T)
    return AttentionMaps(token_labels(tokenizer, ids[0]), maps)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def attention_figure_size(L, H, T, layer=None, head=None):
    """(width, height) in inches of draw_attention's figure: 1.3 in per small map, 7 in for one."""
    if layer is not None and head is not None:
        return 7.0, 7.0
    rows, cols = (1, H) if layer is not None else (L, 1) if head is not None else (L, H)
    if rows == 1 or cols == 1:  # one layer's heads or one head's layers: a square-ish grid
        n = max(rows, cols)
        cols = min(n, 4)
        rows = -(-n // cols)
        return 3.2 * cols + 0.6, 3.2 * rows + 0.6
    return 1.3 * cols + 0.6, 1.3 * rows + 0.6


def draw_attention(tokens, maps, path, layer=None, head=None, title=None, dpi=100):
    """Heatmaps of maps (L, H, T, T) to a PNG: every layer x head, one layer's heads (layer=l), one
    head in every layer (head=h), or one head large (both). Rows are queries, columns keys."""
    plt = _pyplot()
    L, H, T, _ = maps.shape
    for name, v, n in (("layer", layer, L), ("head", head, H)):
        if v is not None and not 0 <= v < n:
            raise ValueError(f"{name} must be in 0..{n - 1}, got {v}")
    if layer is not None and head is not None:
        cells = [((layer, head), f"layer {layer}, head {head}")]
    elif layer is not None:
        cells = [((layer, h), f"head {h}") for h in range(H)]
    elif head is not None:
        cells = [((l, head), f"layer {l}") for l in range(L)]
    else:
        cells = [((l, h), None) for l in range(L) for h in range(H)]
    w, hgt = attention_figure_size(L, H, T, layer, head)
    grid = layer is None and head is None
    if len(cells) == 1:
        rows = cols = 1
    elif grid:
        rows, cols = L, H
    else:
        cols = min(len(cells), 4)
        rows = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w, hgt), squeeze=False)
    small = 4 if grid else (7 if len(cells) > 1 else 10)
    for k, ax in enumerate(axes.flat):
        if k >= len(cells):
            ax.axis("off")
            continue
        (l, h), label = cells[k]
        im = ax.imshow(maps[l, h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        r, c = divmod(k, cols)
        show_y = c == 0 or not grid
        show_x = r == rows - 1 or not grid
        ax.set_yticks(range(T), tokens if show_y else [], fontsize=small)
        ax.set_xticks(range(T), tokens if show_x else [], fontsize=small, rotation=90)
        ax.tick_params(length=0, pad=1)
        if label:
            ax.set_title(label, fontsize=small + 2)
        if len(cells) == 1:
            ax.set_xlabel("key", fontsize=small)
            ax.set_ylabel("query", fontsize=small)
            fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        if grid:
            if r == 0:
                ax.set_title(f"head {h}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"layer {l}", fontsize=7)
    title = title or "attention (rows: queries, columns: keys)"
    fig.suptitle(textwrap.shorten(title, width=int(w * 11), placeholder=" ..."), fontsize=10)  # fits the width
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ---- gradient flow during training -------------------------------------------------------------
def layer_of(name):
    """The layer a parameter belongs to: its dotted name up to the block index ("encoder.layer.3",
    "transformer.h.0"), else its first module ("bert.embeddings", "roberta.embeddings", "transformer.ln_f",
    "cls")."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    keep = 2 if parts[0] in ("bert", "roberta", "distilbert", "transformer") and len(parts) > 2 else 1
    return ".".join(parts[:keep])


def _group_norms(arrays):
    sq = {}
    for k, a in arrays.items():
        g = layer_of(k)
        sq[g] = sq.get(g, 0.0) + sum_squares(a)
    return {g: math.sqrt(v) for g, v in sq.items()}


class GradientFlow:
    """Per-layer gradient norm  ||g_layer||  and update-to-weight ratio  ||w_new - w_old|| / ||w_old||
    of one optimizer step. Call with the step's gradients before clipping and the optimizer step,
    then finish() after the step."""

    def __init__(self, params, grads):
        self.params = params
        self.grad_norm = _group_norms(grads)
        self.before = {k: params[k].copy() for k in grads}  # the trainable ones

    def finish(self):
        delta = {k: self.params[k] - w for k, w in self.before.items()}
        dn, wn = _group_norms(delta), _group_norms(self.before)
        ratio = {g: (dn[g] / wn[g] if wn[g] > 0 else 0.0) for g in dn}
        return {"layer_grad_norm": self.grad_norm, "layer_update_ratio": ratio}


# ---- plots of a run ----------------------------------------------------------------------------
PLOT_SIZE = (6.4, 4.0)   # inches; at PLOT_DPI = 100 each PNG is 640 x 400 pixels
PLOT_DPI = 100


def read_metrics(run_dir):
    """The records of a run's metrics.jsonl; a line torn by a killed process is skipped."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        raise ValueError(f"{str(run_dir)!r} has no metrics.jsonl (is it a numlm run folder?)")
    rows = []
    for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict)]


def _check_plotted(rows, run_dir):
    """plot_run's fields are numbers (a step an int, the per-layer fields {name: number}), or one line
    naming the first that is not: matplotlib would draw strings as categories."""
    def number(v, whole=False):
        return isinstance(v, int if whole else (int, float)) and not isinstance(v, bool)
    for r in rows:
        bad = [k for k in ("loss", "val_loss", "lr") if k in r and not number(r[k])]
        bad += [k for k in ("layer_grad_norm", "layer_update_ratio") if k in r and not (
            isinstance(r[k], dict) and all(number(v) for v in r[k].values()))]
        if bad or (r.keys() & PLOTTED and not number(r.get("step"), whole=True)):
            k = bad[0] if bad else "step"
            raise ValueError(f"{str(Path(run_dir) / 'metrics.jsonl')!r} is damaged: a record's {k} is "
                             f"{r.get(k)!r}, not {'a step number' if k == 'step' else 'a number'}")


PLOTTED = {"loss", "val_loss", "lr", "layer_grad_norm", "layer_update_ratio"}


def _layer_order(names):
    """Embeddings first, then blocks by index, then the rest (final norm, heads)."""
    def key(g):
        last = g.rsplit(".", 1)[-1]
        if last.isdigit():
            return (1, int(last), g)
        return (0 if "emb" in g or g.endswith(("wte", "wpe")) else 2, 0, g)
    return sorted(names, key=key)


def _series_plot(plt, path, title, ylabel, series, log=False):
    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    cmap = plt.get_cmap("viridis")
    n = len(series)
    for i, (label, xs, ys, style) in enumerate(series):
        kw = {"color": cmap(0.9 * i / max(n - 1, 1))} if style == "layer" else {}  # no pale yellow
        marked = style == "points" or len(xs) <= 30  # a short run's few points (or one) stay visible
        ax.plot(xs, ys, "o-" if marked else "-", label=label, markersize=3, linewidth=1.2, **kw)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    if n:
        ax.legend(fontsize=6 if n > 6 else 8, ncol=2 if n > 8 else 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def plot_run(run_dir):
    """loss.png (train and validation), lr.png, grad_norm.png and update_ratio.png (per layer) from a
    run's metrics.jsonl, each 640 x 400 pixels. Returns the paths written, or None without matplotlib."""
    try:
        plt = _pyplot()
    except ImportError:
        return None
    rows = read_metrics(run_dir)
    _check_plotted(rows, run_dir)
    out = Path(run_dir)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    paths = []
    series = [("train", [r["step"] for r in train], [r["loss"] for r in train], "line")]
    if val:
        series.append(("validation", [r["step"] for r in val], [r["val_loss"] for r in val], "points"))
    paths.append(_series_plot(plt, out / "loss.png", "loss", "loss (nats)", series))
    lr = [r for r in rows if "lr" in r]
    if lr:
        paths.append(_series_plot(plt, out / "lr.png", "learning rate", "learning rate",
                                  [("lr", [r["step"] for r in lr], [r["lr"] for r in lr], "line")]))
    for key, name, title in (("layer_grad_norm", "grad_norm.png", "gradient norm per layer (before clipping)"),
                             ("layer_update_ratio", "update_ratio.png", "update / weight norm per layer")):
        flow = [r for r in rows if key in r]
        if not flow:
            continue
        groups = _layer_order({g for r in flow for g in r[key]})
        series = [(g, [r["step"] for r in flow if g in r[key]], [r[key][g] for r in flow if g in r[key]], "layer")
                  for g in groups]
        paths.append(_series_plot(plt, out / name, title, name[:-4].replace("_", " "), series, log=True))
    return paths


def plots_line(run_dir, paths):
    """One line for the end of a run: the plots written, or how to get them without matplotlib."""
    if paths is None:
        return f"plots: pip install matplotlib, then: numlm plot {run_dir}"
    return "plots: " + ", ".join(str(p) for p in paths)


def write_plots(run_dir, log=print):
    """plot_run, then log plots_line; returns the paths (None without matplotlib)."""
    paths = plot_run(run_dir)
    log(plots_line(run_dir, paths))
    return paths
