"""The heads on top of a backbone and their losses, one place for BERT and GPT.

    LM head (tied):       logits = h We^T (+ b)                     We: the token table (V, C)
    MLM head:             logits = LN(act(h Wt + bt)) We^T + b      (BERT's transform, then the tied decoder)
    NSP head:             logits = pooled Wn + bn                   pooled = tanh(h[:, 0] Wp + bp)
    sequence classifier:  logits = dropout(pooled) Wc + bc          BERT: pooled [CLS]; GPT-2: h at the last real token
    token classifier:     logits = dropout(h) Wc + bc               per position
    QA span:              start, end = h Ws + bs                    score(i, j) = start_i + end_j
    multiple choice:      s = act(dropout(h[idx]) Ws + bs)          transformers' SequenceSummary
Losses: cross-entropy (causal LM with targets shifted by one, MLM, NSP, tokens, spans, choices),
and for sequence classification the one selection by problem_type (MSE, CE or BCE with logits).
Every loss returns (loss, cache); loss_backward(cache, dloss) gives d logits in the logits' shape."""
import numpy as np

from ..kernels.matmul import mm  # a @ b, split across the cores unless NUMLM_NUMBA=0
from ..nn import Module, Linear, LayerNorm, Dropout, Activation
from ..ops import (cross_entropy_forward, cross_entropy_backward, mse_forward, mse_backward,
                   bce_with_logits_forward, bce_with_logits_backward)
from ..ops import IGNORE_INDEX
from .checks import as_ids, labels_like


# ---------------------------------------------------------------------------------------- losses

def cross_entropy(logits, labels, ignore_index=IGNORE_INDEX):
    """loss = mean over labels != ignore_index of CE(logits[..., :], labels[...])   (..., K), (...) -> ()"""
    K = logits.shape[-1]
    loss, c = cross_entropy_forward(logits.reshape(-1, K), labels.reshape(-1), ignore_index)
    return loss, ("ce", c, logits.shape)


def causal_lm_loss(logits, labels):
    """loss = mean over (b, t) with labels[b, t+1] != -100 of CE(logits[b, t], labels[b, t+1])
    transformers' shift, written as targets aligned with logits (the last position is ignored), so no
    (B, T-1, V) copy of the logits is made.    logits (..., T, V), labels (..., T) -> ()"""
    targets = np.full(labels.shape, IGNORE_INDEX, dtype=np.int64)
    targets[..., :-1] = labels[..., 1:]
    return cross_entropy(logits, targets)


def span_loss(start, end, start_positions, end_positions):
    """loss = (CE(start, s) + CE(end, e)) / 2, positions clamped to [0, T] and T ignored (transformers)
    start, end: (B, T); positions (B,) -> ()"""
    T = start.shape[-1]
    s, e = (np.clip(p, 0, T) for p in (start_positions, end_positions))  # out-of-range spans -> T, ignored
    ls, cs = cross_entropy(start, s, ignore_index=T)
    le, ce = cross_entropy(end, e, ignore_index=T)
    return (ls + le) / 2, (cs, ce)


def problem_type_loss(config, logits, labels):
    """transformers' selection for sequence classification, by config.problem_type (set on the first
    labelled forward: regression if K == 1, single-label for integer labels, else multi-label):
        regression                  loss = MSE(logits, labels)            (K == 1: both squeezed)
        single_label_classification loss = CE(logits, labels)            labels (B,) in [0, K) or -100
        multi_label_classification  loss = BCE(sigmoid(logits), labels)  labels (B, K) in [0, 1]
    logits: (B, K)"""
    B, K = logits.shape
    labels = np.asarray(labels)
    if config.problem_type is None:
        if K == 1:
            config.problem_type = "regression"
        elif labels.dtype.kind in "iu":
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    kind = config.problem_type
    if kind == "single_label_classification":
        return cross_entropy(logits, labels_like("labels", labels, (B,), K))
    if labels.dtype.kind not in "iuf":
        raise ValueError(f"labels must be numeric for {kind}, got dtype {labels.dtype}")
    y = labels.astype(logits.dtype)
    if kind == "regression":
        shapes = ((B,), (B, 1)) if K == 1 else ((B, K),)
        if y.shape not in shapes:
            raise ValueError(f"labels must have shape {' or '.join(map(str, shapes))} for regression, got {y.shape}")
        loss, c = mse_forward(logits.reshape(B), y.reshape(B)) if K == 1 else mse_forward(logits, y)
        return loss, ("mse", c, logits.shape)
    if y.shape != (B, K):
        raise ValueError(f"labels must have shape {(B, K)} for multi_label_classification, got {y.shape}")
    if ((y < 0) | (y > 1)).any():
        raise ValueError("labels for multi_label_classification must lie in [0, 1]")
    loss, c = bce_with_logits_forward(logits, y)
    return loss, ("bce", c, logits.shape)


def loss_backward(cache, dloss=1.0):
    """d loss / d logits, in the logits' shape, for a cache of any loss above (one head's)."""
    kind, c, shape = cache
    if kind == "ce":
        return cross_entropy_backward(dloss, c).reshape(shape)
    if kind == "mse":
        return mse_backward(dloss, c).reshape(shape)
    return bce_with_logits_backward(dloss, c).reshape(shape)


# ---------------------------------------------------------------------------------------- tied decoder

def tied_decoder_forward(h, We, b=None):
    """logits = h We^T + b      h: (..., C)  We: (V, C)  b: (V,) or None  ->  (..., V)"""
    V, C = We.shape
    logits = mm(h.reshape(-1, C), We.T)  # one (N, C) @ (C, V) product
    if b is not None:
        logits += b
    return logits.reshape(h.shape[:-1] + (V,)), (h, We, b is not None)


def tied_decoder_backward(dlogits, cache, need_dWe=True, need_db=True):
    """forward: logits = h We^T + b;  so  dh = dlogits We,  dWe = dlogits^T h,  db = sum dlogits
    (dWe, db: None when not needed, a frozen table or bias)"""
    h, We, has_bias = cache
    V, C = We.shape
    d2 = dlogits.reshape(-1, V)  # (N, V)
    dWe = mm(d2.T, h.reshape(-1, C)) if need_dWe else None  # (V, C)
    db = d2.sum(axis=0) if has_bias and need_db else None
    return mm(d2, We).reshape(h.shape), dWe, db


class TiedLMHead(Module):
    """logits = h We^T: GPT's lm_head, its weight the token table itself (no parameter of its own;
    the key lm_head.weight is an alias of the table's)."""

    def __init__(self, table):
        super().__init__()
        self._table = (table,)  # a tuple, so the table is not discovered as a child a second time

    def forward(self, h):  # (..., C) -> (..., V)
        logits, self.cache = tied_decoder_forward(h, self._table[0].params["weight"])
        return logits

    def backward(self, dlogits):
        table = self._table[0]
        dh, dWe, _ = tied_decoder_backward(dlogits, self.cache, table.requires_grad("weight"))
        if dWe is not None:
            table.add_grad("weight", dWe)  # added to the lookup's gradient: the total
        return dh


# ---------------------------------------------------------------------------------------- BERT's heads

class BertPredictionHeadTransform(Module):
    """t = LN(act(h Wt + bt))"""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = Activation(config.hidden_act)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h):
        return self.LayerNorm(self.transform_act_fn(self.dense(h)))

    def backward(self, dt):
        return self.dense.backward(self.transform_act_fn.backward(self.LayerNorm.backward(dt)))


class BertLMPredictionHead(Module):
    """prediction_logits = t We^T + bias, t = transform(h); the decoder IS the word-embedding table."""

    def __init__(self, config, word_embeddings):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.add_param("bias", np.zeros(config.vocab_size))
        self._word = (word_embeddings,)  # a tuple, so the table is not discovered as a child a second time

    def forward(self, h):  # (B, T, C) -> (B, T, V)
        t = self.transform(h)
        logits, self.cache = tied_decoder_forward(t, self._word[0].params["weight"], self.params["bias"])
        return logits

    def backward(self, dlogits):  # (B, T, V) -> (B, T, C)
        word = self._word[0]
        dt, dWe, db = tied_decoder_backward(dlogits, self.cache, word.requires_grad("weight"), self.requires_grad("bias"))
        if dWe is not None:
            word.add_grad("weight", dWe)  # added to the lookup's gradient: the total
        if db is not None:
            self.add_grad("bias", db)
        return self.transform.backward(dt)


class BertPooler(Module):
    """pooled = tanh(h[:, 0] Wp + bp)"""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.activation = Activation("tanh")

    def forward(self, h):  # (B, T, C) -> (B, C)
        self.cache = h.shape
        return self.activation(self.dense(h[:, 0]))

    def backward(self, dpooled):  # (B, C) -> dh (B, T, C), non-zero only at position 0
        dh = np.zeros(self.cache, dtype=dpooled.dtype)
        dh[:, 0] = self.dense.backward(self.activation.backward(dpooled))
        return dh


class BertOnlyMLMHead(Module):
    def __init__(self, config, word_embeddings):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)


class BertOnlyNSPHead(Module):
    def __init__(self, config):
        super().__init__()
        self.seq_relationship = Linear(config.hidden_size, 2)


class BertPreTrainingHeads(Module):
    def __init__(self, config, word_embeddings):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)
        self.seq_relationship = Linear(config.hidden_size, 2)


# ---------------------------------------------------------------------------------------- pooling

def gather_forward(h, idx):
    """s[...] = h[..., idx[...], :]     h: (..., T, C)  idx: (...) -> (..., C)"""
    return np.take_along_axis(h, idx[..., None, None], axis=-2)[..., 0, :], (h.shape, idx)


def gather_backward(ds, cache):
    """forward: s = h[..., idx, :];  so  dh[..., idx, :] = ds, 0 elsewhere"""
    shape, idx = cache
    dh = np.zeros(shape, dtype=ds.dtype)
    np.put_along_axis(dh, idx[..., None, None], ds[..., None, :], axis=-2)
    return dh


def last_real_index(ids, pad_token_id):
    """GPT-2's pooled position per row: the rightmost id that is not pad_token_id (transformers 5; 0 for
    an all-pad row); T - 1 when the config has no pad token, which then allows batch 1 only."""
    B, T = ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError(f"Cannot handle batch sizes > 1 if no padding token is defined "
                             f"(config pad_token_id is None, batch {B})")
        return np.full(B, T - 1)
    return np.argmax(np.arange(T) * (ids != pad_token_id), axis=-1)


class SequenceSummary(Module):
    """transformers' SequenceSummary (multiple-choice head): pick one hidden state per sequence
    (cls_index: at mc_token_ids; last; first; or the mean), dropout, Linear `summary`, activation.
    h: (B, N, T, C), idx: (B, N) -> (B, N, K) with K = num_labels (1) or C."""

    def __init__(self, config):
        super().__init__()
        self.summary_type = config.summary_type
        C = config.n_embd
        self.summary = None
        if config.summary_use_proj:
            K = config.num_labels if config.summary_proj_to_labels and config.num_labels > 0 else C
            self.summary = Linear(C, K)
        self.activation = Activation(config.summary_activation) if config.summary_activation else None
        self.first_dropout = Dropout(config.summary_first_dropout)
        self.last_dropout = Dropout(config.extra.get("summary_last_dropout", 0.0) or 0.0)

    def forward(self, h, cls_index=None):
        T = h.shape[-2]
        if self.summary_type == "mean":
            s, self.cache = h.mean(axis=-2), h.shape  # (B, N, C)
        else:
            last = np.full(h.shape[:-2], T - 1)
            idx = {"cls_index": last if cls_index is None else cls_index, "last": last,
                   "first": np.zeros(h.shape[:-2], dtype=np.int64)}[self.summary_type]
            s, self.cache = gather_forward(h, idx)  # (B, N, C)
        s = self.first_dropout(s)
        if self.summary is not None:
            s = self.summary(s)
        if self.activation is not None:
            s = self.activation(s)
        return self.last_dropout(s)

    def backward(self, ds):  # (B, N, K) -> dh (B, N, T, C)
        ds = self.last_dropout.backward(ds)
        if self.activation is not None:
            ds = self.activation.backward(ds)
        if self.summary is not None:
            ds = self.summary.backward(ds)
        ds = self.first_dropout.backward(ds)
        if self.summary_type == "mean":  # s = mean_t h
            shape = self.cache
            return np.broadcast_to(ds[..., None, :] / shape[-2], shape).copy()
        return gather_backward(ds, self.cache)


def check_span_positions(start_positions, end_positions, B):
    if (start_positions is None) != (end_positions is None):
        raise ValueError("pass both start_positions and end_positions, or neither")
    if start_positions is None:
        return None
    pos = []
    for name, p in (("start_positions", start_positions), ("end_positions", end_positions)):
        p = as_ids(name, p)
        if p.shape not in ((B,), (B, 1)):
            raise ValueError(f"{name} must have shape {(B,)}, got {p.shape}")
        pos.append(p.reshape(B))
    return pos
