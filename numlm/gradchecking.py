"""Numerical gradient checking for any op, layer or whole model.

The analytic gradient of  f = sum(out * dout)  (dout random, never all-ones: with all-ones some
gradients vanish identically, e.g. softmax's) is compared with the float64 central difference
(f(x + eps e_i) - f(x - eps e_i)) / (2 eps), entry by entry. dout comes from a random stream of
gradcheck's own (a spawn key no integer seed has), so it never equals an input the user drew
from default_rng(seed) with the same seed.

The error reported per input is  max_i |analytic_i - numeric_i| / max(max_i |analytic_i|, max_i |numeric_i|)
over the compared entries i, relative to the largest of them, so near-zero entries do not blow it up. The
compared entries always include the largest |analytic| entry: an absurd entry a backward wrote (an
np.empty row it forgot) is compared, and fails, instead of swamping the scale of the others.
Two results are not numbers (see Verdict): non-finite, when either gradient holds NaN or inf, and
uninformative, when both gradients are so small that they compare rounding noise.
"""
import contextlib
import inspect
import math
import re

import numpy as np

__all__ = ["gradcheck", "Verdict", "Uninformative", "NonFinite"]

EPS_RANGE = (1e-10, 1.0)  # central-difference steps: below, float64 round-off swamps f(x + eps) - f(x - eps)

STREAM = 0x67726164  # spawn key of gradcheck's random streams ("grad")
UPSTREAM, REFERENCE, ENTRIES, PROJECTION = range(4)  # what each stream draws (PROJECTION: numlm.inspect)
REF_RATIO = 1e-3    # gradients this much smaller than under an independent dout: a degenerate dout
NOISE_RATIO = 1e-7  # ... than the largest of any checked input: zero up to rounding, noise against noise


def stream(seed, purpose):
    """The Generator gradcheck draws `purpose` from (UPSTREAM, REFERENCE, ENTRIES, PROJECTION) for
    `seed`: default_rng(seed) has no spawn key, so no user seed reproduces it."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(STREAM, purpose)))


class Verdict(float):
    """A check's result that is not an error: it compares as inf, so it never passes a tolerance and
    is always the worst, and prints as its label."""
    label = "?"

    def __new__(cls, value=math.inf):  # value: what pickle and copy pass back; always inf
        return super().__new__(cls, math.inf)

    def __repr__(self):
        return self.label

    __str__ = __repr__

    def __format__(self, spec):
        width = re.match(r"[<>^]?\d*", spec).group()  # the spec's alignment and width, not its precision
        return format(self.label, width if width[:1] in "<>^" else ">" + width)


class Uninformative(Verdict):
    """Both gradients are tiny against the same input's under an independent dout (the drawn dout
    is nearly orthogonal to what the input can change), or against the largest gradient of any
    checked input (zero up to rounding): the check compares noise with noise and says nothing."""
    label = "uninformative"


class NonFinite(Verdict):
    """The analytic or the numerical gradient holds NaN or inf: a failure, never a pass."""
    label = "non-finite"


def _generators(module):
    gens = {}
    for _, m in module.modules():
        for v in vars(m).values():
            if isinstance(v, np.random.Generator):
                gens[id(v)] = v
    return list(gens.values())


def largest_at(g):
    """The flat index of g's largest |entry| (a NaN or inf first: it is the most wrong)."""
    a = np.abs(np.asarray(g, dtype=np.float64)).reshape(-1)
    return int(np.argmax(np.where(np.isfinite(a), a, np.inf)))


def _entries(g, max_entries, rng):
    """The flat entries of g to compare: all, or max_entries of them, the largest |g| among them and
    the others drawn among all."""
    size = g.size
    if max_entries is None or size <= max_entries:
        return np.arange(size)
    top = largest_at(g)
    rest = rng.choice(size - 1, max_entries - 1, replace=False)
    return np.sort(np.append(rest + (rest >= top), top))  # every entry but top, then top


def largest(g):
    """The largest |entry| among the finite entries of g (0 for none)."""
    g = np.abs(np.asarray(g, dtype=np.float64))
    return float(g.max(where=np.isfinite(g), initial=0.0))


def _degenerate(gmax, ref, floor):
    """Whether gradients whose largest entry is gmax say nothing: at most `floor`, or at most REF_RATIO
    of ref, the largest entry under an independent upstream gradient (None without one), when that
    one is above the floor."""
    return gmax <= floor or (ref is not None and ref > floor and gmax <= REF_RATIO * ref)


def _error(analytic, numeric, idx, ref, floor):
    """max |analytic - numeric| over the entries idx / the largest of those entries of either; NonFinite
    (a NaN or inf anywhere in analytic, compared or not) or Uninformative (see _degenerate) instead
    when it is not a measure of the backward."""
    analytic = np.asarray(analytic, dtype=np.float64)
    if not (np.isfinite(analytic).all() and np.isfinite(numeric).all()):
        return NonFinite()
    compared = analytic.reshape(-1)[idx]
    gmax = max(largest(compared), largest(numeric))
    if _degenerate(gmax, ref, floor):
        return Uninformative()
    return float(np.abs(compared - numeric).max(initial=0.0) / gmax)


def _loss(out, module):
    """The scalar a module's backward() differentiates: its `objective(out)` (e.g. lm_coef * loss +
    mc_loss), else out.loss; None when the forward had none."""
    objective = getattr(module, "objective", None)
    return objective(out) if objective is not None else getattr(out, "loss", None)


def _output_value(out, module=None):
    """The array a forward produced: its loss (see _loss), or the array itself."""
    loss = _loss(out, module)
    if loss is not None:
        return np.asarray(loss, dtype=np.float64)
    if isinstance(out, np.ndarray) or np.isscalar(out):
        return np.asarray(out, dtype=np.float64)
    if isinstance(out, dict):  # a model output without loss: its first array (transformers' to_tuple()[0])
        for v in out.values():
            if isinstance(v, np.ndarray):
                return np.asarray(v, dtype=np.float64)
    raise ValueError(f"cannot check gradients of an output of type {type(out).__name__}: expected an array, "
                     "a scalar or a model output with .loss")


def _real(v):
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))


def check_eps(eps):
    lo, hi = EPS_RANGE
    if not _real(eps) or not lo <= eps <= hi:
        raise ValueError(f"eps must be a number in [{lo:g}, {hi:g}] (the central-difference step; a smaller one "
                         f"compares float64 round-off), got {eps!r}")


def check_tol(tol):
    """A relative error is at most 2, and 1 when one gradient is zero: a tol of 1 or more passes anything."""
    if not _real(tol) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number in (0, 1) (the largest relative error that passes), got {tol!r}")


def _check_arguments(fn, backward, eps, max_entries, seed, kwargs):
    if not callable(fn):
        raise ValueError(f"fn must be an op's forward or a Module, got {type(fn).__name__}")
    if backward is not None and not callable(backward):
        raise ValueError(f"backward must be callable, got {type(backward).__name__}")
    check_eps(eps)
    if max_entries is not None and (isinstance(max_entries, bool) or not isinstance(max_entries, (int, np.integer))
                                    or max_entries < 1):
        raise ValueError(f"max_entries must be an integer >= 1 (or None for every entry), got {max_entries!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"kwargs must be a dict, got {type(kwargs).__name__}")
    is_module = hasattr(fn, "parameters") and hasattr(fn, "backward") and backward is None
    if not is_module and backward is None:
        raise ValueError("pass the analytic backward for an op, or a Module")
    return is_module


def _bind(fn, inputs):
    """(names, values, as_dict): the inputs' names from the function's signature (or the dict's keys),
    their values with floating-point arrays copied (writable, contiguous, of their own shape: each is
    perturbed alone through a flat view), and whether fn takes them by keyword."""
    if isinstance(inputs, dict):
        names, values = list(inputs), list(inputs.values())
    else:
        values = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        target = fn.forward if hasattr(fn, "forward") else fn
        try:
            sig = list(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            sig = []
        names = [sig[i] if i < len(sig) else f"arg{i}" for i in range(len(values))]
    for i, v in enumerate(values):
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            if v.dtype != np.float64:
                raise ValueError(f"gradcheck needs float64 inputs; {names[i]} is {v.dtype}")
            values[i] = np.array(v, order="C")  # a copy: a read-only input, x passed as q, k and v, a 0-d scale
    return names, values, isinstance(inputs, dict)


class _Run:
    """fn on fixed inputs, each call with the Generators its dropout draws from rewound to their
    state before the first."""

    def __init__(self, fn, backward, names, values, as_dict, kwargs, is_module):
        self.fn, self.backward, self.names, self.values, self.kwargs = fn, backward, names, values, kwargs
        self.as_dict, self.module = as_dict, (fn if is_module else None)
        self.floating = [i for i, v in enumerate(values) if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
        gens = _generators(fn) if is_module else []
        gens += [v for v in values + list(kwargs.values()) if isinstance(v, np.random.Generator)]
        self.gens, self.states = gens, [g.bit_generator.state for g in gens]

    def forward(self):
        """(out, cache) for an op, (out, None) for a module."""
        for g, s in zip(self.gens, self.states):
            g.bit_generator.state = s
        if self.as_dict:
            res = self.fn(**dict(zip(self.names, self.values)), **self.kwargs)
        else:
            res = self.fn(*self.values, **self.kwargs)
        return res if self.module is None else (res, None)

    def value(self):
        return _output_value(self.forward()[0], self.module)


TARGETS = ("labels", "label")  # a floating-point input so named is a loss's target (regression labels)


def _left_gradient(module, name):
    """The gradient of input `name` a numlm model's backward leaves on a submodule instead of returning
    it (inputs_embeds: transformer.inputs_embeds_grad, embeddings.inputs_embeds_grad); None without."""
    for _, m in module.modules():
        g = getattr(m, f"{name}_grad", None)
        if isinstance(g, np.ndarray):
            return g.copy()
    return None


def _input_gradients(run, grads):
    """{input name: gradient} from what a backward returned: one gradient per floating-point input,
    in order (None for an input it does not differentiate). A module's input it returns nothing for
    (all of them when backward() differentiates a loss) is read from `<name>_grad` (see _left_gradient);
    without one, a floating-point target passes through and any other input is refused by name."""
    grads = () if grads is None else grads if isinstance(grads, tuple) else (grads,)
    floating = run.floating
    extra = any(g is not None for g in grads[len(floating):])  # allowed from a module taking only integer inputs
    if (run.module is None and len(grads) < len(floating)) or (extra and (run.module is None or floating)):
        raise ValueError(f"backward returned {len(grads)} gradient(s) for {len(floating)} floating-point "
                         f"input(s) ({', '.join(run.names[i] for i in floating) or 'none'}): it must return one "
                         f"per floating-point input, in order")
    out = {}
    for j, i in enumerate(floating):
        name = run.names[i]
        g = grads[j] if j < len(grads) else None if run.module is None else _left_gradient(run.module, name)
        if g is not None:
            out[name] = np.asarray(g, dtype=np.float64)
        elif j >= len(grads) and not name.endswith(TARGETS):
            raise ValueError(f"{type(run.module).__name__}.backward gives no gradient for the floating-point input "
                             f"{name} (it neither returns one nor leaves {name}_grad): pass a mask or ids as integers")
    return out


def _backward_pass(run, rng, params):
    """One forward and backward: (dout, {name: analytic gradient}) for the inputs and, as
    ``param:<name>``, the module parameters `params`. dout is drawn from rng, or None when the
    output is a module's loss (backward() differentiates it)."""
    out, cache = run.forward()
    value = _output_value(out, run.module)
    has_loss = run.module is not None and _loss(out, run.module) is not None
    dout = None if has_loss else rng.standard_normal(value.shape)
    if run.module is None:
        return dout, _input_gradients(run, run.backward(dout, cache))
    run.fn.zero_grad()
    grads = run.fn.backward() if has_loss else run.fn.backward(dout)
    grads = _input_gradients(run, None if has_loss else grads)
    arrays = run.fn.grad_arrays()
    grads.update({f"param:{k}": arrays[k].copy() for k in params if k in arrays})
    return dout, grads


@contextlib.contextmanager
def last_forward_kept(module):
    """Every module's attributes as they were before the block (the module itself too, a PeftModel that
    modules() does not list): its last forward's cache (a model's _last, attention's present), so a
    backward() after a check differentiates the caller's forward, not the check's last probe with a
    perturbed weight. Forwards only ever replace these, never write into them, so the references kept
    are the caller's caches unchanged. Gradients stay the check's: the parameters' are written in
    place, and the inputs' a backward leaves on a module (inputs_embeds_grad, past_grads, dpast) are kept.
    Inside the block, what a module's backward treats as a constant (Module.detached: DoRA's weight norm)
    is held at its value, so central differences do not move it (gradcheck and inspect.check_model)."""
    mods = [m for _, m in module.modules()]
    saved = [(m, dict(vars(m))) for m in mods + [module] * all(m is not module for m in mods)]
    try:
        for m in mods:
            vars(m).update(m.detached())
        yield
    finally:
        for m, attrs in saved:
            grads = {k: v for k, v in vars(m).items() if k.endswith(GRADIENTS_LEFT)}
            vars(m).clear()
            vars(m).update(attrs, **grads)


GRADIENTS_LEFT = ("_grad", "past_grads", "dpast")  # what a backward leaves on a module, by attribute name


def gradcheck(fn, inputs, backward=None, *, kwargs=None, eps=1e-6, seed=0, max_entries=None,
              check_params=True):
    """Largest relative error between analytic and numerical gradients, per checked input.

    Two forms:
      * an op pair, numlm's contract:  ``out, cache = fn(*inputs, **kwargs)`` and
        ``backward(dout, cache)`` returning one gradient per floating-point input, in order;
      * a Module (a layer or a whole model): ``out = fn(*inputs, **kwargs)`` then
        ``fn.backward(dout)`` returning the input gradient(s), or ``fn.backward()`` when the output
        has a ``.loss`` (for models, the scalar their ``objective(out)`` names); every parameter
        of the module is checked too (``check_params``). A floating-point input whose gradient the
        backward does not return is read where numlm's models leave it (inputs_embeds:
        ``inputs_embeds_grad``); a floating-point target (``labels``) passes through; any other is refused.
        The module keeps the checked pass's gradients, and its last forward is the caller's again.
    ``inputs`` is a tuple of positional arguments or a dict of keyword arguments; integer arrays
    (token ids, labels, masks) pass through unchecked. Floating-point inputs (copied, never written)
    and module parameters must be float64. ``max_entries`` checks that many entries per array
    instead of all (two forwards per entry): the largest analytic one and random others. Dropout
    stays deterministic: numpy Generators passed as inputs or found on the module are rewound to
    their state before the first forward on every call. What a module's backward treats as a constant
    (DoRA's weight norm, detached as peft does) is held at its value (Module.detached).
    ``seed`` picks dout and the entries, from streams of gradcheck's own (see `stream`).

    Returns ``{name: error}`` with names from the function's signature (or the dict's keys) and
    ``param:<dotted name>`` for module parameters. An error is a float, or a Verdict that compares
    as inf and prints as its label: NonFinite when a gradient holds NaN or inf, Uninformative when
    the check compared rounding noise (see `_degenerate`; one more backward, under an independent
    dout, tells).
    """
    is_module = _check_arguments(fn, backward, eps, max_entries, seed, kwargs)
    names, values, as_dict = _bind(fn, inputs)
    params = fn.trainable_parameters() if (is_module and check_params) else {}
    for k, p in params.items():
        if p.dtype != np.float64:
            raise ValueError(f"gradcheck needs a float64 model; parameter {k} is {p.dtype} (use .astype('float64'))")
    run = _Run(fn, backward, names, values, as_dict, dict(kwargs or {}), is_module)
    with last_forward_kept(fn) if is_module else contextlib.nullcontext():
        return _compare(run, {**dict(zip(names, values)), **{f"param:{k}": p for k, p in params.items()}},
                        params, seed, eps, max_entries)


def _compare(run, arrays, params, seed, eps, max_entries):
    """gradcheck's errors: the analytic gradients of two passes, then central differences of `arrays`."""
    # the reference pass first, so that a module keeps the checked pass's gradients
    ref_dout, reference = _backward_pass(run, stream(seed, REFERENCE), params)
    dout, grads = _backward_pass(run, stream(seed, UPSTREAM), params)
    if not grads:
        raise ValueError("nothing to check: no floating-point input has a gradient and there are no parameters")
    for name, g in grads.items():
        if g.shape != arrays[name].shape:
            raise ValueError(f"analytic gradient for {name} has shape {g.shape}, expected {arrays[name].shape}")
    floor = NOISE_RATIO * max(largest(g) for g in list(grads.values()) + list(reference.values()))

    def f():
        v = run.value()
        return float(v) if dout is None else float(np.sum(v * dout))

    rng = stream(seed, ENTRIES)
    errors = {}
    for name, g in grads.items():
        idx = _entries(g, max_entries, rng)
        numeric = central_differences(f, arrays[name].reshape(-1), idx, eps)
        ref = largest(reference[name]) if ref_dout is not None else None
        errors[name] = _error(g, numeric, idx, ref, floor)
    return errors


def central_differences(f, flat, idx, eps):
    """(f(x + eps e_i) - f(x - eps e_i)) / 2 eps for each entry i in idx of the flat view `flat`,
    which is perturbed in place and restored."""
    numeric = np.empty(len(idx))
    for n, i in enumerate(idx):
        old = flat[i]
        try:
            flat[i] = old + eps
            fp = f()
            flat[i] = old - eps
            fm = f()
        finally:  # an exception or Ctrl-C leaves the weight as it was
            flat[i] = old
        numeric[n] = (fp - fm) / (2 * eps)
    return numeric
