"""Numerical gradient checking for any op, layer or whole model.

The analytic gradient of  f = sum(out * dout)  (dout random, never all-ones: with all-ones some
gradients vanish identically, e.g. softmax's) is compared with the float64 central difference
(f(x + eps e_i) - f(x - eps e_i)) / (2 eps), entry by entry.

The error reported per input is  max_i |analytic_i - numeric_i| / max(max_i |analytic_i|, max_i |numeric_i|),
relative to the largest gradient entry of that input, so near-zero entries do not blow it up.
"""
import inspect

import numpy as np

__all__ = ["gradcheck"]


def _generators(module):
    gens = {}
    for _, m in module.modules():
        for v in vars(m).values():
            if isinstance(v, np.random.Generator):
                gens[id(v)] = v
    return list(gens.values())


def _entries(size, max_entries, rng):
    if max_entries is None or size <= max_entries:
        return np.arange(size)
    return np.sort(rng.choice(size, max_entries, replace=False))


def _error(analytic, numeric, idx):
    a = analytic.reshape(-1)[idx]
    scale = max(np.abs(analytic).max(initial=0.0), np.abs(numeric).max(initial=0.0))
    if scale == 0.0:
        return 0.0
    return float(np.abs(a - numeric).max(initial=0.0) / scale)


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


def gradcheck(fn, inputs, backward=None, *, kwargs=None, eps=1e-6, seed=0, max_entries=None,
              check_params=True):
    """Largest relative error between analytic and numerical gradients, per checked input.

    Two forms:
      * an op pair, numlm's contract:  ``out, cache = fn(*inputs, **kwargs)`` and
        ``backward(dout, cache)`` returning one gradient per floating-point input, in order;
      * a Module (a layer or a whole model): ``out = fn(*inputs, **kwargs)`` then
        ``fn.backward(dout)`` returning the input gradient(s), or ``fn.backward()`` when the output
        has a ``.loss`` (for models, the scalar their ``objective(out)`` names); every parameter
        of the module is checked too (``check_params``).
    ``inputs`` is a tuple of positional arguments or a dict of keyword arguments; integer arrays
    (token ids, labels, masks) pass through unchecked. Floating-point inputs and module parameters
    must be float64. ``max_entries`` checks that many random entries per array instead of all
    (two forwards per entry). Dropout stays deterministic: numpy Generators passed as inputs or
    found on the module are rewound to their state before the first forward on every call.

    Returns ``{name: error}`` with names from the function's signature (or the dict's keys) and
    ``param:<dotted name>`` for module parameters.
    """
    if not callable(fn):
        raise ValueError(f"fn must be an op's forward or a Module, got {type(fn).__name__}")
    if backward is not None and not callable(backward):
        raise ValueError(f"backward must be callable, got {type(backward).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not 0 < eps < np.inf:
        raise ValueError(f"eps must be a finite number > 0 (the central-difference step), got {eps!r}")
    if max_entries is not None and (isinstance(max_entries, bool) or not isinstance(max_entries, (int, np.integer))
                                    or max_entries < 1):
        raise ValueError(f"max_entries must be an integer >= 1 (or None for every entry), got {max_entries!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"kwargs must be a dict, got {type(kwargs).__name__}")
    kwargs = dict(kwargs or {})
    if isinstance(inputs, dict):
        names, args, kw = list(inputs), [], dict(inputs)
    else:
        args = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        kw = {}
        target = fn.forward if hasattr(fn, "forward") else fn
        try:
            sig = [p for p in inspect.signature(target).parameters]
        except (TypeError, ValueError):
            sig = []
        names = [sig[i] if i < len(sig) else f"arg{i}" for i in range(len(args))]
    values = args if not kw else [kw[n] for n in names]
    floating = [i for i, v in enumerate(values) if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    for i in floating:
        if values[i].dtype != np.float64:
            raise ValueError(f"gradcheck needs float64 inputs; {names[i]} is {values[i].dtype}")
        if not values[i].flags.c_contiguous:  # perturbed through a flat view, which must not be a copy
            values[i] = np.ascontiguousarray(values[i])
            if kw:
                kw[names[i]] = values[i]
    is_module = hasattr(fn, "parameters") and hasattr(fn, "backward") and backward is None
    if not is_module and backward is None:
        raise ValueError("pass the analytic backward for an op, or a Module")
    params = fn.trainable_parameters() if (is_module and check_params) else {}
    for k, p in params.items():
        if p.dtype != np.float64:
            raise ValueError(f"gradcheck needs a float64 model; parameter {k} is {p.dtype} (use .astype('float64'))")
    gens = _generators(fn) if is_module else []
    gens += [v for v in list(values) + list(kwargs.values()) if isinstance(v, np.random.Generator)]
    states = [g.bit_generator.state for g in gens]
    rng = np.random.default_rng(seed)

    def call():
        for g, s in zip(gens, states):
            g.bit_generator.state = s
        if kw:
            return fn(**kw, **kwargs)
        return fn(*args, **kwargs)

    # analytic pass
    res = call()
    out, cache = (res if not is_module else (res, None))
    module = fn if is_module else None
    value = _output_value(out, module)
    has_loss = is_module and _loss(out, module) is not None
    dout = None if has_loss else rng.standard_normal(value.shape)
    if is_module:
        fn.zero_grad()
        grads = fn.backward() if has_loss else fn.backward(dout)
        param_grads = {k: g.copy() for k, g in fn.grad_arrays().items()} if params else {}
    else:
        grads = backward(dout, cache)
    if grads is None:
        grads = ()
    if not isinstance(grads, tuple):
        grads = (grads,)
    if is_module and has_loss:
        grads = ()
    elif (not is_module or floating) and (len(grads) < len(floating)
                                          or any(g is not None for g in grads[len(floating):])):
        raise ValueError(f"backward returned {len(grads)} gradient(s) for {len(floating)} floating-point "
                         f"input(s) ({', '.join(names[i] for i in floating) or 'none'}): it must return one "
                         f"per floating-point input, in order")
    analytic = {}
    for j, i in enumerate(floating):
        if j < len(grads) and grads[j] is not None:
            analytic[names[i]] = (values[i], np.asarray(grads[j], dtype=np.float64))

    def perturbed():
        v = _output_value(call(), module) if is_module else _output_value(call()[0])
        return float(v) if dout is None else float(np.sum(v * dout))

    errors = {}
    targets = [(n, x, g) for n, (x, g) in analytic.items()]
    targets += [(f"param:{k}", params[k], param_grads[k]) for k in params if k in param_grads]
    if not targets:
        raise ValueError("nothing to check: no floating-point input has a gradient and there are no parameters")
    for name, x, g in targets:
        if g.shape != x.shape:
            raise ValueError(f"analytic gradient for {name} has shape {g.shape}, expected {x.shape}")
        idx = _entries(x.size, max_entries, rng)
        numeric = central_differences(perturbed, x.reshape(-1), idx, eps)
        errors[name] = _error(g, numeric, idx)
    return errors


def central_differences(f, flat, idx, eps):
    """(f(x + eps e_i) - f(x - eps e_i)) / 2 eps for each entry i in idx of the flat view `flat`,
    which is perturbed in place and restored."""
    numeric = np.empty(len(idx))
    for n, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        numeric[n] = (fp - fm) / (2 * eps)
    return numeric
