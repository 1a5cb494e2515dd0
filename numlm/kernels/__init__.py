"""Numba twins of the ops' hot loops.

Every kernel here has a NumPy definition in ``numlm.ops`` and must give the same numbers.
``NUMLM_NUMBA=0`` in the environment, or ``set_numba(False)``, runs everything on the NumPy path.
"""
import os

# Numba's OpenMP threads otherwise spin after each parallel kernel and take the cores from the
# BLAS threads of the next matmul (measured: training steps 1.5x slower on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
