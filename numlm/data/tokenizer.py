"""A thin wrapper around the `tokenizers` package: BERT WordPiece and GPT-2 byte-level BPE.

The wrapped ``tokenizers.Tokenizer`` does all the work; this class trains the two standard
pipelines, loads transformers-format ``tokenizer.json`` files, finds the special ids by name and
returns padded int64 NumPy batches shaped (B, T).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import tokenizers

from .corpus import read_text_file
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")   # ids 0..4 when trained here
GPT_EOS = "<|endoftext|>"
_NAMES = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]",
          "eos": GPT_EOS}
# RoBERTa's byte-level BPE names the same roles differently (<s> ... </s>, <mask>)
MAX_VOCAB = 2 ** 32   # token files hold ids as uint32
ROBERTA_NAMES = {"pad": "<pad>", "unk": "<unk>", "cls": "<s>", "sep": "</s>", "mask": "<mask>"}


def _files(files):
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [str(f) for f in files]
    if not files:
        raise ValueError("files must name at least one file, got an empty list")
    blank = True
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"files: {f!r} does not exist or is not a file")
        # strict UTF-8, no binary files: the trainer reads them as text
        blank = blank and not read_text_file(f, strip_md=False).strip()
    if blank:
        raise ValueError(f"files {files!r} are empty (no text other than white space): nothing to train "
                         "the tokenizer on")
    return files


def _check_training_args(vocab_size, minimum, min_frequency):
    """The trainer's own checks are overflow errors or silent truncation (min_frequency=0.5 -> 0)."""
    if (not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool)
            or not minimum <= vocab_size <= MAX_VOCAB):
        raise ValueError(f"vocab_size must be an int in [{minimum}, {MAX_VOCAB}], got {vocab_size!r}")
    if not isinstance(min_frequency, (int, np.integer)) or isinstance(min_frequency, bool) or min_frequency < 0:
        raise ValueError(f"min_frequency must be an int >= 0, got {min_frequency!r}")


def _wordpiece_pipeline(lowercase):
    if not isinstance(lowercase, bool):
        raise ValueError(f"lowercase must be True or False, got {lowercase!r}")
    tk = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                               strip_accents=None, lowercase=lowercase)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(prefix="##")
    return tk


def _wordpiece_finish(tk):
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tk


def _bpe_pipeline():
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def _roberta_finish(tk):
    """RoBERTa's vocab.json + merges.txt: its specials as special tokens (<mask> eating the space before
    it, as transformers' AddedToken(lstrip=True)) and <s> A </s> / <s> A </s></s> B </s> around the text."""
    tk.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<s>", "<pad>", "</s>", "<unk>")
                           if tk.token_to_id(t) is not None])
    if tk.token_to_id("<mask>") is not None:
        tk.add_special_tokens([tokenizers.AddedToken("<mask>", lstrip=True, special=True)])
    tk.post_processor = processors.RobertaProcessing(("</s>", tk.token_to_id("</s>")), ("<s>", tk.token_to_id("<s>")),
                                                     trim_offsets=True, add_prefix_space=False)
    return tk


def _wordpiece_trainer(vocab_size, min_frequency):
    _check_training_args(vocab_size, len(BERT_SPECIALS) + 1, min_frequency)
    return trainers.WordPieceTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                     special_tokens=list(BERT_SPECIALS),
                                     continuing_subword_prefix="##", show_progress=False)


def _bpe_trainer(vocab_size, min_frequency):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    _check_training_args(vocab_size, len(alphabet) + 1, min_frequency)
    return trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                               special_tokens=[GPT_EOS], initial_alphabet=alphabet,
                               show_progress=False)


def save_paths(path):
    """(tokenizer.json, tokenizer_config.json or None) that Tokenizer.save(path) writes: a folder's
    tokenizer_config.json belongs to its tokenizer.json, so a save under another name leaves it alone."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / "tokenizer.json"
    return file, (file.parent / "tokenizer_config.json" if file.name == "tokenizer.json" else None)


def _write_whole(file, write, config_file=None, config_text=None):
    """tokenizer.json (and its tokenizer_config.json), both written aside before either is renamed
    in, so a failure leaves both files as they were"""
    from ..io.checkpoint import write_together
    files = [(file, write)] + ([(config_file, lambda t: Path(t).write_text(config_text))] if config_file else [])
    try:
        write_together(files)
    except Exception as e:  # OSError, or the Rust side's own type (a full disk among them)
        raise ValueError(f"cannot write {str(file)!r}: {e}; the earlier files, if any, are intact") from None


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer`` (kept without its own padding/truncation in ``.backend``)."""

    def __init__(self, backend: tokenizers.Tokenizer):
        if not isinstance(backend, tokenizers.Tokenizer):
            raise ValueError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self._names = {k: name if backend.token_to_id(name) is not None or k not in ROBERTA_NAMES
                       else ROBERTA_NAMES[k] for k, name in _NAMES.items()}
        self._ids = {k: backend.token_to_id(name) for k, name in self._names.items()}
        self._max_length = None

    @property
    def model_max_length(self):
        """The tokens a text may have, specials included (tokenizer_config.json's), or None for no limit:
        the pipelines numlm.tag and numlm.answer follow cut there."""
        return self._max_length

    @model_max_length.setter
    def model_max_length(self, n):
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            raise ValueError(f"model_max_length must be an integer >= 1 or None, got {n!r}")
        self._max_length = None if n is None else int(n)

    @contextmanager
    def truncating(self, max_length, stride=0, strategy="longest_first"):
        """The backend inside the block, cutting encodings at max_length tokens (the cut-off part in
        Encoding.overflowing, windows overlapping by stride); after it, no cutting again."""
        self.backend.enable_truncation(int(max_length), stride=stride, strategy=strategy)
        try:
            yield self.backend
        finally:
            self.backend.no_truncation()

    # ---- training -------------------------------------------------------------------------
    @classmethod
    def train_wordpiece(cls, files, vocab_size, lowercase=True, min_frequency=2):
        """BERT WordPiece: [PAD] [UNK] [CLS] [SEP] [MASK] get ids 0..4."""
        tk = _wordpiece_pipeline(lowercase)
        tk.train(_files(files), _wordpiece_trainer(vocab_size, min_frequency))
        return cls(_wordpiece_finish(tk))

    @classmethod
    def train_wordpiece_from_iterator(cls, texts, vocab_size, lowercase=True, min_frequency=2):
        tk = _wordpiece_pipeline(lowercase)
        tk.train_from_iterator(_texts(texts), _wordpiece_trainer(vocab_size, min_frequency))
        return cls(_wordpiece_finish(tk))

    @classmethod
    def train_bpe(cls, files, vocab_size, min_frequency=2):
        """GPT-2 byte-level BPE with one special token <|endoftext|> (id 0)."""
        tk = _bpe_pipeline()
        tk.train(_files(files), _bpe_trainer(vocab_size, min_frequency))
        return cls(tk)

    @classmethod
    def train_bpe_from_iterator(cls, texts, vocab_size, min_frequency=2):
        tk = _bpe_pipeline()
        tk.train_from_iterator(_texts(texts), _bpe_trainer(vocab_size, min_frequency))
        return cls(tk)

    # ---- files ----------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path):
        """Load a tokenizers/transformers ``tokenizer.json``."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"path: {str(path)!r} is a folder, not a tokenizer.json file")
        if not path.is_file():
            raise ValueError(f"path: tokenizer file {str(path)!r} does not exist")
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises its own exception type
            raise ValueError(f"path: {str(path)!r} is not a valid tokenizer.json ({e})") from e

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None):
        """A model folder's tokenizer (from_dir), or a Hugging Face Hub name's through its cache
        (numlm.io.hub: huggingface_hub, HF_HOME, HF_HUB_OFFLINE, `revision`)."""
        from ..io.hub import resolve
        return cls.from_dir(resolve(name_or_path, revision))

    @classmethod
    def from_dir(cls, model_dir):
        """Load a Hugging Face model directory: tokenizer.json, else vocab.txt or vocab.json+merges.txt."""
        d = Path(model_dir)
        if not d.is_dir():
            raise ValueError(f"model_dir: {str(d)!r} is not a directory")
        config = {}
        if (d / "tokenizer_config.json").is_file():
            from ..io import read_json
            config = read_json(d / "tokenizer_config.json")
        tok = cls._from_files(d, config)
        n = config.get("model_max_length")  # transformers writes 1e30 for "no limit"
        if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 10 ** 29:
            tok.model_max_length = n
        return tok

    @classmethod
    def _from_files(cls, d, config):
        """tokenizer.json, else vocab.txt or vocab.json + merges.txt, of folder d"""
        if (d / "tokenizer.json").is_file():
            return cls.from_file(d / "tokenizer.json")
        try:  # the tokenizers package raises bare Exceptions
            if (d / "vocab.txt").is_file():
                tk = _wordpiece_pipeline(bool(config.get("do_lower_case", True)))
                tk.model = models.WordPiece.from_file(str(d / "vocab.txt"), unk_token="[UNK]")
                missing = [t for t in ("[CLS]", "[SEP]") if tk.token_to_id(t) is None]
                if missing:
                    raise ValueError(f"model_dir: {str(d / 'vocab.txt')!r} has no {' or '.join(missing)} token")
                return cls(_wordpiece_finish(tk))
            if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
                tk = _bpe_pipeline()
                tk.model = models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt"))
                if tk.token_to_id("<s>") is not None and tk.token_to_id("</s>") is not None:
                    _roberta_finish(tk)
                return cls(tk)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"model_dir: {str(d)!r} holds a vocabulary the tokenizer cannot read "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        raise ValueError(f"model_dir: {str(d)!r} has no tokenizer.json, vocab.txt or vocab.json")

    def save(self, path):
        """Write tokenizer.json (+ tokenizer_config.json beside it); `path` is a directory or a .json file.
        Each file is written whole or not at all: a failed save leaves the earlier files intact."""
        from ..io import check_folder_path
        file, config_file = save_paths(path)
        check_folder_path(file.parent, "path").mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for key in ("pad", "unk", "cls", "sep", "mask"):
            if self._ids[key] is not None:
                config[f"{key}_token"] = self._names[key]
        if self.eos_id is not None:
            config.update(bos_token=GPT_EOS, eos_token=GPT_EOS)
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        _write_whole(file, lambda t: self.backend.save(str(t)), config_file, json.dumps(config, indent=2) + "\n")
        return file

    # ---- vocabulary -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    pad_id = property(lambda self: self._ids["pad"])
    unk_id = property(lambda self: self._ids["unk"])
    cls_id = property(lambda self: self._ids["cls"])
    sep_id = property(lambda self: self._ids["sep"])
    mask_id = property(lambda self: self._ids["mask"])
    eos_id = property(lambda self: self._ids["eos"])

    @property
    def special_ids(self) -> set:
        ids = {i for i in self._ids.values() if i is not None}
        ids |= {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        return ids

    def token_to_id(self, token):
        return self.backend.token_to_id(token)

    def id_to_token(self, i):
        return self.backend.id_to_token(int(i))

    def __len__(self):
        return self.vocab_size

    def __repr__(self):
        kind = type(self.backend.model).__name__
        return f"Tokenizer({kind}, vocab_size={self.vocab_size})"

    # ---- encoding -------------------------------------------------------------------------
    def encode(self, text, pair=None, add_special_tokens=True) -> list:
        """text (and pair) -> token ids, with the post-processor's specials when asked."""
        _check_text("text", text)
        if pair is not None:
            _check_text("pair", pair)
        return self.backend.encode(text, pair, add_special_tokens=add_special_tokens).ids

    def encode_many(self, texts, add_special_tokens=False) -> list:
        """Many texts -> list of id lists, in parallel on the Rust side (no padding)."""
        texts = _texts_list("texts", texts)
        encs = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def encode_batch(self, texts, pairs=None, max_length=None, padding=True, truncation=True,
                     padding_side="right", add_special_tokens=True):
        """texts (B,) -> dict(input_ids, attention_mask, token_type_ids), each int64 (B, T).

        padding: True pads to the longest row, "max_length" to `max_length`, False returns lists
        of 1-D int64 arrays. truncation (with max_length) trims the longest sequence first."""
        texts = _texts_list("texts", texts)
        if pairs is not None:
            pairs = _texts_list("pairs", pairs)
            if len(pairs) != len(texts):
                raise ValueError(f"pairs must have len(texts)={len(texts)} entries, got {len(pairs)}")
        if padding not in (True, False, "longest", "max_length"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if truncation and max_length is not None:
            n_special = self.backend.num_special_tokens_to_add(pairs is not None) if add_special_tokens else 0
            if max_length <= n_special + (pairs is not None):
                raise ValueError(f"max_length={max_length} is too small: the special tokens alone "
                                 f"take {n_special}")
        inputs = texts if pairs is None else list(zip(texts, pairs))
        cut = truncation and max_length is not None
        with self.truncating(max_length) if cut else nullcontext(self.backend) as tk:
            encs = tk.encode_batch(inputs, add_special_tokens=add_special_tokens)
        rows = [(e.ids, e.type_ids) for e in encs]
        if padding is False:
            return {"input_ids": [np.array(i, np.int64) for i, _ in rows],
                    "attention_mask": [np.ones(len(i), np.int64) for i, _ in rows],
                    "token_type_ids": [np.array(t, np.int64) for _, t in rows]}
        longest = max((len(i) for i, _ in rows), default=0)
        T = max_length if padding == "max_length" else longest
        if T < longest:  # only when truncation=False and a row exceeds max_length
            raise ValueError(f"a row has {longest} tokens > max_length={max_length} and truncation=False")
        B = len(rows)
        pad = next((i for i in (self.pad_id, self.eos_id) if i is not None), 0)
        input_ids = np.full((B, T), pad, np.int64)                       # (B, T)
        attention_mask = np.zeros((B, T), np.int64)
        token_type_ids = np.zeros((B, T), np.int64)
        for b, (ids, types) in enumerate(rows):
            n = len(ids)
            s = slice(0, n) if padding_side == "right" else slice(T - n, T)
            input_ids[b, s] = ids
            token_type_ids[b, s] = types
            attention_mask[b, s] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": token_type_ids}

    def decode(self, ids, skip_special_tokens=True) -> str:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"ids must be a 1-D sequence of ints, got shape {ids.shape} dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got range "
                             f"[{ids.min()}, {ids.max()}]")
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, rows, skip_special_tokens=True) -> list:
        return [self.decode(r, skip_special_tokens) for r in rows]


def _check_text(name, text):
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a str, got {type(text).__name__}")


def _texts_list(name, texts):
    if isinstance(texts, str):
        raise ValueError(f"{name} must be a list of str, got a single str")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(t).__name__}")
    return texts


def _texts(texts):
    """Training iterator; refuses an empty corpus instead of training a specials-only vocabulary."""
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of str, got a single str")
    try:
        it = iter(texts)
    except TypeError:
        raise ValueError(f"texts must be an iterable of str, got {type(texts).__name__}") from None
    for first in it:  # leading empty strings are skipped: a corpus of only those is empty
        if not isinstance(first, str):
            raise ValueError(f"texts must hold str, got {type(first).__name__}")
        if first.strip():
            break
    else:
        raise ValueError("texts is empty (no text other than white space): nothing to train the tokenizer on")

    def gen():
        yield first
        for i, t in enumerate(it, 1):
            if not isinstance(t, str):
                raise ValueError(f"texts must hold str, got {type(t).__name__}")
            yield t
    return gen()
