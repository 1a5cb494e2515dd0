"""The training loop: gradient accumulation, clipping, Adam(W) with a schedule, evaluation,
progress, metrics, and checkpoints that resume bit-exactly.

A checkpoint is a folder  <out>/checkpoints/step-0000100/  holding the model (config.json +
model.safetensors), the optimizer moments (optimizer.safetensors) and trainer_state.json (step,
optimizer scalars, the dropout and data generators' states, the data position, and a sha256 of
every file and of its own content, so a damaged checkpoint is detected, never half-loaded). It is written
under a temporary name and renamed into place, so a run killed mid-write leaves the previous
checkpoint intact and no half-written one that looks complete.
"""
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .inspect import GradientFlow
from .io.checkpoint import file_mode
from .nn import eval_mode
from .optim import AdamW, clip_grad_norm, get_schedule

CKPT_PREFIX = "step-"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what timeout, schedulers and container stops send


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was passed over for the one before it."""


@dataclasses.dataclass
class TrainConfig:
    out_dir: str = "runs/numlm"
    max_steps: int = 1000
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"        # constant | constant_with_warmup | linear | cosine
    warmup: int = 100
    clip: float = 1.0               # global-norm clipping; 0 disables
    eval_every: int = 100
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    progress: bool = True

    def validate(self):
        """Every field checked, NaN and infinity included; a ValueError names the field."""
        if not isinstance(self.out_dir, (str, os.PathLike)) or not str(self.out_dir):
            raise ValueError(f"out_dir must be a non-empty path, got {self.out_dir!r}")
        for name in ("max_steps", "grad_accum", "eval_every", "save_every", "keep_last", "log_every"):
            _int(name, getattr(self, name), 1)
        _int("warmup", self.warmup, 0)
        _real("lr", self.lr, "> 0", lambda v: v > 0)
        _real("weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0)
        _real("eps", self.eps, "> 0", lambda v: v > 0)
        _real("clip", self.clip, ">= 0 (0 disables clipping)", lambda v: v >= 0)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            _real(f"betas[{i}]", b, "in [0, 1)", lambda v: 0 <= v < 1)
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress must be True or False, got {self.progress!r}")
        if self.warmup > self.max_steps:
            raise ValueError(f"warmup must be at most max_steps ({self.max_steps}), got {self.warmup}: the learning "
                             f"rate would stay below lr for the whole run")
        get_schedule(self.schedule, self.warmup, self.max_steps)


def _int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")


def _real(name, v, want, ok):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(v) or not ok(v):
        raise ValueError(f"{name} must be a finite number {want}, got {v!r}")


# ---- checkpoints -------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be read (damaged, truncated) or written (full disk); names the file."""


def list_checkpoints(out_dir, complete=True):
    """Checkpoints of a run, oldest first: those holding trainer_state.json (written last), or with
    complete=False every step folder (one without it was damaged after it was written)."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
             and p.name[len(CKPT_PREFIX):].isdigit() and (not complete or (p / "trainer_state.json").is_file())]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


STEP = rf"{CKPT_PREFIX}\d+"  # a checkpoint's folder name, as a pattern


def stale_save(name, saved=STEP):
    """re.fullmatch of the folder a save of `saved` (a pattern) leaves when killed: .tmp-<saved>-<pid>, or
    .old-<saved>-<pid> between its two renames; groups: tmp or old, the saved name, the pid"""
    return re.fullmatch(rf"\.(tmp|old)-({saved})-(\d+)", name)


def checkpoint_entries(out_dir):
    """What numlm wrote in out_dir/checkpoints: its step folders and interrupted saves' folders."""
    root = Path(out_dir) / "checkpoints"
    stale = [p for p in root.iterdir() if p.is_dir() and stale_save(p.name)] if root.is_dir() else []
    return list_checkpoints(out_dir, complete=False) + stale


def clear_checkpoints(out_dir):
    """Remove a run's checkpoints (checkpoint_entries), not a file of the user's own in checkpoints/;
    the folder goes when nothing is left in it."""
    for p in checkpoint_entries(out_dir):
        shutil.rmtree(p)
    root = Path(out_dir) / "checkpoints"
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def latest_checkpoint(out_dir):
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def remove_stale_saves(root, saved=STEP, put_back=True):
    """A save into root killed between writing and renaming leaves its .tmp-step-N-<pid> folder (and,
    killed between its two renames, .old-step-N-<pid>, then the only copy of step N). Once that process
    is gone, remove the first and put the second back (put_back); a live process's folders are its own.
    root: a run's checkpoints/, or finetune's folder with `saved` "best"."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in list(root.iterdir()):
        m = stale_save(p.name, saved)
        if m is None or not p.is_dir() or _alive(int(m[3])):
            continue
        if put_back and m[1] == "old" and not (root / m[2]).exists():
            os.rename(p, root / m[2])
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's
        return True
    return True


def model_generators(model):
    """{dotted name: numpy Generator} of every distinct generator the model's modules hold (dropout)."""
    gens, seen = {}, set()
    for prefix, m in model.modules():
        for k, v in vars(m).items():
            if isinstance(v, np.random.Generator) and id(v) not in seen:
                seen.add(id(v))
                gens[f"{prefix}.{k}" if prefix else k] = v
    return gens


def save_checkpoint(out_dir, step, model, optimizer, extra_state, keep_last=2):
    """Write checkpoint `step` atomically (temporary folder, then rename) and keep the last K.
    Any failure (a full disk, an interrupt) removes the temporary folder and leaves the earlier
    checkpoints as they were."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_saves(root)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        model.save_pretrained(tmp)
        opt = optimizer.state_dict()
        tensors = {f"exp_avg/{k}": v for k, v in opt.pop("exp_avg").items()}
        tensors.update({f"exp_avg_sq/{k}": v for k, v in opt.pop("exp_avg_sq").items()})
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
        os.chmod(tmp / "optimizer.safetensors", file_mode())
        gens = {k: g.bit_generator.state for k, g in model_generators(model).items()}
        state = {"step": step, "architecture": type(model).__name__, "optimizer": opt, "generators": gens,
                 "model_rng": model.rng.bit_generator.state if getattr(model, "rng", None) is not None else None,
                 **extra_state}
        state["files"] = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        state["state_sha256"] = _state_hash(state)
        with open(tmp / "trainer_state.json", "w") as f:
            f.write(json.dumps(state, indent=1, default=_json_default))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: swap, then drop the old copy
            old = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):  # safetensors reports a full disk as its own error
            prev = latest_checkpoint(out_dir)
            kept = f"; {prev.name} is intact" if prev is not None else ""
            raise CheckpointError(f"cannot write checkpoint {str(final)!r}: "
                                  f"{getattr(e, 'strerror', None) or e}{kept}") from e
        raise
    _fsync_dir(root)
    for p in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _state_hash(state):
    """sha256 of trainer_state.json's content (without this hash), independent of its layout."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    canon = json.dumps(json.loads(json.dumps(body, default=_json_default)), sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in trainer_state.json")


def read_checkpoint_state(path):
    """trainer_state.json of a checkpoint as a dict; a missing or damaged file is a CheckpointError
    naming it."""
    path = Path(path)
    f = path / "trainer_state.json"
    if not f.is_file():
        raise CheckpointError(f"{str(path)!r} is not a numlm checkpoint (no trainer_state.json)")
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(f)!r} is damaged: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(f)!r} is damaged: it must hold a JSON object")
    if "state_sha256" in state and state["state_sha256"] != _state_hash(state):
        raise CheckpointError(f"{str(f)!r} is damaged: its content does not match its checksum")
    for key in ("step", "architecture", "optimizer"):
        if key not in state:
            raise CheckpointError(f"{str(f)!r} is damaged: no {key!r}")
    for key in ("step", "tokens"):
        v = state.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError(f"{str(f)!r} is damaged: {key} {v!r}")
    return state


# what a resumed run trains with: its TrainConfig's, which check_resume compares with the checkpoint's
RESUME_SETTINGS = ("lr", "warmup", "grad_accum", "weight_decay", "betas", "eps", "schedule")
SETTING_FLAGS = {"lr": "--lr", "warmup": "--warmup", "grad_accum": "--grad-accum", "weight_decay": "--weight-decay"}


def resume_settings(config):
    """{setting: value} of a TrainConfig, for check_resume(train=...)"""
    return {k: getattr(config, k) for k in RESUME_SETTINGS}


def check_resume(state, run, steps=None, allow_changes=False, train=None):
    """Refuse (ValueError naming the first difference) to resume a checkpoint whose run differs from
    this one: each key of `run` the checkpoint recorded, each optimisation setting of `train`
    (resume_settings) its train_config recorded, and `steps` below the checkpoint's step.
    allow_changes=True (--allow-changes) accepts the changes; the run then trains with its own settings."""
    if allow_changes:
        return
    saved = state.get("run") if isinstance(state.get("run"), dict) else {}
    hint = "; pass --allow-changes if the change is meant, or start a new run"
    for k, v in run.items():
        if k in saved and saved[k] != v:
            if k.endswith("_sha256"):
                what = k[:-len("_sha256")].replace("_", " ")
                raise ValueError(f"--resume: the {what} differs from the checkpoint's (sha256 {saved[k][:12]} "
                                 f"there, {str(v)[:12]} now){hint}")
            flag = "--" + k.replace("_", "-")
            raise ValueError(f"--resume: the checkpoint was trained with {flag} {saved[k]}, not {v}{hint}")
    _check_settings(state.get("train_config"), train or {}, hint)
    if steps is not None and steps < state["step"]:
        raise ValueError(f"--resume: the checkpoint is at step {state['step']}, beyond the {steps} steps "
                         f"asked for{hint}")


def _check_settings(saved, train, hint):
    saved = saved if isinstance(saved, dict) else {}
    for k, v in train.items():
        was = saved.get(k)
        if isinstance(was, list):  # JSON's form of the betas pair
            was, v = tuple(was), tuple(v)
        if k in saved and was != v:
            raise ValueError(f"--resume: the checkpoint was trained with {SETTING_FLAGS.get(k, k)} {was}, "
                             f"not {v}{hint}")


def fingerprint(value):
    """sha256 of a JSON-able value (documents, examples, a vocabulary), for check_resume."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=_json_default).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer):
    """fingerprint of a tokenizer's vocabulary: a run's tokenizer_sha256"""
    return fingerprint(sorted(tokenizer.backend.get_vocab().items()))


def _set_generator(g, state, where):
    try:
        g.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where} is damaged: a generator state is invalid ({e})") from None


def load_checkpoint(path, model, optimizer, stream=None):
    """Restore model parameters, optimizer state, every generator (and the data stream's position)
    in place; returns the trainer state dict. Everything is read and checked before anything
    changes: a damaged file or a checkpoint of another architecture is a CheckpointError naming it."""
    from .io import load_safetensors
    path = Path(path)
    state = read_checkpoint_state(path)
    if state.get("architecture") != type(model).__name__:
        raise ValueError(f"checkpoint {str(path)!r} holds a {state.get('architecture')}, "
                         f"not a {type(model).__name__}")
    files = state.get("files", {})
    for name, digest in (files.items() if isinstance(files, dict) else ()):
        if not (path / name).is_file():
            raise CheckpointError(f"{str(path / name)!r} is missing from the checkpoint")
        if _sha256(path / name) != digest:
            raise CheckpointError(f"{str(path / name)!r} is damaged: its content does not match the checksum "
                                  f"in trainer_state.json")
    try:
        # a model with its own checkpoint files (a PeftModel: the adapter's) reads them itself
        weights = model.read_checkpoint(path) if hasattr(model, "read_checkpoint") else load_safetensors(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    f = path / "optimizer.safetensors"
    try:
        tensors = load_file(str(f))
    except Exception as e:  # safetensors raises its own types for missing, truncated or garbled files
        raise CheckpointError(f"cannot read {str(f)!r}: {e}") from None
    opt = dict(state["optimizer"]) if isinstance(state["optimizer"], dict) else {}
    opt["exp_avg"] = {k[len("exp_avg/"):]: v for k, v in tensors.items() if k.startswith("exp_avg/")}
    opt["exp_avg_sq"] = {k[len("exp_avg_sq/"):]: v for k, v in tensors.items() if k.startswith("exp_avg_sq/")}
    gens = model_generators(model)
    saved = state.get("generators")
    if saved is None and state.get("model_rng") is not None and getattr(model, "rng", None) is not None:
        saved = {name: state["model_rng"] for name, g in gens.items() if g is model.rng}
    saved = saved or {}
    where = str(path / "trainer_state.json")
    if not isinstance(saved, dict) or set(saved) - set(gens):
        raise CheckpointError(f"{where} is damaged: its generators do not match the model's")
    for name, s in saved.items():
        _set_generator(np.random.default_rng(), s, where)
    if stream is not None and not isinstance(state.get("data"), dict):
        raise CheckpointError(f"{where} is damaged: no data position")
    _load_or_undo(path, where, weights, opt, state.get("data"), model, optimizer, stream)
    for name, s in saved.items():
        gens[name].bit_generator.state = s
    return state


def _load_or_undo(path, where, weights, opt, data, model, optimizer, stream):
    """Load the optimizer, the stream and the model; each checks everything before it changes
    anything, so when a later one refuses, the earlier ones are put back as they were."""
    undo = [(optimizer, optimizer.state_dict())]
    try:
        optimizer.load_state_dict(opt)
        if stream is not None:
            undo.append((stream, stream.state_dict()))
            stream.load_state_dict(data)
        model.load_state_dict(weights, strict=True)
    except BaseException as e:
        for obj, before in undo:
            obj.load_state_dict(before)
        if isinstance(e, ValueError) and not isinstance(e, CheckpointError):  # another model or data setting
            raise ValueError(f"checkpoint {str(path)!r} does not fit this run: {e}") from None
        if isinstance(e, (KeyError, TypeError, IndexError, AttributeError)):
            raise CheckpointError(f"{where} is damaged: {type(e).__name__} {e}") from None
        raise


# ---- the loop ----------------------------------------------------------------------------------
def reuse_freed_memory():
    """Keep freed memory in the process (glibc only; elsewhere a no-op).

    Each training step allocates and frees the same large activations (a (B*T, V) logits array is
    tens of MB). glibc serves such blocks with mmap and returns them on free, so every step
    page-faults them in again (~2 us per 4 KB page); with mmap off and trimming off the heap keeps
    them for the next step. Measured: +10% tokens/s on gpt-mini. Returns True when applied.
    mallopt takes a C int: a larger threshold would wrap to 0 and trim the heap at every free."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def _is_interrupt(e):
    """A KeyboardInterrupt, or an error it caused: Ctrl-C landing inside a compiled (Numba) call
    comes out as SystemError("... returned a result with an exception set") from it."""
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__cause__ or e.__context__
    return False


class Trainer:
    """Trains `model` on batches from `stream` (an object with next_batch(), state_dict() and
    load_state_dict(), yielding dicts of model keyword arguments with labels).
    `evaluate(model) -> dict` (e.g. val_loss, val_ppl) runs every eval_every steps and at the end.

    A step is all or nothing: an interrupt (Ctrl-C) while the batch is drawn, in the forward, the
    backward or the clipping rewinds the data stream and the dropout generators to the end of the
    previous step; once the optimizer update has begun, Ctrl-C waits until the step, its metrics row
    and any checkpoint are written. The checkpoint Ctrl-C leaves is therefore the state after the
    last completed step, and a resumed run ends bit-for-bit where an uninterrupted one does."""

    def __init__(self, model, stream, config, evaluate=None, optimizer=None, run=None):
        config.validate()
        self.run_info = dict(run or {})  # what a resumed run must share (data, tokenizer, batch size): check_resume
        reuse_freed_memory()
        self.model, self.stream, self.cfg, self.evaluate = model, stream, config, evaluate
        self.params = model.parameters()
        self.optimizer = optimizer or AdamW(self.params, lr=config.lr, betas=config.betas,
                                            eps=config.eps, weight_decay=config.weight_decay)
        self.schedule = get_schedule(config.schedule, config.warmup, config.max_steps)
        self.step = 0
        self.tokens = 0
        self.out = Path(config.out_dir)
        self.history = []
        self.flow = {}
        self.plots, self.plot_seconds = None, 0.0  # the PNGs run() drew, and the time drawing them took
        self._generators = model_generators(model)
        self._started = False       # run() or resume() has claimed the folder
        self._interruptible = True  # False from the optimizer update to the step's last write
        self._pending = False       # a Ctrl-C that arrived while not interruptible
        self._updating = False      # inside the optimizer update (parameters partly written)
        self._evaluated = None      # the step whose evaluation metrics.jsonl already holds
        self._saved = None          # the step whose checkpoint is on disk

    # -- state
    def state(self):
        return {"tokens": self.tokens, "data": self.stream.state_dict(), "train_config": dataclasses.asdict(self.cfg),
                "run": self.run_info}

    def save(self):
        """Checkpoint the current step; parameters that are no longer finite are never saved."""
        bad = next((k for k, v in self.model.parameters().items() if not np.isfinite(v).all()), None)
        if bad is not None:
            self._diverged(f"parameter {bad} is not finite after the update", self.step)
        path = save_checkpoint(self.out, self.step, self.model, self.optimizer, self.state(), self.cfg.keep_last)
        self._saved = self.step
        return path

    def resume(self, path=None):
        """Continue from `path` or the run's latest checkpoint; returns the step reached. A damaged
        latest checkpoint falls back to the one before it, with a warning. metrics.jsonl keeps only
        the rows up to the checkpoint's step, so the history never repeats a step."""
        remove_stale_saves(self.out / "checkpoints")
        candidates = [Path(path)] if path else list_checkpoints(self.out, complete=False)[::-1]
        if not candidates:
            raise ValueError(f"nothing to resume: no checkpoint in {str(self.out / 'checkpoints')!r}")
        damaged = []
        o = self.optimizer  # trains with this run's settings, not the checkpoint's (check_resume compares them)
        settings = (o.lr, o.betas, o.eps, o.weight_decay)
        for ck in candidates:
            try:
                state = load_checkpoint(ck, self.model, self.optimizer, stream=self.stream)
                step, tokens = int(state["step"]), int(state.get("tokens", 0))
            except CheckpointError as e:
                if path:
                    raise
                damaged.append(str(e))
                if ck is not candidates[-1]:
                    warnings.warn(f"{e}; resuming from the checkpoint before it", CheckpointWarning, stacklevel=2)
                continue
            break
        else:
            raise CheckpointError("no readable checkpoint: " + "; ".join(damaged))
        o._set_hyperparams(*settings)
        self.step, self.tokens = step, tokens
        self._saved = step
        self._truncate_metrics()
        self._started = True
        return self.step

    def _truncate_metrics(self):
        """Drop the metrics rows logged after the resumed step (and any torn last line)."""
        f = self.out / "metrics.jsonl"
        if not f.is_file():
            return
        keep = []
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= self.step:
                keep.append(line + "\n")
                if row["step"] == self.step and "lr" not in row:
                    self._evaluated = self.step
        tmp = f.with_name(f".{f.name}.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, f)

    def _claim_folder(self):
        """A fresh run never writes into the metrics or checkpoints an earlier run left."""
        if self._started:
            return
        left = [n for n in ("metrics.jsonl",) if (self.out / n).exists()]
        left += [f"checkpoints/{p.name}" for p in list_checkpoints(self.out)[-1:]]
        if left and self.step == 0:
            raise ValueError(f"out_dir {str(self.out)!r} holds an earlier run ({', '.join(left)}): resume() it, "
                             f"or delete it, or train into another out_dir")
        self._started = True

    # -- interrupts
    def _on_sigint(self, signum, frame):
        if self._interruptible:
            raise KeyboardInterrupt
        self._pending = True

    def _allow_interrupt(self):
        self._interruptible = True
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    # -- one optimizer step
    def _diverged(self, what, step=None):
        last = latest_checkpoint(self.out)
        kept = f"the latest checkpoint, {str(last)!r}, is intact" if last else "no checkpoint was written"
        raise TrainingDiverged(f"{what} at step {self.step + 1 if step is None else step}; stopping ({kept})")

    def train_step(self):
        model, cfg = self.model, self.cfg
        rewind = (self.stream.state_dict(), {k: g.bit_generator.state for k, g in self._generators.items()})
        errstate = np.seterr(over="ignore", invalid="ignore")  # a non-finite loss or norm is reported below
        try:
            model.train()
            model.zero_grad()
            total, ntok = 0.0, 0
            for _ in range(cfg.grad_accum):
                batch = self.stream.next_batch()
                out = model(**batch)
                loss = float(model.objective(out))  # the scalar backward() differentiates
                if not math.isfinite(loss):
                    self._diverged(f"loss is {loss}")
                model.backward()
                total += loss
                am = batch.get("attention_mask")
                ntok += int(am.sum()) if am is not None else int(np.asarray(batch["input_ids"]).size)
            grads = model.grad_arrays()
            if cfg.grad_accum > 1:
                for g in grads.values():
                    g *= g.dtype.type(1.0 / cfg.grad_accum)
            flow = GradientFlow(model.parameters(), grads) if self._log_due(self.step + 1) else None
            norm = clip_grad_norm(grads, cfg.clip) if cfg.clip > 0 else float("nan")
            if cfg.clip > 0 and not math.isfinite(norm):
                self._diverged(f"gradient norm is {norm}")
            lr = cfg.lr * self.schedule(self.step)
        except BaseException:  # the step did not happen: the data and dropout draws are undone
            if hasattr(self.stream, "load_state_dict"):
                self.stream.load_state_dict(rewind[0])
            for k, s in rewind[1].items():
                self._generators[k].bit_generator.state = s
            raise
        finally:
            np.seterr(**errstate)
        self._interruptible = False  # from here on the step completes
        self._updating = True
        self.optimizer.step(grads, lr=lr)
        self.flow = flow.finish() if flow is not None else {}  # per-layer gradient norms, update ratios
        self.step += 1
        self.tokens += ntok
        self._updating = False
        return total / cfg.grad_accum, lr, norm, ntok

    def _log_due(self, step):
        return step % self.cfg.log_every == 0 or step == self.cfg.max_steps

    def _log(self, record):
        self.history.append(record)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")

    def _evaluate(self):
        """evaluate(model) in eval mode; the training's generators are left as they were, so
        evaluating (or being interrupted while evaluating) never changes the training run."""
        gens = {k: g.bit_generator.state for k, g in self._generators.items()}
        self._allow_interrupt()
        try:
            with np.errstate(over="ignore", invalid="ignore"), eval_mode(self.model):  # a diverging run: the next step says so
                row = self.evaluate(self.model)
        finally:
            self._interruptible = False
            for k, s in gens.items():
                self._generators[k].bit_generator.state = s
        return row

    def run(self, max_time=None):
        """Train to max_steps (or for max_time seconds); Ctrl-C or SIGTERM saves a checkpoint and
        returns {"step", "interrupted": True}."""
        from tqdm.auto import tqdm
        self._claim_folder()
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, disable=not self.cfg.progress, unit="step",
                   dynamic_ncols=True)
        self._interruptible, self._pending, self._updating = True, False, False
        in_main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, self._on_sigint) for s in STOP_SIGNALS} if in_main else {}
        try:
            result = self._loop(bar, max_time)
        except BaseException as e:
            if not _is_interrupt(e):
                raise
            self._interruptible = False  # a second Ctrl-C must not cut the checkpoint write short
            bar.close()
            return self._interrupted()
        finally:
            bar.close()
            for s, h in old.items():
                signal.signal(s, h)
        t = time.perf_counter()
        self.plots = plot_metrics(self.out)
        self.plot_seconds = time.perf_counter() - t
        return result

    def _loop(self, bar, max_time):
        """The steps, their logs, evaluations and checkpoints; the final evaluation and save."""
        cfg = self.cfg
        start = time.perf_counter()
        t_last, tok_last = start, 0
        due = self.evaluate is not None and 0 < self.step < cfg.max_steps and self.step % cfg.eval_every == 0
        if due and self._evaluated != self.step:  # resumed from an interrupt during this evaluation
            self._log({"step": self.step, **self._evaluate()})
        while self.step < cfg.max_steps:
            self._allow_interrupt()
            loss, lr, norm, ntok = self.train_step()
            tok_last += ntok
            bar.update(1)
            if self._log_due(self.step):
                now = time.perf_counter()
                tps = tok_last / max(now - t_last, 1e-9)
                t_last, tok_last = now, 0
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                self._log({"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                           "tokens": self.tokens, "tokens_per_s": tps, "time": now - start, **self.flow})
            if self.evaluate is not None and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                self._log({"step": self.step, **self._evaluate()})
            if self.step % cfg.save_every == 0:
                self.save()
            if max_time is not None and time.perf_counter() - start > max_time:
                break
        result = {"step": self.step, "tokens": self.tokens, "time": time.perf_counter() - start}
        if self.evaluate is not None:
            final = self._evaluate()
            if self._evaluated != self.step:  # a run resumed at its end has logged it already
                self._log({"step": self.step, **final})
            result.update(final)
        if self._saved != self.step:  # a run ending on a save_every step has saved it already
            self.save()
        self._allow_interrupt()  # a Ctrl-C during the last save is still reported
        return result

    def _interrupted(self):
        """After Ctrl-C / SIGTERM: checkpoint the last completed step, unless the update was cut."""
        if self._updating:  # only possible when the interrupt did not come through the handler
            last = latest_checkpoint(self.out)
            print(f"interrupted inside the optimizer update of step {self.step + 1}; nothing saved "
                  f"(the parameters are partly updated); the latest checkpoint is "
                  f"{last.name if last else 'none'}")
            return {"step": self.step, "interrupted": True, "saved": False}
        path = self.save()
        print(f"interrupted at step {self.step}; checkpoint saved to {path}")
        return {"step": self.step, "interrupted": True}


def plot_metrics(out_dir):
    """The run's PNGs (loss, learning rate, per-layer gradient flow: numlm.inspect.plot_run) when
    matplotlib is installed (the `plot` extra); else None."""
    from .inspect import plot_run
    if not (Path(out_dir) / "metrics.jsonl").is_file():
        return None
    return plot_run(out_dir)
