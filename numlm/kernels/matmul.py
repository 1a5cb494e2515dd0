"""Matrix products split into independent row blocks, one per core, each a single-threaded BLAS call.

NumPy definition: ``a @ b``. The result is the same product; only which thread computes which rows of
it changes (float32 results may differ from ``a @ b`` in the last bits, as two BLAS builds do).

Why: a multi-threaded BLAS synchronises its threads inside every call. On a machine whose cores are
also busy with other processes, or with Numba's threads, one descheduled BLAS thread stalls the other
at every barrier; attention's many small per-head products made a training step up to 8x slower that
way on 2 shared cores. Here each worker computes whole output rows with BLAS at one thread, and the
only wait is at the end of the product. A single row (a decoding step's GEMV) is the exception: gemv.
"""
import ctypes
import glob
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import numpy as np
from numba import njit, prange

from .. import kernels

# below this many multiply-adds one call on the caller's thread is cheaper than splitting
SPLIT_MIN_MACS = 1 << 20
# a 2-D product of fewer rows splits by output columns: each thread then reads only its columns of b
# (a prompt pass's (32, 768) @ (768, 2304) took half the time of row blocks, which both read all of b;
# measured on 2 cores: columns as fast or faster up to 1024 rows, kept to the few-row case)
COLUMN_SPLIT_ROWS = 256
# ... and so does one with this many times more output columns than rows: each thread then packs half of
# b, not all of it (the tied MLM decoder, ~300 labelled rows by 8192 columns: ~8% less CPU than row blocks)
COLUMNS_PER_ROW = 8
# mm_pair runs two products on one core each only when neither has more than this times the other's work
PAIR_MAX_RATIO = 1.25


def _find_openblas():
    """(the OpenBLAS library numpy uses, its symbol prefix, suffix), or None (another BLAS)."""
    here = os.path.dirname(np.__file__)
    for lib in glob.glob(os.path.join(here, "..", "numpy.libs", "*openblas*")) + \
            glob.glob(os.path.join(here, ".libs", "*openblas*")):
        try:
            dll = ctypes.CDLL(lib)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                if getattr(dll, f"{prefix}_set_num_threads{suffix}", None) is not None and \
                        getattr(dll, f"{prefix}_get_num_threads{suffix}", None) is not None:
                    return dll, prefix, suffix
    return None


def _load_blas(found):
    if found is None:
        return None, None
    dll, prefix, suffix = found
    s, g = getattr(dll, f"{prefix}_set_num_threads{suffix}"), getattr(dll, f"{prefix}_get_num_threads{suffix}")
    s.argtypes, s.restype, g.restype = [ctypes.c_int], None, ctypes.c_int
    corename = getattr(dll, f"{prefix}_get_corename{suffix}", None)
    if corename is not None:
        corename.restype = ctypes.c_char_p
    return (s, g), corename


_openblas = _find_openblas()
_blas, _corename = _load_blas(_openblas)


def _load_gemm(found):
    """{dtype: cblas ?gemm} of the OpenBLAS numpy uses (C = alpha A B + beta C), or {}"""
    if found is None:
        return {}
    dll, prefix, suffix = found
    idx = ctypes.c_int64 if suffix == "64_" else ctypes.c_int
    fns = {}
    for dtype, letter, real in ((np.float32, "s", ctypes.c_float), (np.float64, "d", ctypes.c_double)):
        f = getattr(dll, f"{prefix[:-len('openblas')]}cblas_{letter}gemm{suffix}", None)
        if f is not None:
            f.restype = None
            f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, idx, idx, idx, real, ctypes.c_void_p, idx,
                          ctypes.c_void_p, idx, real, ctypes.c_void_p, idx]
            fns[np.dtype(dtype)] = f
    return fns


_gemm = _load_gemm(_openblas)
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def _layout(m):
    """(transpose flag, leading dimension) of a 2-D matrix BLAS reads in place, or None"""
    item, (r, c), (sr, sc) = m.itemsize, m.shape, m.strides
    if sc == item and sr % item == 0 and sr >= max(c, 1) * item:
        return NO_TRANS, sr // item
    if sr == item and sc % item == 0 and sc >= max(r, 1) * item:
        return TRANS, sc // item
    return None


def gemm_add(a, b, out):
    """out += a @ b in one BLAS call (beta = 1), 2-D arrays of one dtype read in place; False (nothing
    done) when BLAS cannot take them so"""
    f = _gemm.get(out.dtype)
    if f is None or a.ndim != 2 or b.ndim != 2 or out.ndim != 2 or not a.dtype == b.dtype == out.dtype \
            or 0 in a.shape or 0 in out.shape:
        return False
    la, lb, lo = _layout(a), _layout(b), _layout(out)
    if la is None or lb is None or lo is None or lo[0] != NO_TRANS:
        return False
    (M, K), N = a.shape, b.shape[1]
    f(ROW_MAJOR, la[0], lb[0], M, N, K, 1.0, a.ctypes.data, la[1], b.ctypes.data, lb[1], 1.0, out.ctypes.data, lo[1])
    return True


@contextmanager
def one_blas_thread():
    """Run BLAS on one thread inside the block (OpenBLAS, as numpy's wheels ship it; elsewhere a no-op)."""
    if _blas is None:
        yield
        return
    with _lock:
        before = _blas[1]()
        _blas[0](1)
    try:
        yield
    finally:
        with _lock:
            _blas[0](before)


def blas_core():
    """The kernel set OpenBLAS runs ("SkylakeX", "Haswell", ...; OPENBLAS_CORETYPE chooses), or None."""
    return _corename().decode() if _corename is not None else None


_pool = None
_lock = threading.Lock()


def workers():
    """Number of row blocks: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _get_pool():
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(workers(), thread_name_prefix="numlm-matmul")
    return _pool


def two_cores(first, second):
    """(first(), second()): first on a worker thread while the caller runs second, for work that
    releases the GIL (nogil Numba kernels); both on the caller on one core"""
    if workers() < 2:
        return first(), second()
    job = _get_pool().submit(first)
    try:
        b = second()
    finally:
        a = job.result()
    return a, b


def matmul(a, b, out=None, bias=None):
    """a @ b (+ bias, (N,), added to each block's rows by the thread that computed them, while they are
    still in cache) for 2-D a (M, K) @ (K, N), or stacked (S, M, K) @ (S, K, N). Blocks of output rows
    (or of the stack) go to separate threads, the caller's included; with fewer rows than cores, or a
    2-D a of fewer than COLUMN_SPLIT_ROWS rows, blocks of output columns do. Every BLAS call here runs
    on one thread, the unsplit small products too: an idle multi-threaded BLAS spins its threads after
    each call, taking the cores from the next split product. The exceptions go to gemv: a single row,
    (1, K) @ (K, N), a decoding step's GEMV (a Numba loop for a weight of 1 MB or more, BLAS's own
    threads below), or a few rows over such a weight (beams, a batch); and a 2-D a of fewer than
    COLUMN_SPLIT_ROWS rows while BLAS's threads still spin after the last GEMV they ran (a prompt pass
    after decoding). out, if given, receives the result: of the product's shape, it may be a or b."""
    shape = a.shape[:-1] + (b.shape[-1],)
    if out is None:
        out = np.empty(shape, dtype=np.result_type(a, b))
    elif out.shape != shape:  # the blocks below are slices of out: they would not see the mismatch
        raise ValueError(f"matmul: out has shape {out.shape}, the product of {a.shape} and {b.shape} is {shape}")
    elif np.may_share_memory(out, a) or np.may_share_memory(out, b):  # a block would read what another wrote
        return _put(out, matmul(a, b, bias=bias))
    kernel = _gemv_kernel(a, b, out)
    if _blas is None or (a.ndim == 2 and (a.shape[0] == 1 or kernel is not None or (
            a.shape[0] < COLUMN_SPLIT_ROWS and time.perf_counter() < _blas_spins_until[0]))):
        out = np.matmul(a, b, out=out) if _blas is None else gemv(a, b, out, kernel)
        if bias is not None:
            out += bias
        return out
    n = workers() if a.size * b.shape[-1] >= SPLIT_MIN_MACS else 1
    stacked = a.ndim == b.ndim > 2
    by_rows = a.shape[0] >= n and (a.ndim > 2 or (a.shape[0] >= COLUMN_SPLIT_ROWS
                                                  and COLUMNS_PER_ROW * a.shape[0] > b.shape[-1]))
    split = n > 1 and (by_rows or (a.ndim == 2 and b.shape[-1] >= n))
    with _lock, _at_one_thread():  # the BLAS thread count is process-wide: one product at a time
        if not split:
            return _block(a, b, out, bias)
        size = a.shape[0] if by_rows else b.shape[-1]
        bounds = [size * i // n for i in range(n + 1)]
        blocks = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if by_rows:
                blocks.append((a[lo:hi], b[lo:hi] if stacked else b, out[lo:hi], bias))
            else:  # a column block of out is strided: numpy writes it through a buffer
                blocks.append((a, b[:, lo:hi], out[:, lo:hi], None if bias is None else bias[lo:hi]))
        _on_cores([(_block, blk) for blk in blocks])
    return out


def _on_cores(calls):
    """[(fn, args), ...]: the first on the caller (one thread hand-off fewer), the others on the pool's
    threads; returns when all are done. The caller holds _lock with BLAS at one thread. (The halves
    run on Numba's own two threads instead, cblas called from a prange kernel, measured no faster:
    bert-mini and gpt-mini steps 0.98-1.02 of this in alternating steps, Zen 4, 2 cores.)"""
    jobs = [_get_pool().submit(fn, *args) for fn, args in calls[1:]]
    try:
        calls[0][0](*calls[0][1])
    finally:
        wait(jobs)  # all of them, before a block's exception lets go of the lock
    for j in jobs:
        j.result()


@contextmanager
def _at_one_thread():
    """BLAS on one thread inside the block, the count before put back; the caller holds _lock."""
    prev = _blas[1]()
    _blas[0](1)
    try:
        yield
    finally:
        _blas[0](prev)


# A GEMV on BLAS's threads that streams its weights slower than this (or a product of a few rows that
# multiplies slower than STALLED_MACS) waited for a thread another process held the core of (memory
# streams 10x faster on any core); GEMVs then run on one thread a while: GEMV_ALONE_FOR seconds, twice
# as long each time a stall comes back within that long of the last while's end, up to GEMV_ALONE_MAX
# (a lone hiccup on a quiet machine cost a whole second of one-thread GEMVs, ~10% of a 128-token run)
GEMV_STALLED = 1e9  # bytes per second
STALLED_MACS = 5e9  # multiply-adds per second (a 32-row product on two threads: ~50e9)
GEMV_ALONE_FOR = 0.1  # seconds
GEMV_ALONE_MAX = 2.0  # seconds
_gemv_alone_until = [0.0]
_gemv_alone_for = [GEMV_ALONE_FOR]  # the last while's length
# OpenBLAS's idle threads spin this long after a call (2^28 clock ticks, its THREAD_TIMEOUT). numlm's
# threads would share the cores with them meanwhile: a 32-token prompt pass right after decoding took
# ~130 ms with its products split on numlm's threads, ~70 on BLAS's (the same numbers: K is not split;
# 2-3 rows of a 768 x 768 product may round differently, OpenBLAS's small-matrix kernel on the split)
BLAS_SPINS_FOR = 0.1  # seconds
_blas_spins_until = [0.0]


def gemv(a, b, out, kernel):
    """out = a @ b for one row a (1, K), a decoding step's product, or a few (beams, a batch): on
    kernel, a parallel Numba loop (_gemv_kernel), when b is a large weight, else on BLAS's own
    threads. A GEMV reads each weight once for two flops: memory bandwidth bounds it, and one core
    does not reach the machine's. But while another process holds a core, one of the threads waits to
    be scheduled and a 0.1 ms GEMV takes milliseconds: greedy decoding ran 150-220 ms a token against
    33-37 on one thread. So a GEMV of 1 MB or more that streams below GEMV_STALLED sends the GEMVs of
    the next GEMV_ALONE_FOR seconds (doubling while stalls recur, up to GEMV_ALONE_MAX) to one thread;
    then the threads are tried again. One and two threads give the same numbers (BLAS's split and the
    loops' keep each output's sum order). matmul also sends here a product of a few rows a (M, K)
    while BLAS's threads spin (BLAS_SPINS_FOR)."""
    with _lock:  # every other product restores the thread count before it lets go of the lock
        start = time.perf_counter()
        if start < _gemv_alone_until[0]:
            return _gemv_product(a, b, out, kernel, one_thread=True)
        _gemv_product(a, b, out, kernel, one_thread=False)
        end = time.perf_counter()
        if not _stalled(start, end, b.nbytes, a.size * b.shape[1], kernel) and a.shape[0] == 1 and kernel is None:
            _blas_spins_until[0] = end + BLAS_SPINS_FOR  # only BLAS's GEMV: few-row decoding (beams) stays split
    return out


def streamed(kernel, args, nbytes, macs):
    """kernel(*args), a parallel Numba call bound by streaming nbytes of weights (a decoding step's block,
    kernels/decode.py), under gemv's policy: on one thread while a stall's while lasts"""
    with _lock:
        start = time.perf_counter()
        if start < _gemv_alone_until[0]:
            return kernels.at_one_thread(kernel, *args)
        out = kernel(*args)
        _stalled(start, time.perf_counter(), nbytes, macs, kernel)
    return out


def _stalled(start, end, nbytes, macs, kernel):
    """whether a call that streamed nbytes of weights for macs multiply-adds from start to end stalled
    (slower than GEMV_STALLED and STALLED_MACS, 1 MB or more, not a kernel's first load): if so the GEMVs
    of the next while run on one thread. The caller holds _lock."""
    if nbytes < 1 << 20 or end - start <= max(nbytes / GEMV_STALLED, macs / STALLED_MACS) or _newly_loaded(kernel):
        return False
    again = end - _gemv_alone_until[0] < _gemv_alone_for[0]
    _gemv_alone_for[0] = min(2 * _gemv_alone_for[0], GEMV_ALONE_MAX) if again else GEMV_ALONE_FOR
    _gemv_alone_until[0], _blas_spins_until[0] = end + _gemv_alone_for[0], 0.0
    return True


def _gemv_kernel(a, b, out):
    """the Numba loop for out = a (M, K) @ b (K, N), or None (BLAS): gemv_loop's, for matching shapes and
    dtypes. The loops check no bounds: mismatched shapes go to BLAS, which raises"""
    if (a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or out.shape != (a.shape[0], b.shape[1])
            or out.dtype != b.dtype):
        return None
    return gemv_loop(a.shape[0], b, a.dtype)


def gemv_loop(M, b, dtype):
    """the loop matmul runs M rows of dtype times the weight b (K, N) on: with M up to GEMV_ROWS, rows_gemv
    over a weight of ROWS_GEMV_BYTES or more stored as rows (the LM head), cols_gemv over a row-major
    weight of COLS_GEMV_BYTES or more (the layers'); else None (BLAS's product, or numpy's without OpenBLAS)"""
    if _blas is None or M > GEMV_ROWS or b.ndim != 2 or b.dtype != dtype:
        return None
    if b.nbytes >= ROWS_GEMV_BYTES and b.T.flags.c_contiguous:
        return rows_gemv
    if b.nbytes >= COLS_GEMV_BYTES and b.flags.c_contiguous:
        return cols_gemv
    return None


_signatures_seen = {}


def _newly_loaded(kernel):
    """whether the GEMV loops, or kernel, loaded a signature (compiled, or read it from the cache) since a
    slow call last asked: a first call's load is not a stall. Asked only after a slow call (counting the
    signatures costs ~3 us, a tenth of a decoding step's small GEMV)"""
    new = False
    for k in {rows_gemv, cols_gemv, kernel} - {None}:
        n = len(k.signatures)
        new, _signatures_seen[k] = new or n != _signatures_seen.get(k, 0), n
    return new


def _gemv_product(a, b, out, kernel, one_thread):
    """out = a @ b on kernel (rows_gemv, cols_gemv) or, when None, on BLAS; on one thread when one_thread"""
    if kernel is None:
        if not one_thread:
            return np.matmul(a, b, out=out)
        with _at_one_thread():
            return np.matmul(a, b, out=out)
    if kernel is rows_gemv:
        args = (b.T, a, out)
    else:
        args = (a, b, np.empty((COLS_PARTS,) + out.shape, b.dtype), out)
    if one_thread:
        kernels.at_one_thread(kernel, *args)
    else:
        kernel(*args)
    return out


# A GEMV over a weight's rows (y = W x, the tied LM head's h @ wte^T) streamed ~25 GB/s in OpenBLAS's
# sgemv and ~28-30 in the loop below on the machines here (the other layout, x^T W^T, ~30 in OpenBLAS).
# Only weights this large: the loop pays a wake of Numba's threads when they sleep (~25 us)
ROWS_GEMV_BYTES = 16 << 20
# Both loops take a few rows too (beams, a batch), reading the weight once for all: 2-4 rows over GPT-2's
# layer weights ran 1.2-3x BLAS's split product (which packs the weight); 8 rows no faster
GEMV_ROWS = 4


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def rows_gemv(W, x, out):
    """out[m, i] = sum_k W[i, k] x[m, k] for x (M, K): W's row i read once for all M dot products, each
    on one thread, in the same order on any count and for any M"""
    for i in prange(W.shape[0]):
        for m in range(x.shape[0]):
            s = out.dtype.type(0.0)
            for k in range(W.shape[1]):
                s += W[i, k] * x[m, k]
            out[m, i] = s
    return out


# The layers' GEMVs, x (K,) @ W (K, N) with W row-major (every linear's weight): GPT-2 124M greedy
# decoding ran ~44-49 tokens/s on BLAS's threads, ~53-59 on this loop (Numba's threads spin ~0.1 ms
# after a kernel, kernels/__init__.py, so the next layer's GEMV finds them awake). Four slices of K
# (two a thread) measured faster than two, 40-45 against 38-39 GB/s over GPT-2's layer weights.
# Several rows of W a pass load and store the sums once for several FMAs, not once for one: on a
# 2-core Zen 1 EPYC (AVX2) GPT-2's layer GEMVs streamed 11-13 GB/s one row a pass, 14-19 four; on a
# 2-core Zen 4 EPYC (AVX-512) eight rows streamed the 48 layer weights of a token 1.19x faster than
# four (median of 150 alternating pairs in one process, quartiles 1.16-1.22), sixteen no faster.
COLS_GEMV_BYTES = 1 << 20
COLS_PARTS = 4


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def cols_gemv(x, W, parts, out):
    """out = x @ W for x (M, K): parts[p] = sum over slice p of K of x[:, k] W[k], W's rows read in order
    and once for all M rows, eight a pass; out = sum of parts. A row's sums are those it has alone."""
    K, N = W.shape
    P = parts.shape[0]
    for p in prange(P):
        acc = parts[p]
        acc[:] = 0
        k, end = p * K // P, (p + 1) * K // P
        while k + 8 <= end:
            for m in range(x.shape[0]):
                x0, x1, x2, x3, x4, x5, x6, x7 = x[m, k:k + 8]
                a = acc[m]
                for n in range(N):
                    a[n] += (x0 * W[k, n] + x1 * W[k + 1, n] + x2 * W[k + 2, n] + x3 * W[k + 3, n]
                             + x4 * W[k + 4, n] + x5 * W[k + 5, n] + x6 * W[k + 6, n] + x7 * W[k + 7, n])
            k += 8
        for j in range(k, end):  # the slice's last 0-7 rows
            for m in range(x.shape[0]):
                xj, a = x[m, j], acc[m]
                for n in range(N):
                    a[n] += xj * W[j, n]
    out[:] = parts[0]
    for p in range(1, P):
        out += parts[p]
    return out


def _block(x, y, o, bias=None):
    """o = x @ y (+ bias): with a bias, o is filled with it and BLAS adds the product (beta = 1) where it
    wrote zeros first (beta = 0), so the bias costs no second pass over o"""
    if bias is not None and x.ndim == 2:
        o[...] = bias
        if gemm_add(x, y, o):
            return o
    np.matmul(x, y, out=o)
    if bias is not None:
        o += bias
    return o


def mm(a, b, bias=None, out=None):
    """a @ b (+ bias, (N,)): numpy's product on the NumPy path (NUMLM_NUMBA=0), else matmul() above.
    Stacks of more than one leading axis, (B, H, M, K) @ (B, H, K, N), are split over B (views of any
    strides: attention's heads of the joined [q | k | v]) when B has a block for each core, else over B*H.
    out: an array the product is written into (BLAS writing its strided rows in place), returned."""
    if not kernels.enabled:
        out = np.matmul(a, b, out=out)
        if bias is not None:
            out += bias
        return out
    if a.ndim > 3 and b.ndim == a.ndim and a.shape[:-2] == b.shape[:-2]:
        if a.shape[0] >= workers():  # blocks of the first axis: views of any strides (attention's heads)
            return matmul(a, b, out=out, bias=bias)
        lead = a.shape[:-2]
        ab = matmul(a.reshape((-1,) + a.shape[-2:]), b.reshape((-1,) + b.shape[-2:]), bias=bias)
        return _put(out, ab.reshape(lead + ab.shape[-2:]))
    return matmul(a, b, out=out, bias=bias)


def mm_pair(a, b, c, d, into=None, out=(None, None)):
    """(a @ b, c @ d): two independent products of about equal work, a layer's dx = dy W^T and
    dW = x^T dy. On the kernel path each runs whole on its own core, c @ d on a worker while the
    caller computes a @ b: one thread hand-off for both instead of one each (a wake-up costs
    ~0.1 ms here), and no row blocks of x^T, which BLAS ran ~6% slower than the whole product.
    into: an array c @ d is added into (a gradient), returned in its place: BLAS adds it there
    (beta = 1), no product zeroed, written and added in a second pass.
    out: arrays (or None) a @ b and c @ d are written into and returned, BLAS writing them in place
    when their rows are strided (attention's dq, dk, dv: views of the joined [dq | dk | dv])."""
    if not kernels.enabled:
        return np.matmul(a, b, out=out[0]), (np.matmul(c, d, out=out[1]) if into is None else _add_into(into, c @ d))
    work_ab, work_cd = a.size * b.shape[-1], c.size * d.shape[-1]
    if (_blas is None or workers() < 2 or min(work_ab, work_cd) < SPLIT_MIN_MACS
            or max(work_ab, work_cd) > PAIR_MAX_RATIO * min(work_ab, work_cd)):
        return _put(out[0], mm(a, b)), (_put(out[1], mm(c, d)) if into is None else _add_into(into, mm(c, d)))
    ab = np.empty(a.shape[:-1] + b.shape[-1:], dtype=np.result_type(a, b)) if out[0] is None else out[0]
    cd = into if into is not None else out[1] if out[1] is not None else \
        np.empty(c.shape[:-1] + d.shape[-1:], dtype=np.result_type(c, d))
    if into is None and a.ndim > 2 and a.ndim == b.ndim == c.ndim == d.ndim and \
            a.shape[:-2] == b.shape[:-2] == c.shape[:-2] == d.shape[:-2] and np.prod(a.shape[:-2]) > 1 and \
            (a.shape[0] > 1 or out[0] is out[1] is None):
        return _stacked_pair(a, b, c, d, ab, cd)
    with _lock, _at_one_thread():
        _on_cores([(_block, (a, b, ab)), (_block if into is None else _block_into, (c, d, cd))])
    return ab, cd


def _put(o, p):
    """p written into o, which is returned (p itself when o is None)"""
    if o is None:
        return p
    o[...] = p
    return o


def _stacked_pair(a, b, c, d, ab, cd):
    """mm_pair of two stacks (attention's per-head products): each core takes half of the stack of both
    products, the same work on each (two different products on the two cores had one core idle ~25%
    of the time, their speeds differing). Halves of the first axis when it has two or more: views of
    any strides, BLAS reading and writing them in place."""
    x = [a, b, c, d, ab, cd] if a.shape[0] > 1 else [_stack(m) for m in (a, b, c, d, ab, cd)]  # ab, cd: C order
    h = x[0].shape[0] // 2
    with _lock, _at_one_thread():
        _on_cores([(_two_blocks, [m[:h] for m in x]), (_two_blocks, [m[h:] for m in x])])
    return ab, cd


def _stack(x):
    """(.., M, N) -> (S, M, N), a view for the layouts attention passes"""
    return x.reshape((-1,) + x.shape[-2:])


def _two_blocks(a, b, c, d, ab, cd):
    _block(a, b, ab)
    _block(c, d, cd)


def _add_into(into, p):
    into += p
    return into


def _block_into(x, y, o):
    """o += x @ y"""
    return o if gemm_add(x, y, o) else _add_into(o, np.matmul(x, y))


# Attention's products without the keys no query sees (ops.attention.visible_forward). `blocks` are
# query blocks [(i0, i1, j1)]: rows i0..i1 of the (B, H, Tq, Tk) scores see keys 0..j1 only, shared by
# the stack (causal: the future) or one list per batch row (padding: the keys after the row's last).
# Any array may be a strided view (heads split from (B, T, C) without a copy): BLAS reads each (T, D)
# matrix with its row stride, and an out given is written in place (merged heads).

def mm_visible(a, b, blocks):
    """a @ b on each block's rows i0..i1 and keys 0..j1, left unwritten beyond j1 (the softmax kernels
    read each row up to its end only).   a (B, H, Tq, K), b (B, H, K, Tk)"""
    out = np.empty(a.shape[:-1] + b.shape[-1:], dtype=np.result_type(a, b))
    _over_stack(_visible, (a, b, out), blocks, work=a.size * b.shape[-1])
    return out


def _by_row(blocks):
    """whether blocks are one list per batch row (padding's), not shared by the stack"""
    return bool(blocks) and not isinstance(blocks[0], tuple)


def _per_row(arrays, blocks):
    """[(arrays, blocks)]: the whole stack and its shared blocks, or each batch row's views and its own"""
    if not _by_row(blocks):
        return [(arrays, blocks)]
    return [(tuple(x[r] for x in arrays), row) for r, row in enumerate(blocks)]


def _visible(a, b, out, blocks):
    for (a, b, out), row in _per_row((a, b, out), blocks):
        for i0, i1, j1 in row:
            np.matmul(a[..., i0:i1, :], b[..., :j1], out=out[..., i0:i1, :j1])


def mm_from_visible(m, b, blocks, out=None):
    """m @ b for m (B, H, Tq, Tk) that is 0 beyond each block's keys 0..j1.   b (B, H, Tk, N)"""
    out = np.empty(m.shape[:-1] + b.shape[-1:], dtype=np.result_type(m, b)) if out is None else out
    _over_stack(_from_visible, (m, b, out), blocks, work=m.size * b.shape[-1])
    return out


def _from_visible(m, b, out, blocks):
    for (m, b, out), row in _per_row((m, b, out), blocks):
        for i0, i1, j1 in row:
            np.matmul(m[..., i0:i1, :j1], b[..., :j1, :], out=out[..., i0:i1, :])


def mm_t_from_visible(m, b, blocks, out=None):
    """m^T @ b for m as in mm_from_visible: the keys a block adds (after the previous block's j1) are
    seen by its rows and the rows below only; keys after the last block's j1 by none (0).
    b (B, H, Tq, N) -> (B, H, Tk, N)"""
    out = np.empty(m.shape[:-2] + (m.shape[-1], b.shape[-1]), dtype=np.result_type(m, b)) if out is None else out
    _over_stack(_t_from_visible, (m, b, out), blocks, work=m.size * b.shape[-1])
    return out


def _t_from_visible(m, b, out, blocks):
    for (m, b, out), row in _per_row((m, b, out), blocks):
        j0 = 0
        for i0, _, j1 in row:
            np.matmul(m[..., i0:, j0:j1].swapaxes(-1, -2), b[..., i0:, :], out=out[..., j0:j1, :])
            j0 = j1
        out[..., j0:, :] = 0


def _over_stack(fn, arrays, blocks, work):
    """fn(*arrays, blocks) on blocks of the stack (B, H, ..) (along the batch, or the heads when they split
    more evenly; per-row blocks: along the batch, parts of about equal work), one per thread, the
    caller's included, BLAS on one thread in each: one thread hand-off for all of a product's query
    blocks, not one each (~0.1 ms a wake-up here; gpt-small has 8 query blocks). `work`:
    multiply-adds, at most; below SPLIT_MIN_MACS the caller computes all."""
    if _blas is None:
        return fn(*arrays, blocks)
    n = workers() if work >= SPLIT_MIN_MACS else 1
    B, H = arrays[0].shape[:2]
    per_row = _by_row(blocks)
    axis = 0 if per_row or B % n == 0 or (H % n and B >= H) else 1  # the more even split
    if per_row:
        done = np.cumsum([sum((i1 - i0) * j1 for i0, i1, j1 in row) for row in blocks])
        bounds = sorted({0, B} | {int(np.searchsorted(done, done[-1] * i / n)) + 1 for i in range(1, n)})
    else:
        n = min(n, arrays[0].shape[axis])
        bounds = [arrays[0].shape[axis] * i // n for i in range(n + 1)]
    parts = [(tuple(x[lo:hi] if axis == 0 else x[:, lo:hi] for x in arrays), blocks[lo:hi] if per_row else blocks)
             for lo, hi in zip(bounds[:-1], bounds[1:]) if lo < hi]
    with _lock, _at_one_thread():
        _on_cores([(fn, part + (bl,)) for part, bl in parts])

