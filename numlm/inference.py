"""BERT inference: fill-mask, sequence-classification prediction, sentence embeddings.

Each task has an array-level function (ids in, numbers out) and a text-level one that runs the tokenizer
(numlm.data.Tokenizer) first. Probabilities are the softmax of the model's logits in the model's dtype."""
import numpy as np

from .models.pretrained import ModelOutput
from .nn import no_grad  # inference keeps no caches for a backward
from .ops import softmax, sigmoid


def _ids(name, a):
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.size == 0 or a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a non-empty (B, T) integer array, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.int64)


def _mlm_logits(model, input_ids, attention_mask, token_type_ids):
    """Masked-LM logits (B, T, V) of BertForMaskedLM (logits) or BertForPreTraining (prediction_logits)."""
    name = type(model).__name__
    if name not in ("BertForMaskedLM", "BertForPreTraining") and not hasattr(model, "cls"):
        raise ValueError(f"model: {name} has no masked-LM head; fill-mask needs BertForMaskedLM or "
                         "BertForPreTraining")
    with no_grad():
        out = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    logits = out.prediction_logits if out.prediction_logits is not None else out.logits
    return np.asarray(logits)


# ---- fill-mask ---------------------------------------------------------------------------------------
def fill_mask_ids(model, input_ids, mask_token_id, attention_mask=None, token_type_ids=None, top_k=5):
    """The top_k tokens at every [MASK]: p = softmax(logits[b, t]) over the vocabulary.
    input_ids: (B, T) -> ModelOutput(positions (N, 2) of (b, t) per mask, token_ids (N, top_k),
    probs (N, top_k) best first)."""
    ids = _ids("input_ids", input_ids)
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    positions = np.argwhere(ids == mask_token_id)                      # (N, 2)
    if len(positions) == 0:
        raise ValueError(f"input_ids hold no mask token (id {mask_token_id})")
    logits = _mlm_logits(model, ids, attention_mask, token_type_ids)   # (B, T, V)
    p = softmax(logits[positions[:, 0], positions[:, 1]])             # (N, V)
    k = min(int(top_k), p.shape[-1])
    top = np.argsort(-p, axis=-1, kind="stable")[:, :k]               # (N, k)
    return ModelOutput(positions=positions, token_ids=top, probs=np.take_along_axis(p, top, axis=-1))


def fill_mask(model, tokenizer, text, top_k=5):
    """Text with one or more [MASK] -> per mask a list of {token_id, token, score, sequence}, best first
    (transformers' fill-mask pipeline; `sequence` is the text with that mask filled)."""
    if tokenizer.mask_id is None:
        raise ValueError("tokenizer has no [MASK] token")
    ids = np.array([tokenizer.encode(text)], dtype=np.int64)
    if not (ids == tokenizer.mask_id).any():
        raise ValueError(f"text holds no mask token: {text!r}")
    out = fill_mask_ids(model, ids, tokenizer.mask_id, top_k=top_k)
    result = []
    for (_, t), toks, probs in zip(out.positions, out.token_ids, out.probs):
        row = []
        for tok, p in zip(toks, probs):
            filled = ids[0].copy()
            filled[t] = tok
            row.append({"token_id": int(tok), "token": tokenizer.id_to_token(int(tok)), "score": float(p),
                        "sequence": tokenizer.decode(filled)})
        result.append(row)
    return result


# ---- sequence classification -------------------------------------------------------------------------
def predict(model, input_ids, attention_mask=None, token_type_ids=None):
    """Sequence classification: probs = softmax(logits) (single-label), sigmoid(logits) (multi-label), or
    the raw value (regression, num_labels == 1). -> ModelOutput(logits, probs, labels (B,), label_names)."""
    if not hasattr(model, "classifier") or "SequenceClassification" not in type(model).__name__:
        raise ValueError(f"model: {type(model).__name__} is not a sequence-classification model")
    ids = _ids("input_ids", input_ids)
    with no_grad():
        logits = np.asarray(model(ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits)
    cfg = model.config
    kind = getattr(cfg, "problem_type", None)
    if logits.shape[-1] == 1 and kind in (None, "regression"):
        probs = logits.copy()
        labels = np.zeros(len(logits), dtype=np.int64)
    elif kind == "multi_label_classification":
        probs = sigmoid(logits)
        labels = np.argmax(probs, axis=-1)
    else:
        probs = softmax(logits)
        labels = np.argmax(probs, axis=-1)
    id2label = getattr(cfg, "id2label", None) or (getattr(cfg, "extra", {}) or {}).get("id2label") or {}
    names = [str(id2label.get(int(i), id2label.get(str(int(i)), f"LABEL_{int(i)}"))) for i in labels]
    return ModelOutput(logits=logits, probs=probs, labels=labels, label_names=names)


def classify(model, tokenizer, texts, pairs=None, max_length=None):
    """texts (and optional pairs) -> per text {label, score, probs} (transformers' text-classification)."""
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if pairs is not None:
        pairs = [pairs] if isinstance(pairs, str) else list(pairs)
    enc = tokenizer.encode_batch(texts, pairs, max_length=max_length)
    out = predict(model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    res = [{"label": n, "score": float(p[i]), "probs": p} for n, i, p in zip(out.label_names, out.labels, out.probs)]
    return res[0] if single else res


# ---- sentence embeddings -----------------------------------------------------------------------------
def pool(hidden, attention_mask=None, pooling="mean", normalize=False):
    """[CLS]: e = h[:, 0];  mean: e = sum_t m_t h_t / max(sum_t m_t, 1e-9) (sentence-transformers);
    normalize: e / max(||e||_2, 1e-12).    hidden: (B, T, C)  attention_mask: (B, T) -> (B, C)"""
    hidden = np.asarray(hidden)
    if hidden.ndim != 3:
        raise ValueError(f"hidden must have shape (B, T, C), got {hidden.shape}")
    if pooling == "cls":
        e = hidden[:, 0]
    elif pooling == "mean":
        m = np.ones(hidden.shape[:2]) if attention_mask is None else np.asarray(attention_mask)
        if m.shape != hidden.shape[:2]:
            raise ValueError(f"attention_mask must have shape {hidden.shape[:2]}, got {m.shape}")
        if m.dtype != np.bool_ and not np.isin(m, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1 (1 = a real token)")
        m = m.astype(hidden.dtype)[:, :, None]                          # (B, T, 1)
        e = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)  # (B, C)
    else:
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    if normalize:
        e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e


def sentence_embeddings(model, input_ids, attention_mask=None, token_type_ids=None, pooling="mean",
                        normalize=False):
    """Pooled last hidden states of a BERT backbone (BertModel or a task model's `.bert`). -> (B, C)"""
    backbone = model if type(model).__name__ == "BertModel" else getattr(model, "bert", None)
    if backbone is None:
        raise ValueError(f"model: {type(model).__name__} has no BERT encoder to embed with")
    ids = _ids("input_ids", input_ids)
    with no_grad():
        h = backbone(ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
    return pool(h, attention_mask, pooling, normalize)


def embed(model, tokenizer, texts, pooling="mean", normalize=True, max_length=None):
    """texts -> (B, C) sentence embeddings (sentence-transformers: masked mean, L2-normalised)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    enc = tokenizer.encode_batch(texts, max_length=max_length)
    return sentence_embeddings(model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                               pooling, normalize)
