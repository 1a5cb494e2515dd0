"""Numba twins of the ops' hot loops.

Every kernel here has a NumPy definition in ``numlm.ops`` and must give the same numbers.
``NUMLM_NUMBA=0`` in the environment, or ``set_numba(False)``, runs everything on the NumPy path.
Kernels are cached on disk (``cache=True``); Numba compiles a kernel again when its own file changes,
not when a function it calls from another file does (softmax.py's exp_nonpositive, row_max,
softmax_row and attention_rows_kernel, called from losses.py, activations.py and decode.py): after
editing those, delete numlm/kernels/__pycache__.
"""
import os

# Numba's OpenMP threads spin this many pauses (~0.1 ms) after a parallel kernel, then sleep. By
# default they spin ~1 ms and take the cores from the BLAS threads of the next matmul (training steps
# 1.5x slower on 2 cores; ~1.1x at 30,000). Without a spin, a parallel call took ~65 us (both threads
# sleep at its end), ~25 us once a spin has run out, ~3 us within it: decoding's GEMVs (cols_gemv)
# come ~50 us apart. A user's OMP_WAIT_POLICY is kept: libgomp lets GOMP_SPINCOUNT override it.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "3000"

# read as kernels.enabled by the ops (an attribute, not a call, on every op)
enabled = os.environ.get("NUMLM_NUMBA", "1").strip().lower() not in ("0", "false", "no", "off")


# Below this many elements a parallel kernel runs on one thread: waking Numba's sleeping workers
# costs 25-65 us here, more than the whole of a small kernel (a decoding step's LayerNorm is 768 floats).
PARALLEL_MIN_ELEMENTS = 1 << 16


def adaptive(kernel, serial=None):
    """Wrap a parallel Numba kernel so small inputs run single-threaded: on `serial` when given (the
    same loops compiled without prange, so no parallel region is entered: ~3 us less a call, a decoding
    step's LayerNorms and GELUs), else on the kernel at one thread; `.kernel` is the original."""
    import functools

    import numpy as np

    @functools.wraps(kernel.py_func)
    def call(*args):
        work = 0
        for a in args:
            if isinstance(a, np.ndarray) and a.size > work:
                work = a.size
        if work >= PARALLEL_MIN_ELEMENTS:
            return kernel(*args)
        if serial is not None:
            return serial(*args)
        return at_one_thread(kernel, *args)

    call.kernel = kernel
    return call


_thread_count = ()  # numba's get and set of the calling thread's count, found at the first small kernel


def at_one_thread(kernel, *args):
    """kernel(*args) with the calling thread's Numba thread count at 1, put back after."""
    get, set_ = _thread_count or _numba_thread_count()
    n = get()
    set_(1)
    try:
        return kernel(*args)
    finally:
        set_(n)


def _numba_thread_count():
    """The C functions behind numba.get_num_threads / set_num_threads: the public pair launches the
    thread pool under two locks and checks its argument at every call, 9 us around each small kernel,
    more than a decoding step's LayerNorm takes. The public pair where numba's layout differs."""
    global _thread_count
    import numba
    try:
        from numba.np.ufunc import parallel
        parallel._launch_threads()
        _thread_count = parallel._get_num_threads, parallel._set_num_threads
    except (ImportError, AttributeError):
        _thread_count = numba.get_num_threads, numba.set_num_threads
    return _thread_count


def numba_enabled():
    """True when ops dispatch to the Numba kernels."""
    return enabled


def set_numba(flag):
    """Switch every op between the Numba kernels (True) and the pure-NumPy path (False).
    Returns the previous setting."""
    global enabled
    previous, enabled = enabled, bool(flag)
    return previous
