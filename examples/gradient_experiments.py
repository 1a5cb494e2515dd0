"""How much precision does float32 lose in a transformer's gradients, and where?

Every gradient is computed twice from the same numbers: in float32, and in float64 from the
float32 weights and inputs (so the difference is arithmetic error only, not rounding the weights).
The error of an array is  max |a32 - a64| / max |a64|  (numlm's gradient-check measure), shown
also in units of float32's epsilon (2^-23 = 1.19e-7).

1. depth: GPT-2 (pre-LN) and BERT (post-LN), L = 1 ... 16 layers, T = 64: the worst and the
   median error over the parameters' gradients (those that are zero in exact arithmetic left out);
2. sequence length: the same GPT-2 with 4 layers, T = 16 ... 512;
3. ops one by one at typical shapes and scales: which lose the most.

Run: python examples/gradient_experiments.py [--out gradient_experiments.png] [--quick]
"""
import argparse
import sys

import numpy as np

import numlm
from numlm import ops

EPS32 = float(np.finfo(np.float32).eps)


def rel_error(a32, a64):
    a64 = np.asarray(a64, dtype=np.float64)
    scale = np.abs(a64).max()
    return float(np.abs(np.asarray(a32, dtype=np.float64) - a64).max() / scale) if scale > 0 else 0.0


def twin_models(cls, cfg, seed=0):
    """The same weights in float32 and, exactly, in float64."""
    m32 = cls(cfg, seed=seed, dtype="float32").eval()
    m64 = cls(cfg, seed=seed, dtype="float64").eval()
    m64.load_state_dict({k: v.astype(np.float64) for k, v in m32.state_dict().items()})
    return m32, m64


def gradient_errors(m32, m64, batch):
    """Error of every parameter's gradient (and of the loss) after one forward and backward each."""
    grads = {}
    for m in (m32, m64):
        m.zero_grad()
        out = m(**batch)
        m.backward()
        grads[m] = (float(m.objective(out)), {k: g.copy() for k, g in m.grad_arrays().items()})
    (l32, g32), (l64, g64) = grads[m32], grads[m64]
    # a gradient that is zero in exact arithmetic (BERT's key biases: softmax ignores a constant
    # added to a row of scores) is rounding noise in both dtypes: its relative error means nothing
    top = max(np.abs(g).max() for g in g64.values())
    errs = {k: rel_error(g32[k], g64[k]) for k in g64 if np.abs(g64[k]).max() > 1e-6 * top}
    return abs(l32 - l64) / abs(l64), errs


def gpt2(L, T, C=64, V=256):
    return numlm.GPT2LMHeadModel, numlm.GPT2Config(vocab_size=V, n_positions=max(T, 16), n_embd=C, n_layer=L,
                                                   n_head=4)


def bert(L, T, C=64, V=256):
    return numlm.BertForMaskedLM, numlm.BertConfig(vocab_size=V, hidden_size=C, num_hidden_layers=L,
                                                   num_attention_heads=4, intermediate_size=4 * C,
                                                   max_position_embeddings=max(T, 16))


def model_row(make, L, T, B=2, seed=0):
    cls, cfg = make(L, T)
    m32, m64 = twin_models(cls, cfg, seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    loss_err, errs = gradient_errors(m32, m64, {"input_ids": ids, "labels": ids})
    v = np.array(list(errs.values()))
    worst = max(errs, key=errs.get)
    return {"L": L, "T": T, "loss": loss_err, "median": float(np.median(v)), "worst": float(v.max()),
            "where": worst}


def op_rows(rng):
    """Each op's outputs and input gradients, float32 against float64 from the same float32 inputs."""
    def case(name, fwd, bwd, inputs, kw=None, grad_names=None):
        kw = kw or {}
        x32 = [a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in inputs]
        x64 = [a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in x32]
        out32, c32 = fwd(*x32, **kw)
        out64, c64 = fwd(*x64, **kw)
        dout = rng.standard_normal(np.shape(out64))
        g32 = bwd(dout.astype(np.float32) if np.ndim(out64) else np.float32(1.0), c32)
        g64 = bwd(dout if np.ndim(out64) else 1.0, c64)
        g32 = g32 if isinstance(g32, tuple) else (g32,)
        g64 = g64 if isinstance(g64, tuple) else (g64,)
        errs = {n: rel_error(a, b) for n, a, b in zip(grad_names, g32, g64) if b is not None}
        worst = max(errs, key=errs.get)
        return {"op": name, "out": rel_error(out32, out64), "grad": errs[worst], "of": worst}

    B, T, C, H, V = 4, 128, 256, 4, 8192
    x = rng.standard_normal((B, T, C))
    D = C // H
    q, k, v = (rng.standard_normal((B, H, T, D)) for _ in range(3))
    rows = [
        case("linear 256 -> 1024", ops.linear_forward, ops.linear_backward,
             (x, rng.standard_normal((C, 4 * C)) * 0.02, rng.standard_normal(4 * C) * 0.02), grad_names=("x", "w", "b")),
        case("layernorm", ops.layernorm_forward, ops.layernorm_backward,
             (x, 1 + 0.1 * rng.standard_normal(C), 0.1 * rng.standard_normal(C)), grad_names=("x", "gamma", "beta")),
        case("layernorm, mean 100 x std", ops.layernorm_forward, ops.layernorm_backward,
             (x + 100.0, 1 + 0.1 * rng.standard_normal(C), 0.1 * rng.standard_normal(C)),
             grad_names=("x", "gamma", "beta")),
        case("gelu (erf)", ops.gelu_forward, ops.gelu_backward, (3 * x,), grad_names=("x",)),
        case("gelu (tanh)", ops.gelu_tanh_forward, ops.gelu_tanh_backward, (3 * x,), grad_names=("x",)),
        case("softmax, logits ~ 5", ops.softmax_forward, ops.softmax_backward, (5 * x,), grad_names=("x",)),
        case(f"attention, causal, T={T}", ops.attention_forward, ops.attention_backward, (q, k, v),
             {"causal": True}, grad_names=("q", "k", "v")),
        case(f"attention, causal, T={4 * T}", ops.attention_forward, ops.attention_backward,
             tuple(rng.standard_normal((1, H, 4 * T, D)) for _ in range(3)), {"causal": True},
             grad_names=("q", "k", "v")),
        case(f"cross-entropy, V={V}", ops.cross_entropy_forward, ops.cross_entropy_backward,
             (3 * rng.standard_normal((B * T, V)), rng.integers(0, V, B * T)), grad_names=("logits",)),
    ]
    return sorted(rows, key=lambda r: -r["grad"])


def fmt(e):
    return f"{e:9.2e} ({e / EPS32:7.1f} eps)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gradient_experiments.png")
    p.add_argument("--quick", action="store_true", help="fewer, smaller points")
    a = p.parse_args(argv)
    depths = (1, 2, 4) if a.quick else (1, 2, 4, 8, 16)
    lengths = (16, 64) if a.quick else (16, 64, 256, 512)

    print("1. depth (C=64, H=4, T=64, B=2): error of the parameters' gradients, float32 vs float64")
    print(f"{'model':8s} {'L':>3s} {'loss':>9s} {'median over params':>26s} {'worst':>26s}  worst parameter")
    depth = {}
    for name, make in (("GPT-2", gpt2), ("BERT", bert)):
        depth[name] = [model_row(make, L, 64) for L in depths]
        for r in depth[name]:
            print(f"{name:8s} {r['L']:3d} {r['loss']:9.1e} {fmt(r['median']):>26s} {fmt(r['worst']):>26s}  {r['where']}")

    print("\n2. sequence length (GPT-2, L=4, C=64, B=2)")
    print(f"{'T':>5s} {'loss':>9s} {'median over params':>26s} {'worst':>26s}  worst parameter")
    length = [model_row(gpt2, 4, T) for T in lengths]
    for r in length:
        print(f"{r['T']:5d} {r['loss']:9.1e} {fmt(r['median']):>26s} {fmt(r['worst']):>26s}  {r['where']}")

    print("\n3. ops one by one (B=4, T=128, C=256), worst input gradient first")
    print(f"{'op':30s} {'output':>26s} {'input gradient':>26s}  of")
    opr = op_rows(np.random.default_rng(0))
    for r in opr:
        print(f"{r['op']:30s} {fmt(r['out']):>26s} {fmt(r['grad']):>26s}  {r['of']}")
    print(f"\n(Numba kernels {'on' if numlm.numba_enabled() else 'off'}; NUMLM_NUMBA=0 for the NumPy path)")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("no plot: pip install matplotlib")
        return 0
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, rows in depth.items():
        axes[0].plot([r["L"] for r in rows], [r["worst"] for r in rows], "o-", label=f"{name} worst")
        axes[0].plot([r["L"] for r in rows], [r["median"] for r in rows], "o--", label=f"{name} median")
    axes[0].set(yscale="log", xlabel="layers L", ylabel="relative error of gradients",
                title="float32 gradient error vs depth (T=64)")
    axes[1].plot([r["T"] for r in length], [r["worst"] for r in length], "o-", label="worst")
    axes[1].plot([r["T"] for r in length], [r["median"] for r in length], "o--", label="median")
    axes[1].set(yscale="log", xlabel="sequence length T", title="vs sequence length (GPT-2, L=4)")
    for ax, ticks in ((axes[0], depths), (axes[1], lengths)):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.axhline(EPS32, color="gray", linewidth=0.8, linestyle=":")
        ax.text(ax.get_xlim()[0], EPS32, " float32 eps", va="bottom", fontsize=8, color="gray")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    names = [r["op"] for r in opr][::-1]
    axes[2].barh(names, [r["grad"] for r in opr][::-1], color="tab:red", label="input gradient")
    axes[2].barh(names, [r["out"] for r in opr][::-1], color="tab:blue", height=0.4, label="output")
    axes[2].set(xscale="log", xlabel="relative error", title="ops, float32 vs float64")
    axes[2].axvline(EPS32, color="gray", linewidth=0.8, linestyle=":")
    axes[2].legend(fontsize=8)
    axes[2].tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    print(f"plot: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
