"""Argument checks shared by the ops: every bad input becomes a ValueError naming the argument."""
import numpy as np

FLOATS = (np.float32, np.float64)
_FLOAT_DTYPES = frozenset(np.dtype(t) for t in FLOATS)  # a set lookup: every op calls float_array


def float_array(name, x, min_ndim=1, **same):
    """x a float32 or float64 array of at least min_ndim dimensions; the arrays in `same` (None
    skipped) of x's dtype."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    dt = x.dtype
    if dt not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got dtype {dt}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {x.shape}")
    for v in same.values():
        if v is not None and getattr(v, "dtype", dt) != dt:
            desc = ", ".join(f"{k}: {getattr(v, 'dtype', type(v).__name__)}" for k, v in {name: x, **same}.items()
                             if v is not None)
            raise ValueError(f"dtypes must match ({desc})")
    return x


def positive_int(name, v):
    """v as an int when it is an integer >= 1 (not a bool)"""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def zero_one(name, m, what="0 and 1"):
    """m (array-like) as a bool array, when it is bool or holds only the numbers 0 and 1 (`what` says
    what they mean in the error)"""
    m = np.asarray(m)
    if m.dtype != np.bool_ and (m.dtype.kind not in "iuf" or not np.isin(m, (0, 1)).all()):
        raise ValueError(f"{name} must hold only {what}")
    return m.astype(bool)


def same_dtype(**arrays):
    items = [(k, v) for k, v in arrays.items() if v is not None]
    dtypes = {v.dtype for _, v in items}
    if len(dtypes) > 1:
        desc = ", ".join(f"{k}: {v.dtype}" for k, v in items)
        raise ValueError(f"dtypes must match ({desc})")


def shape_is(name, x, shape):
    if x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {x.shape}")


def int_array(name, x):
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {x.dtype}")
    return x


def ids_in_range(name, ids, n, allow=None):
    """ids must lie in [0, n); `allow` is one extra permitted value (an ignore index)."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= n)
    if allow is not None:
        bad &= ids != allow
    if bad.any():
        first = ids[bad].flat[0]
        extra = f" (or {allow})" if allow is not None else ""
        raise ValueError(f"{name} must lie in [0, {n}){extra}; found {first} at index "
                         f"{tuple(int(i) for i in np.argwhere(bad)[0])}")
    return ids
