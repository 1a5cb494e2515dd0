"""Model names through the Hugging Face cache: "org/name" (or "gpt2") where no such folder exists is
resolved by huggingface_hub (the optional extra: pip install "numlm[hub]"), which keeps the files in its
cache (HF_HOME, HF_HUB_CACHE) and works offline from it (HF_HUB_OFFLINE=1). Only weights in safetensors,
configs and tokenizer files are fetched; numlm never unpickles, so a repository with only pickled
weights is refused with the command that converts them."""
import os
from pathlib import Path

from .checkpoint import PICKLES, convert_command

# what a model folder needs: configs, safetensors weights (single or sharded), tokenizer files, and a
# sentence-transformers model's module configs (1_Pooling/config.json)
ALLOW = ["*.json", "*.safetensors", "vocab.txt", "merges.txt", "*/config.json"]


def _truthy(v):
    return str(v).strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir():
    """huggingface_hub's cache folder, read from the environment now: HF_HUB_CACHE, else HF_HOME/hub,
    else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline():
    return _truthy(os.environ.get("HF_HUB_OFFLINE", "0"))


def resolve(name_or_path, revision=None):
    """A local folder as it is; otherwise a Hub name -> the folder of its snapshot in the cache
    (downloaded unless offline). Every failure is one ValueError line saying what to do."""
    path = Path(name_or_path)
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub names; {str(path)!r} is a local folder")
        return path
    name = str(name_or_path)
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or not name.strip() or "\\" in name:
        raise ValueError(f"checkpoint path {name!r} does not exist (and is not a Hugging Face Hub name, org/name)")
    try:
        import huggingface_hub as hf
        from huggingface_hub import errors
    except ImportError:
        raise ValueError(f"{name!r} is not a folder; to load it by name from the Hugging Face Hub install "
                         "huggingface_hub: pip install \"numlm[hub]\"") from None
    cache, local, files = cache_dir(), offline(), None
    not_found = (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.HFValidationError)
    try:
        if not local:
            files = _remote_files(hf, name, revision)
            _refuse_pickles_only(name, revision, files or [])
        folder = Path(hf.snapshot_download(name, revision=revision, cache_dir=cache, allow_patterns=ALLOW,
                                           local_files_only=local or files is None))
    except errors.LocalEntryNotFoundError:
        where = f"revision {revision!r} of " if revision else ""
        why = "HF_HUB_OFFLINE is set" if local else "the Hugging Face Hub could not be reached"
        raise ValueError(f"{where}{name!r} is not in the Hugging Face cache {str(cache)!r} and {why}: "
                         "run once with a network (HF_HUB_OFFLINE=0) to download it") from None
    except not_found as e:
        raise ValueError(f"{name!r}{f' revision {revision!r}' if revision else ''}: not found on the Hugging Face "
                         f"Hub ({type(e).__name__})") from None
    _refuse_pickles_only(name, revision, [str(p.relative_to(folder)) for p in folder.rglob("*")])
    return folder


def _remote_files(hf, name, revision):
    """The repository's file names, or None when the Hub cannot be reached (no network, a proxy, a server
    error): then the cache is used. model_info asks once, where list_repo_files retries for ~25 s."""
    from huggingface_hub import errors
    try:
        return [s.rfilename for s in hf.model_info(name, revision=revision).siblings or []]
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.HFValidationError):
        raise
    except Exception:
        return None


def _refuse_pickles_only(name, revision, files):
    """A repository whose weights are only pickles (pytorch_model.bin, ...): refused, with the conversion."""
    weights = [f for f in files if f.endswith(PICKLES)]
    if weights and not any(f.endswith(".safetensors") for f in files):
        raise ValueError(f"{name!r}{f' revision {revision!r}' if revision else ''} holds its weights only as "
                         f"pickles ({', '.join(sorted(weights)[:3])}). "
                         + convert_command(name, name.replace("/", "--"), tokenizer=True)
                         + f"\nthen load the folder {name.replace('/', '--')!r} (or upload its model.safetensors to the "
                           f"repository)")


def folder(name_or_path, revision=None):
    """resolve() as a str: what the commands that take MODEL_DIR pass on."""
    return str(resolve(name_or_path, revision))
