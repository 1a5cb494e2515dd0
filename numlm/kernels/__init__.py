"""Numba twins of the ops' hot loops.

Every kernel here has a NumPy definition in ``numlm.ops`` and must give the same numbers.
``NUMLM_NUMBA=0`` in the environment, or ``set_numba(False)``, runs everything on the NumPy path.
"""
import os

_enabled = os.environ.get("NUMLM_NUMBA", "1").strip().lower() not in ("0", "false", "no", "off")


def numba_enabled():
    """True when ops dispatch to the Numba kernels."""
    return _enabled


def set_numba(flag):
    """Switch every op between the Numba kernels (True) and the pure-NumPy path (False).
    Returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous
