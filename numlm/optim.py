"""Adam, AdamW, learning-rate schedules and gradient clipping.

Parameters and gradients are mirror dicts ``{state_dict key: ndarray}``; the optimizer keys its
moments by the same names and updates the parameter arrays in place, so the model sees the change.
The update follows torch's single-tensor (foreach=False) Adam line by line, in the same order of
floating point operations, so a float64 run matches torch to the last few ulps.
"""
import math
import re

import numpy as np

from .kernels import numba_enabled
from .kernels.matmul import two_cores

FLOATS = (np.float32, np.float64)
_LN = re.compile(r"(layernorm|layer_norm|(^|\.)ln_)", re.IGNORECASE)


def default_no_decay(name, array):
    """True for parameters BERT and GPT recipes exclude from weight decay: biases and LayerNorm
    weights (``...bias``, ``...LayerNorm...``, ``...layer_norm...``, ``ln_1``/``ln_2``/``ln_f``)."""
    return name.endswith("bias") or _LN.search(name) is not None


# ---------------------------------------------------------------- the update of one array

def adam_scalars(step, lr, beta1, beta2):
    """Adam's bias corrections at step t (from 1): the step size lr / (1 - b1^t), sqrt(1 - b2^t) (Python's
    pow, as torch, not math.sqrt), and lerp's weight 1 - b1."""
    return lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5, 1 - beta1


def adam_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    """m = lerp(m, g, 1-b1);  v = b2 v + (1-b2) g^2;  p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
    p, g, m, v: same shape and dtype; p, m, v updated in place.  AdamW first does p *= 1 - lr*wd,
    Adam (coupled) uses g + wd*p instead of g.  step t counts from 1."""
    t = p.dtype.type
    step_size, bc2_sqrt, w1 = adam_scalars(step, lr, beta1, beta2)
    if weight_decay != 0 and decoupled:
        p *= t(1 - lr * weight_decay)
    if weight_decay != 0 and not decoupled:
        g = g + t(weight_decay) * p
    # torch's lerp picks its formula by |weight| < 0.5 for accuracy
    if abs(w1) < 0.5:
        m += t(w1) * (g - m)
    else:
        m[...] = g - (g - m) * (t(1) - t(w1))
    v *= t(beta2)
    v += t(1 - beta2) * g * g
    denom = np.sqrt(v)
    denom /= t(bc2_sqrt)
    denom += t(eps)
    upd = t(-step_size) * m
    upd /= denom
    p += upd


def _adam_update_numba(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    from .kernels.adam import adam_update_kernel
    t = p.dtype.type
    step_size, bc2_sqrt, w1 = adam_scalars(step, lr, beta1, beta2)
    adam_update_kernel(
        p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), t(1),
        t(1 - lr * weight_decay), t(weight_decay), t(w1), abs(w1) < 0.5, t(beta2), t(1 - beta2),
        t(-step_size), t(bc2_sqrt), t(eps),
        weight_decay != 0 and decoupled, weight_decay != 0 and not decoupled)


# below this many elements in all the fused updates run on the calling thread alone
ADAM_TWO_CORES_MIN = 1 << 20


def _adam_updates_numba(updates):
    """_adam_update_numba of each argument tuple; with enough elements, in two halves of about equal size
    on two cores (the kernel releases the GIL; memory-bound, one core streamed less than two)"""
    if sum(u[0].size for u in updates) < ADAM_TWO_CORES_MIN:
        return [_adam_update_numba(*u) for u in updates]
    halves, sizes = ([], []), [0, 0]
    for u in sorted(updates, key=lambda u: -u[0].size):  # largest first, each to the lighter half
        i = int(sizes[1] < sizes[0])
        halves[i].append(u)
        sizes[i] += u[0].size
    two_cores(*(lambda h=h: [_adam_update_numba(*u) for u in h] for h in halves))


def _contiguous(*arrays):
    return all(a.flags.c_contiguous for a in arrays)


# ---------------------------------------------------------------- optimizers

def _finite(name, v):
    """float(v) for a finite real number; else a ValueError naming the argument."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


class Adam:
    """Adam with L2 weight decay added to the gradient (torch.optim.Adam): g <- g + wd p.
    ``no_decay(name, array) -> bool`` picks the parameters that get no weight decay."""

    decoupled = False
    kind = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 no_decay=default_no_decay):
        if not isinstance(params, dict):
            raise ValueError(f"params must be a dict {{name: ndarray}}, got {type(params).__name__}")
        for name, p in params.items():
            if not isinstance(p, np.ndarray) or p.dtype not in FLOATS:
                desc = p.dtype if isinstance(p, np.ndarray) else type(p).__name__
                raise ValueError(f"params[{name!r}] must be a float32/float64 ndarray, got {desc}")
        self._set_hyperparams(lr, betas, eps, weight_decay)
        self.params = params
        self.no_decay = no_decay
        self.decay_names = {n for n, p in params.items() if not no_decay(n, p)}
        self.step_count = 0      # calls of step()
        self.param_step = {}     # per-parameter steps (frozen steps do not count), as torch keeps
        self.exp_avg = {}        # moments are created on a parameter's first gradient
        self.exp_avg_sq = {}

    def _set_hyperparams(self, lr, betas, eps, weight_decay):
        lr, eps, weight_decay = _finite("lr", lr), _finite("eps", eps), _finite("weight_decay", weight_decay)
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__"):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas}")
        beta1, beta2 = _finite("betas[0]", betas[0]), _finite("betas[1]", betas[1])
        for i, b in enumerate((beta1, beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas[{i}] must lie in [0, 1), got {b}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, (beta1, beta2), eps, weight_decay

    def _check_grads(self, grads):
        if not isinstance(grads, dict):
            raise ValueError(f"grads must be a dict {{name: ndarray}}, got {type(grads).__name__}")
        for name, g in grads.items():
            if name not in self.params:
                raise ValueError(f"grads[{name!r}] has no parameter of that name")
            p = self.params[name]
            if not isinstance(g, np.ndarray):
                raise ValueError(f"grads[{name!r}] must be an ndarray, got {type(g).__name__}")
            if g.shape != p.shape or g.dtype != p.dtype:
                raise ValueError(f"grads[{name!r}] has shape {g.shape} dtype {g.dtype}, but the "
                                 f"parameter has shape {p.shape} dtype {p.dtype}")

    def step(self, grads, lr=None):
        """One update of every parameter named in ``grads`` (others are frozen and skipped).
        ``lr`` overrides the base lr for this step (the loop passes base_lr * schedule(step))."""
        lr = self.lr if lr is None else _finite("lr", lr)
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        self._check_grads(grads)
        beta1, beta2 = self.betas
        use_numba = numba_enabled()
        self.step_count += 1
        fused = []  # the Numba kernel's updates, run after the loop on two cores
        for name, g in grads.items():
            p = self.params[name]
            if name not in self.exp_avg:
                self.exp_avg[name] = np.zeros_like(p)
                self.exp_avg_sq[name] = np.zeros_like(p)
                self.param_step[name] = 0
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            self.param_step[name] += 1
            wd = self.weight_decay if name in self.decay_names else 0.0
            args = (p, g, m, v, float(self.param_step[name]), lr, beta1, beta2, self.eps, wd,
                    self.decoupled)
            if use_numba and _contiguous(p, g, m, v):
                fused.append(args)
            else:
                adam_update(*args)
        _adam_updates_numba(fused)

    def state_dict(self):
        """Copies of everything a resumed optimizer needs: plain scalars, lists and {name: ndarray}."""
        return {
            "kind": self.kind,
            "step": self.step_count,
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "param_step": dict(self.param_step),
            "exp_avg": {n: a.copy() for n, a in self.exp_avg.items()},
            "exp_avg_sq": {n: a.copy() for n, a in self.exp_avg_sq.items()},
        }

    def load_state_dict(self, sd):
        """Restore a state_dict(); hyperparameters are taken from it, as torch does."""
        need = ("kind", "step", "lr", "betas", "eps", "weight_decay", "param_step", "exp_avg",
                "exp_avg_sq")
        missing = [k for k in need if k not in sd]
        if missing:
            raise ValueError(f"state dict lacks keys {missing}")
        if sd["kind"] != self.kind:
            raise ValueError(f"state dict kind is {sd['kind']!r}, this optimizer is {self.kind!r}")
        names = set(sd["param_step"])
        for key in ("exp_avg", "exp_avg_sq"):
            if set(sd[key]) != names:
                diff = sorted(set(sd[key]) ^ names)
                raise ValueError(f"state dict {key} and param_step name different parameters: {diff}")
        unknown = sorted(names - set(self.params))
        if unknown:
            raise ValueError(f"state dict has moments for unknown parameters {unknown}")
        for key in ("exp_avg", "exp_avg_sq"):
            for n, a in sd[key].items():
                p = self.params[n]
                if not isinstance(a, np.ndarray) or a.shape != p.shape or a.dtype != p.dtype:
                    desc = (f"shape {a.shape} dtype {a.dtype}" if isinstance(a, np.ndarray)
                            else type(a).__name__)
                    raise ValueError(f"state dict {key}[{n!r}] has {desc}, but the parameter has "
                                     f"shape {p.shape} dtype {p.dtype}")
        for n, s in sd["param_step"].items():
            if int(s) != s or s < 1:
                raise ValueError(f"state dict param_step[{n!r}] must be an integer >= 1, got {s}")
        self._set_hyperparams(sd["lr"], sd["betas"], sd["eps"], sd["weight_decay"])
        self.step_count = int(sd["step"])
        self.param_step = {n: int(s) for n, s in sd["param_step"].items()}
        self.exp_avg = {n: np.array(a, copy=True) for n, a in sd["exp_avg"].items()}
        self.exp_avg_sq = {n: np.array(a, copy=True) for n, a in sd["exp_avg_sq"].items()}


class AdamW(Adam):
    """Adam with decoupled weight decay (torch.optim.AdamW): p <- p (1 - lr wd) before the update."""

    decoupled = True
    kind = "adamw"


# ---------------------------------------------------------------- gradient clipping

def sum_squares(g):
    """sum g^2 in float64 (the Numba kernel reads float32 without making a float64 copy of g)."""
    if numba_enabled() and g.flags.c_contiguous:
        from .kernels.adam import sum_squares_kernel
        return float(sum_squares_kernel(g.reshape(-1)))
    g = g.reshape(-1).astype(np.float64, copy=False)
    return float(np.dot(g, g))


def clip_grad_norm(grads, max_norm):
    """n = || (||g_1||, ..., ||g_k||) ||_2;  g <- g * min(1, max_norm / (n + 1e-6))  in place.
    Returns n, the norm before clipping. A non-finite n leaves the grads untouched."""
    max_norm = _finite("max_norm", max_norm)
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    for name, g in grads.items():
        if not isinstance(g, np.ndarray) or g.dtype not in FLOATS:
            desc = g.dtype if isinstance(g, np.ndarray) else type(g).__name__
            raise ValueError(f"grads[{name!r}] must be a float32/float64 ndarray, got {desc}")
    if not grads:
        return 0.0
    total = math.sqrt(sum(sum_squares(g) for g in grads.values()))
    if not math.isfinite(total):
        return total
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= g.dtype.type(coef)
    return total


# ---------------------------------------------------------------- learning-rate schedules
# Each returns the factor multiplying the base lr at ``step`` (transformers' lr_lambda).

def _check_schedule(step, warmup=0, total=0):
    for name, x in (("step", step), ("warmup", warmup), ("total", total)):
        if _finite(name, x) < 0:
            raise ValueError(f"{name} must be >= 0, got {x}")


def constant_schedule(step):
    """factor = 1"""
    _check_schedule(step)
    return 1.0


def constant_with_warmup(step, warmup):
    """factor = t / warmup for t < warmup, else 1"""
    _check_schedule(step, warmup)
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    return 1.0


def linear_schedule(step, warmup, total):
    """factor = t / warmup for t < warmup, else max(0, (total - t) / (total - warmup))"""
    _check_schedule(step, warmup, total)
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def cosine_schedule(step, warmup, total, num_cycles=0.5):
    """factor = t / warmup for t < warmup, else max(0, (1 + cos(2 pi cycles progress)) / 2),
    progress = (t - warmup) / (total - warmup)"""
    _check_schedule(step, warmup, total)
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def get_schedule(name, warmup, total):
    """The schedule ``name`` as a function of the step alone."""
    _check_schedule(0, warmup, total)
    if name == "constant":
        return constant_schedule
    if name == "constant_with_warmup":
        return lambda step: constant_with_warmup(step, warmup)
    if name == "linear":
        return lambda step: linear_schedule(step, warmup, total)
    if name == "cosine":
        return lambda step: cosine_schedule(step, warmup, total)
    raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
