"""Where a training step's time goes: time per op and per layer, for the forward pass, the backward
pass and the optimizer, as a share of the whole step.

    with Profile(model) as prof:
        for _ in range(steps):
            with prof.phase("forward"):
                out = model(**batch)
            with prof.phase("backward"):
                model.backward()
            with prof.phase("optimizer"):
                opt.step(model.grad_arrays())
    print(prof.table())

It times the public structure only: every Module's ``forward``/``backward`` of the model and every
``*_forward``/``*_backward`` op of ``numlm.ops``, seen through Python's profiling hook
(``sys.setprofile``): nothing in numlm is replaced or wrapped. ``Profile(model, clock="cpu")`` counts CPU time instead of
elapsed time, which other processes on a shared machine do not inflate. Time is *self* time: a block's row excludes its sublayers, an op's row
excludes nothing it calls (ops call no ops). Time in a module's own code outside any op (a matmul
written in the model, a concatenate) is the op "(module code)". What no module or op covers (Python
between calls, the optimizer's loop) is "(outside modules)", so the rows always sum to the step.
"""
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np

OUTSIDE = "(outside modules)"
# wall: elapsed time.  cpu: CPU time of all this process's threads, which other processes sharing
# the machine do not inflate (but idle waiting is not counted and two busy threads count twice)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
MODULE_CODE = "(module code)"


def _layer_of(path):
    """The layer a module path belongs to: the path up to its first list index
    (transformer.h.3.attn.c_attn -> transformer.h.3), else the path itself; the root is "(model)"."""
    if not path:
        return "(model)"
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return path


class Profile:
    """Context manager that times a model's modules and numlm's ops; see the module docstring."""

    def __init__(self, model, clock="wall"):
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
        self.model = model
        self.clock = clock
        self._now = CLOCKS[clock]
        self.records = defaultdict(float)     # (phase, layer path, op) -> self seconds
        self.calls = defaultdict(int)         # (phase, op) -> number of calls
        self.phase_time = defaultdict(float)  # phase -> wall seconds
        self._phase = None
        self._stack = []                      # open calls: [module path, op or None, child seconds, frame, start]

    # ------------------------------------------------------------ the hook
    def __enter__(self):
        from . import ops
        # by the function's own name: an alias (gelu_tanh_backward is gelu_backward) names no other op
        self._ops = {f.__code__: f.__name__ for n, f in vars(ops).items()
                     if callable(f) and hasattr(f, "__code__") and n.endswith(("_forward", "_backward"))}
        self._paths = {id(m): path for path, m in self.model.modules()}
        self._previous = sys.getprofile()
        sys.setprofile(self._event)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._previous)
        return False

    def _event(self, frame, event, arg):
        """sys.setprofile's callback: a frame opens on the call of a timed function, closes on its return."""
        if self._phase is None or event not in ("call", "return"):
            return
        if event == "return":
            if self._stack and self._stack[-1][3] is frame:
                self._close(self._stack.pop())
            return
        code = frame.f_code
        op = self._ops.get(code)
        if op is not None:
            parent = self._stack[-1] if self._stack else None
            self._stack.append([parent[0] if parent else None, op, 0.0, frame, self._now()])
        elif code.co_name in ("forward", "backward"):
            path = self._paths.get(id(frame.f_locals.get("self")))
            if path is not None:
                self._stack.append([path, None, 0.0, frame, self._now()])

    def _close(self, rec):
        mpath, op, child, _, t0 = rec
        dt = self._now() - t0
        if op is not None:
            self.calls[(self._phase, op)] += 1
            key = (self._phase, _layer_of(mpath) if mpath is not None else OUTSIDE, op)
        else:
            key = (self._phase, _layer_of(mpath), MODULE_CODE)
        self.records[key] += dt - child
        if self._stack:
            self._stack[-1][2] += dt

    @contextmanager
    def phase(self, name):
        """Time a phase ("forward", "backward", "optimizer", ...); nested phases are not allowed."""
        if self._phase is not None:
            raise ValueError(f"phase {name!r} started inside phase {self._phase!r}")
        self._phase = name
        t0 = self._now()
        try:
            yield
        finally:
            self.phase_time[name] += self._now() - t0
            self._phase = None

    # ------------------------------------------------------------ reading the result
    def rows(self):
        """[(phase, layer, op, seconds)] including each phase's "(outside modules)" remainder."""
        out = [(ph, layer, op, s) for (ph, layer, op), s in self.records.items()]
        for ph, total in self.phase_time.items():
            covered = sum(s for (p, _, _), s in self.records.items() if p == ph)
            out.append((ph, OUTSIDE, OUTSIDE, max(total - covered, 0.0)))
        return out

    def total(self):
        return sum(s for *_, s in self.rows())

    def by(self, *keys):
        """{key tuple: seconds}, keys among "phase", "layer", "op"."""
        idx = {"phase": 0, "layer": 1, "op": 2}
        acc = defaultdict(float)
        for r in self.rows():
            acc[tuple(r[idx[k]] for k in keys)] += r[3]
        return dict(acc)

    def table(self, steps=1, top=None):
        """The readable report: per phase, per op and per layer, ms per step and % of the step."""
        total = self.total()
        if total <= 0:
            return "(nothing timed)"
        pct = lambda s: 100.0 * s / total  # noqa: E731
        ms = lambda s: 1e3 * s / steps  # noqa: E731
        clock = "" if self.clock == "wall" else f", {self.clock} time"
        lines = [f"step {ms(total):.1f} ms (mean of {steps}{clock})", "",
                 f"{'phase':12s} {'ms':>9s} {'%':>6s}"]
        for (ph,), s in sorted(self.by("phase").items(), key=lambda kv: -kv[1]):
            lines.append(f"{ph:12s} {ms(s):9.1f} {pct(s):6.1f}")
        lines += ["", f"{'op':28s} {'phase':10s} {'calls':>6s} {'ms':>9s} {'%':>6s}"]
        ops = sorted(self.by("op", "phase").items(), key=lambda kv: -kv[1])
        for (op, ph), s in ops[:top]:
            n = self.calls.get((ph, op), 0) // steps
            lines.append(f"{op:28s} {ph:10s} {n if n else '':>6} {ms(s):9.1f} {pct(s):6.1f}")
        lines += ["", f"{'layer':34s} {'forward %':>9s} {'backward %':>10s} {'other %':>8s} {'total %':>8s}"]
        lay = self.by("layer", "phase")
        layers = sorted({k[0] for k in lay}, key=lambda n: -sum(v for k, v in lay.items() if k[0] == n))
        for n in layers:
            f, b = lay.get((n, "forward"), 0.0), lay.get((n, "backward"), 0.0)
            o = sum(v for k, v in lay.items() if k[0] == n) - f - b
            lines.append(f"{n:34s} {pct(f):9.1f} {pct(b):10.1f} {pct(o):8.1f} {pct(f + b + o):8.1f}")
        return "\n".join(lines)


# ---------------------------------------------------------------- named workloads

WORKLOADS = {
    "gpt-mini": dict(kind="gpt", L=4, heads=4, d=256, dff=1024, T=128, V=8192, B=16),
    "gpt-small": dict(kind="gpt", L=6, heads=6, d=384, dff=1536, T=256, V=8192, B=8),
    "bert-mini": dict(kind="bert", L=4, heads=4, d=256, dff=1024, T=128, V=8192, B=16),
}


def build_workload(name, dtype="float32", seed=0):
    """(model in train mode, batch dict) of a named workload: random ids, dropout off, float32.
    BERT: token types 0 then 1 at T/2, 15% of positions (never [CLS]) labelled for MLM, NSP labels."""
    import numlm
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    c = WORKLOADS[name]
    rng = np.random.default_rng(seed)
    B, T, V = c["B"], c["T"], c["V"]
    ids = rng.integers(0, V, (B, T))
    if c["kind"] == "gpt":
        cfg = numlm.GPT2Config(vocab_size=V, n_positions=T, n_embd=c["d"], n_layer=c["L"], n_head=c["heads"],
                               n_inner=c["dff"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return numlm.GPT2LMHeadModel(cfg, seed=seed, dtype=dtype).train(), dict(input_ids=ids, labels=ids)
    cfg = numlm.BertConfig(vocab_size=V, hidden_size=c["d"], num_hidden_layers=c["L"],
                           num_attention_heads=c["heads"], intermediate_size=c["dff"],
                           max_position_embeddings=T, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = numlm.BertForPreTraining(cfg, seed=seed, dtype=dtype).train()
    types = np.zeros_like(ids)
    types[:, T // 2:] = 1
    labels = np.full_like(ids, -100)
    k = int(0.15 * T)
    for r in range(B):
        pos = rng.choice(np.arange(1, T), k, replace=False)
        labels[r, pos] = rng.integers(0, V, k)
    return model, dict(input_ids=ids, token_type_ids=types, labels=labels,
                       next_sentence_label=rng.integers(0, 2, B))


def profile_training(model, batch, optimizer=None, steps=3, warmup=1, clock="wall"):
    """Run warmup + steps training steps (zero_grad, forward, backward, optimizer) and return the
    Profile of the timed steps. optimizer defaults to AdamW(lr=1e-4, weight_decay=0.01)."""
    from .optim import AdamW
    if optimizer is None:
        optimizer = AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step(prof):
        with prof.phase("zero_grad"):
            model.zero_grad()
        with prof.phase("forward"):
            model(**batch)
        with prof.phase("backward"):
            model.backward()
        with prof.phase("optimizer"):
            optimizer.step(model.grad_arrays())

    with Profile(model) as warm:
        for _ in range(warmup):
            step(warm)
    with Profile(model, clock) as prof:
        for _ in range(steps):
            step(prof)
    return prof
