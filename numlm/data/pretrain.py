"""Pre-training data: BERT masked-LM and next-sentence pairs, GPT packed blocks, token files.

Every random choice comes from a ``numpy.random.Generator`` passed in (or made from a seed), so a
batch is a pure function of (data, rng state). Arrays are int64 (B, T) as transformers expects.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..ops._check import int_array
from ..ops import IGNORE_INDEX

_int_ids = int_array


def as_rng(rng):
    """A Generator from a Generator, an int seed or None."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise ValueError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def _positive_int(name, v):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


# ---- masked LM ---------------------------------------------------------------------------------
def mask_tokens(input_ids, special_mask_or_ids, mask_id, vocab_size, rng, mlm_probability=0.15,
                attention_mask=None):
    """BERT masking: choose each maskable token w.p. p; chosen -> [MASK] 80%, random id 10%, kept 10%.
    input_ids: (B, T) or (T,) ints  ->  masked_ids, labels: same shape, int64 (labels -100 unchosen)

    special_mask_or_ids is a bool mask of input_ids' shape (True = never chosen) or a collection
    of special ids; positions with attention_mask == 0 are never chosen either. The draws follow
    transformers' DataCollatorForLanguageModeling: bernoulli(p), bernoulli(0.8), bernoulli(0.5),
    randint(vocab_size), each over the whole array."""
    ids = _int_ids("input_ids", input_ids)
    vocab_size = _positive_int("vocab_size", vocab_size)
    if not (isinstance(mlm_probability, (float, int, np.floating)) and 0.0 < mlm_probability < 1.0):
        raise ValueError(f"mlm_probability must lie in (0, 1), got {mlm_probability!r}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got range "
                         f"[{ids.min()}, {ids.max()}]")
    if not (isinstance(mask_id, (int, np.integer)) and 0 <= mask_id < vocab_size):
        raise ValueError(f"mask_id must be an int in [0, {vocab_size}), got {mask_id!r}")
    rng = as_rng(rng)
    special = _special_mask(ids, special_mask_or_ids)
    if attention_mask is not None:
        attention_mask = np.asarray(attention_mask)
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have shape {ids.shape}, got {attention_mask.shape}")
        special = special | (attention_mask == 0)

    chosen = (rng.random(ids.shape) < mlm_probability) & ~special
    labels = np.where(chosen, ids, IGNORE_INDEX).astype(np.int64)
    replaced = (rng.random(ids.shape) < 0.8) & chosen
    randomized = (rng.random(ids.shape) < 0.5) & chosen & ~replaced
    random_words = rng.integers(vocab_size, size=ids.shape)
    masked = ids.astype(np.int64, copy=True)
    masked[replaced] = mask_id
    masked[randomized] = random_words[randomized]
    return masked, labels


def _special_mask(ids, special_mask_or_ids):
    s = special_mask_or_ids
    if isinstance(s, np.ndarray) and s.dtype == bool:
        if s.shape != ids.shape:
            raise ValueError(f"special mask must have input_ids' shape {ids.shape}, got {s.shape}")
        return s
    if s is None:
        return np.zeros(ids.shape, bool)
    if isinstance(s, (int, np.integer, str, bytes)):
        raise ValueError(f"special_mask_or_ids must be a bool mask or a collection of ids, got {s!r}")
    special_ids = _int_ids("special ids", np.fromiter((int(i) for i in s), np.int64))
    return np.isin(ids, special_ids)


# ---- next-sentence prediction --------------------------------------------------------------------
class NSPPair(NamedTuple):
    a: list                 # segment A token ids (no specials)
    b: list                 # segment B token ids
    label: int              # 0: B continues A in the same document, 1: B from another document


def tokenize_documents(texts, tokenizer):
    """Documents -> [[sentence ids, ...], ...]: one sentence per non-empty line, no special tokens."""
    docs = []
    for text in texts:
        lines = [l.strip() for l in text.split("\n") if l.strip()]
        if lines:
            docs.append([s for s in tokenizer.encode_many(lines, add_special_tokens=False) if s])
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError("texts hold no text to tokenize (empty corpus)")
    return docs


def nsp_pairs(documents, max_length, rng, short_seq_prob=0.1, dupe_factor=1):
    """BERT's create_instances_from_document over every document.

    documents: list of documents, each a list of sentences, each a list of token ids.
    Sentences are gathered into a chunk up to max_length - 3 tokens (a shorter random target with
    probability short_seq_prob); A is the first 1..n-1 sentences of the chunk; B is, with
    probability 1/2, the rest of the chunk (label 0), else a run of sentences from a random other
    document (label 1; the unused sentences of the chunk are returned to the stream). The pair is
    then trimmed to fit ``[CLS] A [SEP] B [SEP]``: the longer side loses tokens, A from its front
    and B from its back, so a label-0 pair stays a contiguous span of its document."""
    max_length = _positive_int("max_length", max_length)
    if max_length < 5:
        raise ValueError(f"max_length must be >= 5 for [CLS] A [SEP] B [SEP], got {max_length}")
    if isinstance(short_seq_prob, bool) or not isinstance(short_seq_prob, (int, float, np.integer, np.floating)) \
            or not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"short_seq_prob must lie in [0, 1], got {short_seq_prob!r}")
    docs = [[list(map(int, s)) for s in d if len(s)] for d in documents]
    docs = [d for d in docs if d]
    if len(docs) < 2:
        raise ValueError(f"documents must hold at least 2 non-empty documents for NSP, got {len(docs)}")
    rng = as_rng(rng)
    pairs = []
    for _ in range(_positive_int("dupe_factor", dupe_factor)):
        for i in range(len(docs)):
            pairs.extend(_pairs_from_document(docs, i, max_length - 3, rng, short_seq_prob))
    return pairs


def _pairs_from_document(docs, index, max_tokens, rng, short_seq_prob):
    doc = docs[index]
    target = max_tokens
    if rng.random() < short_seq_prob:
        target = int(rng.integers(2, max_tokens + 1))
    out, chunk, length, i = [], [], 0, 0
    while i < len(doc):
        chunk.append(doc[i])
        length += len(doc[i])
        if i == len(doc) - 1 or length >= target:
            a_end = 1 if len(chunk) < 2 else int(rng.integers(1, len(chunk)))
            a = [t for s in chunk[:a_end] for t in s]
            if len(chunk) == 1 or rng.random() < 0.5:
                label, b = 1, []
                other = int(rng.integers(len(docs) - 1))
                other += other >= index                          # any document but this one
                start = int(rng.integers(len(docs[other])))
                for s in docs[other][start:]:
                    b.extend(s)
                    if len(b) >= target - len(a):
                        break
                i -= len(chunk) - a_end                          # unused sentences go back
            else:
                label, b = 0, [t for s in chunk[a_end:] for t in s]
            a, b = _truncate_pair(a, b, max_tokens)
            if a and b:
                out.append(NSPPair(a, b, label))
            chunk, length = [], 0
            target = max_tokens
            if rng.random() < short_seq_prob:
                target = int(rng.integers(2, max_tokens + 1))
        i += 1
    return out


def _truncate_pair(a, b, max_tokens):
    """Trim the longer of a, b one token at a time (A from the front, B from the back)."""
    na, nb = len(a), len(b)
    while na + nb > max_tokens:
        if na > nb:
            na -= 1
        else:
            nb -= 1
    return a[len(a) - na:], b[:nb]


def nsp_batch(pairs, cls_id, sep_id, pad_id=0, max_length=None):
    """NSP pairs -> dict(input_ids, token_type_ids, attention_mask (B, T), next_sentence_label (B,)).

    Rows are ``[CLS] A [SEP] B [SEP]`` padded on the right with pad_id to the longest row (or to
    max_length); token types 0 for [CLS] A [SEP] and padding, 1 for B [SEP]."""
    if not pairs:
        raise ValueError("pairs is empty")
    for name, v in (("cls_id", cls_id), ("sep_id", sep_id), ("pad_id", pad_id)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a token id (an int >= 0), got {v!r}")
    lengths = [len(p.a) + len(p.b) + 3 for p in pairs]
    T = max(lengths) if max_length is None else _positive_int("max_length", max_length)
    if max(lengths) > T:
        raise ValueError(f"a pair needs {max(lengths)} tokens > max_length={T}")
    B = len(pairs)
    input_ids = np.full((B, T), pad_id, np.int64)                    # (B, T)
    token_type_ids = np.zeros((B, T), np.int64)
    attention_mask = np.zeros((B, T), np.int64)
    for r, p in enumerate(pairs):
        na, nb = len(p.a), len(p.b)
        input_ids[r, :na + nb + 3] = [cls_id, *p.a, sep_id, *p.b, sep_id]
        token_type_ids[r, na + 2:na + nb + 3] = 1
        attention_mask[r, :na + nb + 3] = 1
    labels = np.array([p.label for p in pairs], np.int64)              # (B,)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "attention_mask": attention_mask, "next_sentence_label": labels}


def bert_pretraining_batches(pairs, batch_size, tokenizer_or_ids, rng, mlm_probability=0.15,
                             max_length=None, shuffle=True):
    """NSP pairs -> batches for BertForPreTraining: nsp_batch + mask_tokens (labels = MLM labels).

    tokenizer_or_ids: a Tokenizer, or a dict with cls_id, sep_id, pad_id, mask_id, vocab_size and
    special_ids. One pass over the pairs (shuffled with rng when shuffle=True)."""
    t = tokenizer_or_ids
    get = (lambda k: t[k]) if isinstance(t, dict) else (lambda k: getattr(t, k))
    batch_size = _positive_int("batch_size", batch_size)
    rng = as_rng(rng)
    order = rng.permutation(len(pairs)) if shuffle else np.arange(len(pairs))
    for s in range(0, len(order), batch_size):
        batch = nsp_batch([pairs[i] for i in order[s:s + batch_size]], get("cls_id"), get("sep_id"),
                          get("pad_id"), max_length)
        batch["input_ids"], batch["labels"] = mask_tokens(
            batch["input_ids"], get("special_ids"), get("mask_id"), get("vocab_size"), rng,
            mlm_probability, attention_mask=batch["attention_mask"])
        yield batch


# ---- causal LM ---------------------------------------------------------------------------------
def pack_documents(token_lists, eos_id):
    """Documents' ids -> one 1-D int64 stream, each document followed by eos_id (GPT-2's layout)."""
    if not isinstance(eos_id, (int, np.integer)) or eos_id < 0:
        raise ValueError(f"eos_id must be a non-negative int, got {eos_id!r}")
    parts = []
    for i, ids in enumerate(token_lists):
        ids = _int_ids(f"token_lists[{i}]", ids).reshape(-1)
        parts += [ids.astype(np.int64), np.array([eos_id], np.int64)]
    if not parts:
        raise ValueError("token_lists is empty")
    return np.concatenate(parts)


def _check_stream(tokens, block_size):
    tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    block_size = _positive_int("block_size", block_size)
    if len(tokens) < block_size:
        raise ValueError(f"tokens has {len(tokens)} ids, fewer than block_size={block_size}")
    return tokens, block_size


def _gather(tokens, starts, block_size):
    out = np.empty((len(starts), block_size), np.int64)              # (B, T)
    for r, s in enumerate(starts):                                   # slices: memmap-friendly
        out[r] = tokens[s:s + block_size]
    return {"input_ids": out, "labels": out.copy()}


def sample_blocks(tokens, block_size, batch_size, rng):
    """B blocks of T consecutive tokens at uniform random starts in [0, N - T].
    tokens: (N,)  ->  input_ids, labels: (B, T) int64, labels == input_ids (the model shifts)."""
    tokens, T = _check_stream(tokens, block_size)
    B = _positive_int("batch_size", batch_size)
    starts = as_rng(rng).integers(0, len(tokens) - T + 1, size=B)
    return _gather(tokens, starts, T)


def causal_lm_batches(tokens, block_size, batch_size, rng, num_batches=None):
    """Endless (or num_batches) random batches of sample_blocks."""
    if num_batches is not None:
        num_batches = _positive_int("num_batches", num_batches)
    rng = as_rng(rng)
    n = 0
    while num_batches is None or n < num_batches:
        yield sample_blocks(tokens, block_size, batch_size, rng)
        n += 1


def sequential_blocks(tokens, block_size, batch_size):
    """Evaluation: non-overlapping blocks [0:T], [T:2T], ... in order, batch_size per batch (the
    last batch may be smaller; a tail shorter than T is dropped)."""
    tokens, T = _check_stream(tokens, block_size)
    B = _positive_int("batch_size", batch_size)
    starts = np.arange(0, len(tokens) - T + 1, T)
    for s in range(0, len(starts), B):
        yield _gather(tokens, starts[s:s + B], T)


# ---- token files -------------------------------------------------------------------------------
def _sidecar(path):
    return Path(path).with_suffix(".json")


def _docs_path(path):
    return Path(path).with_suffix(".docs.npy")


def _documents(texts_or_paths, encoding):
    """An iterator over prepare's document texts (a path is read one file at a time)."""
    from .corpus import read_texts, iter_texts
    if isinstance(texts_or_paths, (str, os.PathLike)):
        return iter_texts(texts_or_paths, encoding=encoding)
    docs = []
    for item in texts_or_paths:
        if isinstance(item, os.PathLike):
            docs.extend(read_texts(item, encoding=encoding))
        elif isinstance(item, str):
            if item.strip():
                docs.append(item)
        else:
            raise ValueError(f"texts_or_paths items must be str or Path, got {type(item).__name__}")
    if not docs:
        raise ValueError("texts_or_paths holds no text (empty corpus)")
    return iter(docs)


def prepare(texts_or_paths, tokenizer, out_path, separator="auto", batch_docs=256, encoding="utf-8"):
    """Tokenize once into a flat token file: out_path (.bin, uint16 if vocab < 65536 else uint32),
    a JSON sidecar (token_file, dtype, length, num_documents, vocab_size, separator_id) and
    <name>.docs.npy (int64 start offset of every document). Documents are written in chunks, so the
    corpus never has to fit in memory as ids. separator: "auto" (eos, else [SEP], else none), an id or None.
    A .json or .docs.npy beside out_path that is not its own (check_prepared_files) is refused.

    texts_or_paths: a path (file or folder, via read_texts), or a list whose str items are
    document texts and whose Path items are files or folders (decoded strictly in `encoding`)."""
    paths = ([texts_or_paths] if isinstance(texts_or_paths, (str, os.PathLike))
             else [t for t in texts_or_paths if isinstance(t, os.PathLike)])
    out_path = check_prepared_files(out_path, paths)
    separator, batch_docs = _check_prepare_args(tokenizer, separator, batch_docs)
    docs = _documents(texts_or_paths, encoding)
    V = tokenizer.vocab_size
    dtype = np.dtype(np.uint16) if V < 2 ** 16 else np.dtype(np.uint32)
    from ..io import check_folder_path
    from ..io.checkpoint import write_together
    check_folder_path(out_path.parent, "out_path").mkdir(parents=True, exist_ok=True)
    written = {}

    def token_file(tmp):
        with open(tmp, "wb") as f:
            written["starts"], written["n"] = _write_tokens(f, docs, tokenizer, separator, batch_docs, dtype)
        if written["n"] == 0:
            raise ValueError("texts_or_paths tokenized to zero tokens")
        written["meta"] = {"token_file": out_path.name, "dtype": dtype.name, "length": written["n"],
                           "num_documents": len(written["starts"]), "vocab_size": V, "separator_id": separator}

    def sidecar(tmp):
        Path(tmp).write_text(json.dumps(written["meta"], indent=2) + "\n")

    def starts_file(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(written["starts"], np.int64))

    # the token file streams first and sizes the other two; all three are renamed in once complete
    write_together([(out_path, token_file), (_sidecar(out_path), sidecar), (_docs_path(out_path), starts_file)])
    return written["meta"]


def _write_tokens(f, docs, tokenizer, separator, batch_docs, dtype):
    """each document's ids (and the separator after it) into the open file f, batch_docs documents at a
    time: (the start offset of every document, the number of tokens)"""
    starts, n = [], 0
    while chunk := list(itertools.islice(docs, batch_docs)):
        for ids in tokenizer.encode_many(chunk, add_special_tokens=False):
            if separator is not None:
                ids = ids + [separator]
            starts.append(n)
            np.asarray(ids, dtype).tofile(f)
            n += len(ids)
    return starts, n


def auto_separator(tokenizer):
    """the token prepare's separator "auto" puts after each document: eos, else [SEP], else None"""
    return tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id


def _check_prepare_args(tokenizer, separator, batch_docs):
    """(separator id or None, batch_docs): the separator is a token of the tokenizer."""
    batch_docs = _positive_int("batch_docs", batch_docs)
    if isinstance(separator, str) and separator == "auto":
        return auto_separator(tokenizer), batch_docs
    V = tokenizer.vocab_size
    if separator is not None and (not isinstance(separator, (int, np.integer)) or isinstance(separator, bool)
                                  or not 0 <= separator < V):
        raise ValueError(f"separator must be 'auto', None or a token id in [0, {V}), got {separator!r}")
    return (None if separator is None else int(separator)), batch_docs


def check_prepared_files(out_path, inputs=()):
    """out_path as a Path, refused when it is a folder, when the files prepare writes (it, its .json
    sidecar and .docs.npy) are one file twice or one of the input files (a corpus, a tokenizer), or
    when the sidecar or .docs.npy already there is not out_path's own (_check_companions)"""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"out_path: {str(out_path)!r} is a folder; give the token file's name (e.g. tokens.bin)")
    written = [out_path.resolve(), _sidecar(out_path).resolve(), _docs_path(out_path).resolve()]
    if len(set(written)) < 3:
        raise ValueError(f"out_path {str(out_path)!r}: the token file and its sidecar {_sidecar(out_path).name} "
                         "would be one file; give a name such as tokens.bin")
    from .corpus import corpus_files  # a folder's inputs are the text files in it
    files = [f for i in inputs for f in (corpus_files(i) if Path(i).is_dir() else [Path(i)])]
    if clash := [str(f) for f in files if f.resolve() in written]:
        raise ValueError(f"out_path {str(out_path)!r} would overwrite the input {clash[0]!r}")
    _check_companions(out_path)
    return out_path


def _sidecar_meta(side):
    """A sidecar's content, or None when the file is not a token file's sidecar at all."""
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(meta, dict) or not {"dtype", "length", "num_documents"} <= meta.keys():
        return None
    return meta


def _describes(meta, path):
    """Whether a sidecar's length and dtype fit the file at path (it went with that file when renamed)."""
    try:
        size = meta["length"] * np.dtype(meta["dtype"]).itemsize
    except (TypeError, ValueError):
        return False
    return path.is_file() and path.stat().st_size == size


def _check_companions(out_path):
    """The sidecar and .docs.npy are named from out_path's stem, so tokens.bin and tokens, or a.train
    and a.val, would share them, and a user's train.json beside train.bin would be replaced. A sidecar
    records its token file's name ("" before names were recorded): one whose token file is gone (renamed
    with its sidecar) is out_path's when out_path is the file it describes."""
    side, docs = _sidecar(out_path), _docs_path(out_path)
    hint = "move it, or give out_path another stem"
    if side.exists():
        meta = _sidecar_meta(side)
        if meta is None:
            raise ValueError(f"out_path {str(out_path)!r}: {str(side)!r} exists and is not a token file's sidecar; "
                             f"prepare would replace it: {hint}")
        owner = meta.get("token_file", "")
        if owner == out_path.name or (not owner and out_path.is_file()):
            return
        if owner and (side.parent / owner).is_file():
            raise ValueError(f"out_path {str(out_path)!r}: {str(side)!r} is the sidecar of the token file {owner!r}; "
                             f"{hint}")
        if owner and _describes(meta, out_path):
            return  # renamed together with out_path
        whose = f"the token file {owner!r}, which is not beside it (renamed or removed)" if owner else \
            "another token file"
        raise ValueError(f"out_path {str(out_path)!r}: {str(side)!r} is the sidecar of {whose}; if no token file "
                         f"uses it, remove {str(side)!r}, else give out_path another stem")
    elif docs.exists() and not out_path.is_file():
        raise ValueError(f"out_path {str(out_path)!r}: {str(docs)!r} exists and is not this token file's; {hint}")
    elif out_path.exists():  # no sidecar: a user's file, which prepare would replace
        raise ValueError(f"out_path {str(out_path)!r} exists and is not a token file (no sidecar {side.name} beside "
                         "it); prepare would replace it: move it, or give another name")


def load_meta(path):
    """The token file's sidecar, checked: a garbled one is a ValueError naming it."""
    side = _sidecar(path)
    if not side.is_file():
        raise ValueError(f"path: no sidecar {str(side)!r} next to the token file")
    from ..io import read_json
    meta = read_json(side)
    ok = isinstance(meta, dict) and meta.get("dtype") in ("uint16", "uint32")
    for key in ("length", "num_documents"):
        ok = ok and isinstance(meta.get(key), int) and not isinstance(meta[key], bool) and meta[key] >= 0
    if not ok:
        raise ValueError(f"{str(side)!r} is not a token file's sidecar (it needs dtype uint16 or uint32, "
                         "and length and num_documents as non-negative ints)")
    return meta


def load_tokens(path):
    """The token file written by prepare -> read-only np.memmap of shape (length,)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} does not exist")
    meta = load_meta(path)
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size != meta["length"] * dtype.itemsize:
        raise ValueError(f"path {str(path)!r} has {path.stat().st_size} bytes, the sidecar says "
                         f"{meta['length']} x {dtype.name}")
    return np.memmap(path, dtype=dtype, mode="r", shape=(meta["length"],))


def load_document_starts(path):
    """The (num_documents,) int64 start offsets prepare wrote beside the token file."""
    docs, meta = _docs_path(path), load_meta(path)
    if not docs.is_file():
        raise ValueError(f"path: no document starts {str(docs)!r} next to the token file")
    try:
        starts = np.load(docs, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{str(docs)!r} is damaged: {e}") from None
    if starts.shape != (meta["num_documents"],) or starts.dtype.kind not in "iu":
        raise ValueError(f"{str(docs)!r} holds {starts.shape} {starts.dtype}, the sidecar says "
                         f"{meta['num_documents']} document starts")
    return starts


def split_tokens(tokens, val_fraction=0.1, doc_starts=None):
    """(train, val) views of a 1-D stream: val is the last val_fraction of the tokens; with
    doc_starts the cut moves forward to the next document start so no document is split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    n = len(tokens)
    cut = int(round(n * (1.0 - val_fraction)))
    if doc_starts is not None:
        starts = np.asarray(doc_starts)
        later = starts[starts >= cut]
        cut = int(later[0]) if len(later) else n
    if cut <= 0 or cut >= n:
        raise ValueError(f"val_fraction={val_fraction} leaves an empty split of {n} tokens")
    return tokens[:cut], tokens[cut:]


def split_documents(documents, val_fraction=0.1, rng=None):
    """(train, val) lists: the last val_fraction of the documents (shuffled first if rng given)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    docs = list(documents)
    if rng is not None:
        docs = [docs[i] for i in as_rng(rng).permutation(len(docs))]
    n_val = int(round(len(docs) * val_fraction))
    if n_val < 1 or n_val >= len(docs):
        raise ValueError(f"val_fraction={val_fraction} of {len(docs)} documents leaves an empty split")
    return docs[:-n_val], docs[-n_val:]


# ---- resumable sampler -------------------------------------------------------------------------
class TokenStream:
    """Batches of (B, T) blocks from a token stream (array or memmap), resumable exactly.

    mode "random": every batch draws B uniform starts (sample_blocks).
    mode "epoch": the non-overlapping blocks in a fresh random order each epoch, B at a time.
    state_dict() holds the step, the epoch position and the Generator state, all JSON-friendly."""

    def __init__(self, tokens, block_size, batch_size, rng=None, mode="random"):
        self.tokens, self.block_size = _check_stream(tokens, block_size)
        self.batch_size = _positive_int("batch_size", batch_size)
        if mode not in ("random", "epoch"):
            raise ValueError(f"mode must be 'random' or 'epoch', got {mode!r}")
        self.mode = mode
        self.rng = as_rng(rng)
        self.step = 0
        self.epoch = 0
        self.position = 0
        self._n_blocks = len(self.tokens) // self.block_size
        self._order = None
        self._epoch_rng_state = None

    def _new_epoch(self):
        self._epoch_rng_state = self.rng.bit_generator.state
        self._order = self.rng.permutation(self._n_blocks)
        self.position = 0

    def next_batch(self):
        T, B = self.block_size, self.batch_size
        if self.mode == "random":
            batch = sample_blocks(self.tokens, T, B, self.rng)
        else:
            if self._order is None:
                self._new_epoch()
            blocks = []
            while len(blocks) < B:
                if self.position >= self._n_blocks:
                    self.epoch += 1
                    self._new_epoch()
                take = self._order[self.position:self.position + B - len(blocks)]
                blocks.extend(int(b) for b in take)
                self.position += len(take)
            batch = _gather(self.tokens, [b * T for b in blocks], T)
        self.step += 1
        return batch

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def state_dict(self):
        return {"mode": self.mode, "block_size": self.block_size, "batch_size": self.batch_size,
                "step": self.step, "epoch": self.epoch, "position": self.position,
                "rng": self.rng.bit_generator.state, "epoch_rng": self._epoch_rng_state}

    def load_state_dict(self, state):
        for k in ("mode", "block_size", "batch_size"):
            if state[k] != getattr(self, k):
                raise ValueError(f"state {k}={state[k]!r} does not match this stream's {getattr(self, k)!r}")
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        self._order, self._epoch_rng_state = None, state["epoch_rng"]
        if self._epoch_rng_state is not None:   # redraw this epoch's order from its starting state
            self.rng.bit_generator.state = self._epoch_rng_state
            self._order = self.rng.permutation(self._n_blocks)
        self.rng.bit_generator.state = state["rng"]
