"""Module: named parameters, their gradients (a mirror dict with the same keys), children, and the
cache of the last forward. One forward, then one backward; gradients accumulate with +=."""
import numpy as np


class Module:
    def __init__(self):
        self.params = {}      # name -> ndarray
        self.grads = {}       # name -> ndarray, same keys and shapes as params
        self.training = True
        self.cache = None

    def add_param(self, name, value):
        value = np.ascontiguousarray(value)
        self.params[name] = value
        self.grads[name] = np.zeros_like(value)
        return value

    def children(self):
        """(name, module) pairs in definition order."""
        return [(k, v) for k, v in vars(self).items() if isinstance(v, Module)]

    def modules(self, prefix=""):
        """(dotted name, module) for this module and every descendant."""
        yield prefix.rstrip("."), self
        for name, child in self.children():
            yield from child.modules(f"{prefix}{name}.")

    def parameters(self):
        """{dotted name: array} over the whole tree, numlm's own layout (Linear weights are (C_in, C_out))."""
        return {f"{p}.{k}" if p else k: v for p, m in self.modules() for k, v in m.params.items()}

    def grad_arrays(self):
        """{dotted name: gradient array}, the mirror of parameters()."""
        return {f"{p}.{k}" if p else k: v for p, m in self.modules() for k, v in m.grads.items()}

    def zero_grad(self):
        for _, m in self.modules():
            for g in m.grads.values():
                g.fill(0)

    def train(self, mode=True):
        for _, m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def astype(self, dtype):
        """Cast every parameter (and gradient) to dtype, in place; returns self."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        for _, m in self.modules():
            for k in m.params:
                m.params[k] = np.ascontiguousarray(m.params[k], dtype=dtype)
                m.grads[k] = np.zeros_like(m.params[k])
        return self

    @property
    def dtype(self):
        for v in self.parameters().values():
            return v.dtype
        return np.dtype(np.float32)

    def num_parameters(self):
        return sum(v.size for v in self.parameters().values())

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, *args, **kwargs):
        raise NotImplementedError


class ModuleList(Module):
    """An indexable list of modules named "0", "1", ... (transformers' `layer.0`, `h.0`)."""

    def __init__(self, modules):
        super().__init__()
        self.items = list(modules)

    def children(self):
        return [(str(i), m) for i, m in enumerate(self.items)]

    def __getitem__(self, i):
        return self.items[i]

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)
