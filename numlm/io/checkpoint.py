"""Read and write transformers' checkpoint files. Errors name the file and what is wrong with it."""
import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"


class NonFiniteWeightsWarning(UserWarning):
    """A checkpoint holds NaN or infinite weights (a diverged run saved, or a damaged file)."""


def nonfinite_tensors(state):
    """The keys of `state` whose floating-point arrays hold NaN or inf."""
    return [k for k, v in state.items()
            if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]


def _warn_nonfinite(state, where):
    bad = nonfinite_tensors(state)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        warnings.warn(f"{where} holds NaN or inf in {len(bad)} tensor(s): {', '.join(bad[:5])}{more}",
                      NonFiniteWeightsWarning, stacklevel=3)
    return state


def check_folder_path(path, what):
    """A folder to be written at `path`: refused (ValueError) when it, or any parent of it, is a file,
    or when it is an empty string (Path("") is the current folder)."""
    if isinstance(path, str) and not path:
        raise ValueError(f"{what}: an empty path; give a folder (. for the current folder)")
    path = Path(path)
    for p in [path, *path.parents]:
        if p.is_symlink() and not p.exists():  # mkdir would say "File exists"
            raise ValueError(f"{what}: {str(p)!r} is a link to {os.readlink(p)!r}, which does not exist")
        if p.exists():
            if not p.is_dir():
                name = "is a file, not a folder" if p == path else f"is a file, so {str(path)!r} cannot be a folder"
                raise ValueError(f"{what}: {str(p)!r} {name}")
            return path
    return path


def _dir(path):
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint path {str(path)!r} is not a directory")
    return path


def read_json(f, kind=dict):
    """A JSON file's content (a `kind`, dict by default); a missing, non-UTF-8 or malformed file is
    a ValueError naming it."""
    f = Path(f)
    try:
        text = f.read_bytes().decode("utf-8")
        value = json.loads(text)
    except FileNotFoundError:
        raise ValueError(f"{str(f)!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{str(f)!r} is a folder, not a JSON file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(f)!r} is not valid JSON: byte {e.object[e.start]:#04x} at offset {e.start} "
                         f"is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(f)!r} is not valid JSON: {e}") from None
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{str(f)!r} must hold a JSON {'object' if kind is dict else kind.__name__}, "
                         f"got {type(value).__name__}")
    return value


def read_config(path):
    """config.json of a model directory as a dict."""
    f = _dir(path) / CONFIG
    if not f.is_file():
        raise ValueError(f"no config.json in {str(path)!r}")
    return read_json(f)


GENERATION_CONFIG = "generation_config.json"
# the settings of a generation_config.json generate() takes from it: the token ids; the file's other
# settings are transformers' GenerationConfig defaults, or a warning names them (numlm's generate
# takes them as its arguments)
GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
GENERATION_NOTES = ("transformers_version", "_from_model_config")  # about the file, not generation
GENERATION_DEFAULTS = {"max_length": 20, "min_length": 0,
                       "do_sample": False, "early_stopping": False, "num_beams": 1, "temperature": 1.0,
                       "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
                       "no_repeat_ngram_size": 0, "num_return_sequences": 1, "use_cache": True,
                       "output_attentions": False, "output_hidden_states": False, "output_scores": False,
                       "return_dict_in_generate": False}


def read_generation_config(path):
    """generation_config.json of a model directory as a dict, or None; a setting numlm's generate does not
    take from it (not a token id, not transformers' default) is named in a warning"""
    f = _dir(path) / GENERATION_CONFIG
    if not f.is_file():
        return None
    gen = read_json(f)
    for k in GENERATION_IDS:
        v = gen.get(k)
        ids = v if isinstance(v, list) and k == "eos_token_id" else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"{str(f)!r}: {k} must be a token id{' or a list of them' * (k == 'eos_token_id')} "
                             f"(an integer >= 0), got {v!r}")
    other = {k: v for k, v in gen.items() if k not in GENERATION_IDS + GENERATION_NOTES and v is not None
             and (k not in GENERATION_DEFAULTS or v != GENERATION_DEFAULTS[k])}
    if other:
        warnings.warn(f"{str(f)!r} sets {', '.join(f'{k}={v!r}' for k, v in other.items())}: numlm's generate takes "
                      f"only the token ids from it; pass the others to generate (numlm generate: its options)",
                      UserWarning, stacklevel=3)
    return gen


def generation_config_text(gen):
    """generation_config.json's text, or None for no generation config; checked before anything is written"""
    if gen is None:
        return None
    try:
        return json.dumps(gen, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"the generation config cannot be written as JSON: {e}") from None


def file_mode():
    """The mode open() gives a new file (0644 under umask 022); mkstemp and safetensors give 0600.
    Linux tells the umask in /proc; elsewhere reading it means setting it for a moment."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def write_together(files, remove=()):
    """[(path, write(tmp))]: each written through a temporary file beside it (the umask's mode), then
    all renamed in and the files in `remove` deleted; a failure at any point leaves every file as it was."""
    tmps = []
    try:
        for path, write in files:
            path = Path(path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            tmps.append(tmp)
            write(tmp)
            os.chmod(tmp, file_mode())
        _swap_in([(Path(path), tmp) for (path, _), tmp in zip(files, tmps)], [Path(p) for p in remove])
    except BaseException:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def _swap_in(renames, remove):
    """Rename each (path, tmp) in and delete `remove`, keeping every file replaced or deleted under a
    temporary name until all are done: a failure part way puts each one back."""
    done = []  # (path, its earlier file kept aside, or None when there was none)
    try:
        for path, tmp in [*renames, *((p, None) for p in remove if p.is_file())]:
            done.append((path, _keep_aside(path)))
            if tmp is None:
                path.unlink()
            else:
                os.replace(tmp, path)
    except BaseException:
        for path, kept in reversed(done):
            if kept is not None and path.is_file() and os.path.samefile(kept, path):
                os.unlink(kept)  # not replaced: rename() between two links of one file does nothing
            elif kept is not None:
                os.replace(kept, path)
            elif path.is_file():
                path.unlink()
        raise
    for _, kept in done:
        if kept is not None:
            os.unlink(kept)


def _keep_aside(path):
    """A second name (a hard link, else a copy) for the file at path, or None when there is none"""
    if not path.is_file():
        return None
    fd, kept = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old")
    os.close(fd)
    os.unlink(kept)
    try:
        os.link(path, kept)
    except OSError:  # a file system without hard links
        try:
            shutil.copy2(path, kept)
        except BaseException:
            Path(kept).unlink(missing_ok=True)
            raise
    return kept


def config_text(cfg):
    """config.json's text; a value JSON cannot hold is a ValueError, before anything is written"""
    try:
        return json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"the config cannot be written as JSON: {e}") from None


def _load_file(f):
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        if "bfloat16" in str(e):  # numpy has no bfloat16: read the file ourselves
            return _load_bfloat16(f)
        raise ValueError(f"cannot read safetensors file {str(f)!r}: {e}") from None


def _load_bfloat16(f):
    """a safetensors file holding bfloat16 tensors (as float32: a bfloat16 is a float32's upper 16 bits, so
    the values are exact) beside the dtypes numpy has"""
    kinds = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
             "BOOL": np.bool_, "BF16": np.uint16}
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header, data = json.loads(fh.read(n)), fh.read()
        state = {}
        for key, t in header.items():
            if key == "__metadata__":
                continue
            lo, hi = t["data_offsets"]
            if t["dtype"] not in kinds:
                raise ValueError(f"tensor {key!r} is {t['dtype']}, a type numlm does not read")
            a = np.frombuffer(data[lo:hi], dtype=np.dtype(kinds[t["dtype"]]).newbyteorder("<")).reshape(t["shape"])
            state[key] = (a.astype(np.uint32) << 16).view(np.float32) if t["dtype"] == "BF16" else a.copy()
        return state
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read safetensors file {str(f)!r}: {e}") from None


def load_safetensors(path):
    """{key: array} from model.safetensors, or from the shards a model.safetensors.index.json lists.
    Tensors holding NaN or inf are named in a NonFiniteWeightsWarning."""
    d = _dir(path)
    if (d / WEIGHTS).is_file():
        return _warn_nonfinite(_load_file(d / WEIGHTS), str(d / WEIGHTS))
    if (d / INDEX).is_file():
        try:
            index = read_json(d / INDEX)
            weight_map = dict(index["weight_map"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{str(d / INDEX)!r} is not a valid safetensors index: {e}") from None
        state = {}
        for shard in sorted(set(weight_map.values())):
            if not (d / shard).is_file():
                raise ValueError(f"shard {shard!r} listed in {INDEX} is missing from {str(d)!r}")
            state.update(_load_file(d / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"keys listed in {INDEX} but absent from the shards: {missing}")
        return _warn_nonfinite(state, str(d))
    pickles = sorted(f.name for f in d.iterdir() if f.suffix in PICKLES)
    if pickles:
        raise ValueError(f"{str(path)!r} holds its weights only as pickles ({', '.join(pickles[:3])}); "
                         + convert_command(d, d))
    raise ValueError(f"no {WEIGHTS} or {INDEX} in {str(path)!r}")


PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def convert_command(src, dst, tokenizer=False):
    """how to write a pickled model's weights (a folder or a Hub name, src) as safetensors in folder dst:
    transformers with the model's own class (AutoModel would drop a task head), and its tokenizer beside"""
    return ("numlm never unpickles; convert it once where torch and transformers are installed:\n"
            f"  python -c \"import transformers as t; n = '{src}'; "
            "m = getattr(t, (t.AutoConfig.from_pretrained(n).architectures or ['AutoModel'])[0]).from_pretrained(n); "
            f"m.save_pretrained('{dst}', safe_serialization=True)"
            + (f"; t.AutoTokenizer.from_pretrained(n).save_pretrained('{dst}')" if tokenizer else "") + '"')


def save_safetensors(state, path, max_shard_bytes=None):
    """Write {key: array} as model.safetensors, or as shards plus an index when larger than max_shard_bytes."""
    save_model_files(path, state, max_shard_bytes=max_shard_bytes)


def save_model_files(path, state, config=None, generation=None, max_shard_bytes=None):
    """Folder `path`'s weights ({key: array} as model.safetensors, or as shards plus an index when larger than
    max_shard_bytes) and, when given, config.json and generation_config.json (config_text's and
    generation_config_text's text), all renamed in together with an earlier save's files this one does not
    replace (the other layout's weights, extra shards; generation_config.json when config is given without
    one) removed: a failure at any point leaves the folder as it was, and a folder this call made goes."""
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, (int, np.integer))
                                        or isinstance(max_shard_bytes, bool) or max_shard_bytes < 1):
        raise ValueError(f"max_shard_bytes must be a positive int (bytes) or None, got {max_shard_bytes!r}")
    d = check_folder_path(path, "save")
    files = _weight_files(state, max_shard_bytes)
    if config is not None:
        files[CONFIG] = lambda t: Path(t).write_text(config)
    if generation is not None:
        files[GENERATION_CONFIG] = lambda t: Path(t).write_text(generation)
    stale = [f for f in [d / WEIGHTS, d / INDEX, *d.glob("model-*-of-*.safetensors")] if f.name not in files]
    if config is not None and generation is None:  # an earlier model's would give this one its token ids
        stale.append(d / GENERATION_CONFIG)
    write_folder(d, files, remove=stale)


def write_folder(d, files, remove=()):
    """{file name: write(tmp)} into folder d (made if missing), renamed in together with the files in
    `remove` deleted (write_together): a failure at any point leaves the folder as it was, and a folder
    this call made goes (parents it made stay)."""
    made = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    try:
        write_together([(d / name, w) for name, w in files.items()], remove=remove)
    except BaseException:
        if made:  # not empty: a rename got in and was put back; the first error is the one to see
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _weight_files(state, max_shard_bytes):
    """{file name: write(tmp)}: model.safetensors, or shards of at most max_shard_bytes and their index"""
    state = {k: np.ascontiguousarray(v) for k, v in state.items()}
    meta = {"format": "pt"}  # transformers expects this marker
    total = sum(v.nbytes for v in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        return {WEIGHTS: lambda t: save_file(state, t, metadata=meta)}
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        if cur and size + v.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.nbytes
    shards.append(cur)
    files, weight_map = {}, {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        files[name] = lambda t, s=shard: save_file(s, t, metadata=meta)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    files[INDEX] = lambda t: Path(t).write_text(json.dumps(index, indent=2) + "\n")
    return files
