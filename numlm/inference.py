"""Encoder inference (BERT, RoBERTa, DistilBERT): fill-mask, sequence classification, token classification
(transformers' ner pipeline), extractive question answering (transformers 4's pipeline), sentence
embeddings (sentence-transformers' folders read as it reads them).

Each task has an array-level function (ids in, numbers out) and a text-level one that runs the tokenizer
(numlm.data.Tokenizer) first. Probabilities are the softmax of the model's logits in the model's dtype."""
import warnings

import numpy as np

from .models.pretrained import ModelOutput
from .nn import eval_mode, no_grad  # inference: dropout off, no caches for a backward
from .ops import softmax, sigmoid
from .ops._check import positive_int, zero_one


def _ids(name, a):
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.size == 0 or a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a non-empty (B, T) integer array, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.int64)


MLM_CLASSES = ("BertForMaskedLM", "BertForPreTraining", "RobertaForMaskedLM", "DistilBertForMaskedLM")
ENCODERS = ("BertModel", "RobertaModel", "DistilBertModel")


def _encoder_call(model, ids, attention_mask, token_type_ids, **kw):
    """model(ids, ...) in eval mode under no_grad (the model's modes kept). Token types go to models
    that have them; a model without (DistilBERT, GPT) takes all-zero ones as none and refuses others."""
    base = getattr(model, "base_model", model)  # a PeftModel runs its base model
    if token_type_ids is not None and not getattr(base.config, "type_vocab_size", None):
        if np.any(np.asarray(token_type_ids)):
            raise ValueError(f"token_type_ids: {type(base).__name__} has no token types")
        token_type_ids = None
    if token_type_ids is not None:
        kw["token_type_ids"] = token_type_ids
    with no_grad(), eval_mode(model):
        return model(ids, attention_mask=attention_mask, **kw)


def _virtual(model):
    """How many positions a prompt-tuned PeftModel puts before the text in its outputs (0 otherwise)."""
    return model.peft_config.num_virtual_tokens if getattr(model, "kind", None) == "PROMPT_TUNING" else 0


def _check_mlm(model):
    """Refuse a model that is not a masked-LM model, BertForPreTraining or a PeftModel on one."""
    base = getattr(model, "base_model", model)
    name = type(base).__name__
    if name not in MLM_CLASSES and not (hasattr(base, "cls") and hasattr(base.cls, "predictions")):  # not NSP's
        raise ValueError(f"model: {name} has no masked-LM head; fill-mask needs one of {', '.join(MLM_CLASSES)}")


def _mlm_logits(model, input_ids, attention_mask, token_type_ids):
    """Masked-LM logits (B, T, V) of a masked-LM model (logits) or BertForPreTraining (prediction_logits),
    or a PeftModel on one."""
    _check_mlm(model)
    out = _encoder_call(model, input_ids, attention_mask, token_type_ids)
    logits = out.prediction_logits if out.prediction_logits is not None else out.logits
    return np.asarray(logits)[:, _virtual(model):]


# ---- fill-mask ---------------------------------------------------------------------------------------
def fill_mask_ids(model, input_ids, mask_token_id, attention_mask=None, token_type_ids=None, top_k=5,
                  vocab_size=None):
    """The top_k tokens at every [MASK]: p = softmax(logits[b, t]) over the vocabulary.
    input_ids: (B, T) -> ModelOutput(positions (N, 2) of (b, t) per mask, token_ids (N, top_k),
    probs (N, top_k) best first). vocab_size: candidates only below it (a tokenizer smaller than the
    model's padded table); the probabilities stay those of the whole softmax."""
    ids = _ids("input_ids", input_ids)
    top_k = positive_int("top_k", top_k)
    if vocab_size is not None:
        vocab_size = positive_int("vocab_size", vocab_size)
    positions = np.argwhere(ids == mask_token_id)                      # (N, 2)
    if len(positions) == 0:
        raise ValueError(f"input_ids hold no mask token (id {mask_token_id})")
    logits = _mlm_logits(model, ids, attention_mask, token_type_ids)   # (B, T, V)
    p = softmax(logits[positions[:, 0], positions[:, 1]])             # (N, V)
    cand = p if vocab_size is None else p[:, :vocab_size]
    k = min(int(top_k), cand.shape[-1])
    top = np.argsort(-cand, axis=-1, kind="stable")[:, :k]            # (N, k)
    return ModelOutput(positions=positions, token_ids=top, probs=np.take_along_axis(p, top, axis=-1))


def fill_mask(model, tokenizer, text, top_k=5):
    """Text with one or more mask tokens ([MASK], RoBERTa's <mask>) -> per mask a list of {token_id, token,
    score, sequence}, best first (transformers' fill-mask pipeline; `sequence` is the text with that mask
    filled, and with several masks the others shown, special tokens kept, as the pipeline does)."""
    _check_tokenizer(tokenizer)
    if tokenizer.mask_id is None:
        raise ValueError("tokenizer has no mask token ([MASK] or <mask>)")
    _check_mlm(model)  # before text_ids reads its config
    ids = text_ids(model, tokenizer, text)
    if not (ids == tokenizer.mask_id).any():
        raise ValueError(f"text holds no mask token: {text!r}")
    out = fill_mask_ids(model, ids, tokenizer.mask_id, top_k=top_k, vocab_size=tokenizer.vocab_size)
    single = len(out.positions) == 1
    result = []
    for (_, t), toks, probs in zip(out.positions, out.token_ids, out.probs):
        row = []
        for tok, p in zip(toks, probs):
            filled = ids[0].copy()
            filled[t] = tok
            row.append({"token_id": int(tok), "token": tokenizer.id_to_token(int(tok)), "score": float(p),
                        "sequence": tokenizer.decode(filled, skip_special_tokens=single)})
        result.append(row)
    return result


# ---- sequence classification -------------------------------------------------------------------------
def predict(model, input_ids, attention_mask=None, token_type_ids=None):
    """Sequence classification, scored as transformers' text-classification pipeline: the raw value
    (problem_type regression), sigmoid(logits) (multi-label, or a single label), else softmax(logits);
    the label is the top score's. -> ModelOutput(logits, probs, labels (B,), label_names).
    model: any *ForSequenceClassification (BERT, RoBERTa, DistilBERT, GPT-2), or a PeftModel on one."""
    cfg = _classifier_config(model)
    ids = _ids("input_ids", input_ids)
    logits = np.asarray(_encoder_call(model, ids, attention_mask, token_type_ids).logits)
    kind = getattr(cfg, "problem_type", None)
    if kind == "regression":
        probs = logits.copy()
    elif kind == "multi_label_classification" or logits.shape[-1] == 1:
        probs = sigmoid(logits)
    else:
        probs = softmax(logits)
    labels = np.argmax(probs, axis=-1)
    names = _label_names(cfg, logits.shape[-1])
    return ModelOutput(logits=logits, probs=probs, labels=labels, label_names=[names[int(i)] for i in labels])


def _texts(name, texts):
    """a str or a list of str as a list"""
    if isinstance(texts, str):
        return [texts]
    try:
        texts = list(texts)  # a list, an array or a Series of str, a generator
    except TypeError:
        texts = None
    if texts is None or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a str or a sequence of str")
    return texts


def _task_config(model, head, task):
    """The config of a model of the task whose classes end in `head` (a PeftModel's base model's); any
    other model is refused, named with `task`."""
    base = getattr(model, "base_model", model)
    if not type(base).__name__.endswith(head):
        raise ValueError(f"model: {type(base).__name__} is not a {task} model")
    return base.config


def _classifier_config(model):
    return _task_config(model, "ForSequenceClassification", "sequence-classification")


def classify(model, tokenizer, texts, pairs=None, max_length=None):
    """texts (and optional pairs) -> per text {label, score, probs} (transformers' text-classification).
    Encoders run the texts as one padded batch; a GPT runs each text alone, as the pipeline does (its
    pooled token is the last real one, which padding and prompt tuning would move)."""
    single = isinstance(texts, str)
    texts, pairs = _texts("texts", texts), None if pairs is None else _texts("pairs", pairs)
    cfg = _classifier_config(model)
    _check_tokenizer(tokenizer)
    if not texts:
        return []
    if getattr(cfg, "model_type", None) in ("gpt2", "openai-gpt"):
        enc = tokenizer.encode_batch(texts, pairs, max_length=max_length, padding=False)
        empty = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) == 0]
        if empty:
            raise ValueError(f"texts[{empty[0]}] encodes to no tokens: a GPT classifier reads its last token")
        outs = [predict(model, [ids]) for ids in enc["input_ids"]]
        out = {k: np.concatenate([o[k] for o in outs]) for k in ("labels", "probs")}
        out["label_names"] = [n for o in outs for n in o.label_names]
    else:
        enc = tokenizer.encode_batch(texts, pairs, max_length=max_length)
        types = enc["token_type_ids"] if getattr(cfg, "type_vocab_size", None) else None  # DistilBERT: none
        out = predict(model, enc["input_ids"], enc["attention_mask"], types)
    res = [{"label": n, "score": float(p[i]), "probs": p}
           for n, i, p in zip(out["label_names"], out["labels"], out["probs"])]
    return res[0] if single else res


# ---- token classification ----------------------------------------------------------------------------
AGGREGATIONS = ("none", "simple", "first", "average", "max")  # transformers' AggregationStrategy


def _token_classifier_config(model):
    return _task_config(model, "ForTokenClassification", "token-classification")


def _label_names(cfg, n):
    """Label i's name: config id2label (int or str keys, as a config.json holds them), else LABEL_i."""
    id2label = getattr(cfg, "id2label", None) or (getattr(cfg, "extra", {}) or {}).get("id2label") or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


def predict_tokens(model, input_ids, attention_mask=None, token_type_ids=None):
    """Token classification: probs[b, t] = softmax(logits[b, t]) over the labels, for every token.
    input_ids: (B, T) -> ModelOutput(logits (B, T, L), probs (B, T, L), labels (B, T), label_names (B lists of
    T)). model: any *ForTokenClassification (BERT, RoBERTa, DistilBERT), or a PeftModel on one (prompt
    tuning's virtual positions dropped from the outputs)."""
    cfg = _token_classifier_config(model)
    ids = _ids("input_ids", input_ids)
    logits = np.asarray(_encoder_call(model, ids, attention_mask, token_type_ids).logits)[:, _virtual(model):]
    probs = softmax(logits)                                              # (B, T, L)
    labels = np.argmax(probs, axis=-1)                                   # (B, T)
    names = _label_names(cfg, logits.shape[-1])
    return ModelOutput(logits=logits, probs=probs, labels=labels,
                       label_names=[[names[i] for i in row] for row in labels])


def _text_positions(model, tokenizer):
    """How many tokens, specials included, a text may have: the tokenizer's model_max_length (the pipelines
    cut there), and at most the position table, less RoBERTa's first pad_token_id + 1 positions (its
    tokens count from there) and prompt or prefix tuning's virtual tokens."""
    P, v = _positions(model)
    return min(P - v, getattr(tokenizer, "model_max_length", None) or P - v)


def _positions(model):
    """(the tokens the model's position table holds, the virtual tokens a prompt or prefix takes of them)"""
    virtual = getattr(model, "kind", None) in ("PROMPT_TUNING", "PREFIX_TUNING")
    return (getattr(model, "base_model", model).config.max_tokens,
            model.peft_config.num_virtual_tokens if virtual else 0)


def text_ids(model, tokenizer, text):
    """One text's ids (1, T), special tokens included, refused when longer than the model's positions
    (less a prompt or prefix's virtual tokens): fill-mask, attention maps and gradient checks take a text
    whole, as transformers' fill-mask pipeline does, and do not cut it."""
    ids = np.array([tokenizer.encode(text)], dtype=np.int64)
    P, v = _positions(model)
    if ids.shape[1] > P - v:
        room = f"the {P - v} positions the model's {P} leave beside its {v} virtual tokens" if v else \
            f"the model's {P} positions"
        raise ValueError(f"the text has {ids.shape[1]} tokens, more than {room}: shorten it")
    return ids


def _check_tokenizer(tokenizer):
    if not hasattr(tokenizer, "backend"):
        raise ValueError(f"tokenizer must be a numlm.data.Tokenizer, got {type(tokenizer).__name__}")


def _encodings(tokenizer, texts, max_length):
    """The tokenizers Encodings (ids, character offsets, special-tokens mask) of texts, each cut to
    max_length tokens with its specials, as transformers' truncation=True cuts them."""
    backend = tokenizer.backend
    if max_length <= backend.num_special_tokens_to_add(False):
        raise ValueError(f"the model takes {max_length} tokens per text: no room beside the special tokens")
    with tokenizer.truncating(max_length) as tk:
        return tk.encode_batch(texts)


def _pre_entities(tokenizer, text, enc, probs, subword_prefix):
    """Per token but the specials: its token string, probs, start, end, index, and whether it continues the
    word before it. With a subword prefix ("##") a token continues a word when its string is longer than
    its text; without one, when no space touches its start. An unknown token takes its text."""
    tokens = []
    for t, (i, (start, end), special) in enumerate(zip(enc.ids, enc.offsets, enc.special_tokens_mask)):
        if special:
            continue
        word, ref = tokenizer.id_to_token(i), text[start:end]
        subword = len(word) != len(ref) if subword_prefix else start > 0 and " " not in text[start - 1:start + 1]
        if i == tokenizer.unk_id:
            word, subword = ref, False
        tokens.append(dict(word=word, probs=probs[t], start=start, end=end, index=t, subword=subword))
    return tokens


def _word_entity(tokens, strategy, names, decode):
    """One word's tokens as one entity: the label of the first token's probs ("first"), of the token with
    the largest probability ("max"), or of the mean probs over the tokens ("average")."""
    if strategy == "first":
        p = tokens[0]["probs"]
    elif strategy == "max":
        p = max(tokens, key=lambda tok: tok["probs"].max())["probs"]
    else:
        p = np.mean([tok["probs"] for tok in tokens], axis=0)
    k = int(np.argmax(p))
    return dict(entity=names[k], score=p[k], word=decode([tok["word"] for tok in tokens]),
                start=tokens[0]["start"], end=tokens[-1]["end"])


def _words(tokens):
    """Tokens in runs of one word: a run starts at the first token and at every token not a subword."""
    runs = []
    for tok in tokens:
        if runs and tok["subword"]:
            runs[-1].append(tok)
        else:
            runs.append([tok])
    return runs


def _bio(label):
    """("B" or "I", tag) of a label; one without a B-/I- prefix continues ("I")."""
    return (label[0], label[2:]) if label[:2] in ("B-", "I-") else ("I", label)


def _group(entities, decode):
    """Adjacent entities of one tag joined, a B- label starting a new group: entity_group is the first
    entity's label from its first "-" on, score the mean of the scores, word the decoded words."""
    runs = []
    for e in entities:
        bi, kind = _bio(e["entity"])
        if runs and kind == _bio(runs[-1][-1]["entity"])[1] and bi != "B":
            runs[-1].append(e)
        else:
            runs.append([e])
    return [dict(entity_group=run[0]["entity"].split("-", 1)[-1], score=np.mean([e["score"] for e in run]),
                 word=decode([e["word"] for e in run]), start=run[0]["start"], end=run[-1]["end"]) for run in runs]


def _entities(tokens, strategy, names, decode):
    """transformers' aggregate: per token its most probable label ("none", "simple") or per word
    ("first", "average", "max"); all but "none" then grouped."""
    if strategy in ("none", "simple"):
        ents = []
        for tok in tokens:
            k = int(np.argmax(tok["probs"]))
            ents.append(dict(entity=names[k], score=tok["probs"][k], index=tok["index"], word=tok["word"],
                             start=tok["start"], end=tok["end"]))
    else:
        ents = [_word_entity(run, strategy, names, decode) for run in _words(tokens)]
    return ents if strategy == "none" else _group(ents, decode)


def _tag_options(tokenizer, aggregation_strategy, ignore_labels):
    """The strategy in lower case (the pipeline takes any case) and the labels to leave out (None: O)."""
    _check_tokenizer(tokenizer)
    if not isinstance(aggregation_strategy, str) or aggregation_strategy.lower() not in AGGREGATIONS:
        raise ValueError(f"aggregation_strategy must be one of {AGGREGATIONS}, got {aggregation_strategy!r}")
    ignore = ("O",) if ignore_labels is None else ignore_labels
    if not isinstance(ignore, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in ignore):
        raise ValueError(f"ignore_labels must be a list of label names, got {ignore_labels!r}")
    return aggregation_strategy.lower(), set(ignore)


def tag(model, tokenizer, texts, aggregation_strategy="none", ignore_labels=("O",)):
    """texts -> per text its entities, as transformers' token-classification ("ner") pipeline gives them:
    "none": per token {entity, score, index, word, start, end}; "simple", "first", "average", "max": per
    group of tokens {entity_group, score, word, start, end} (see _entities). Entities whose label is in
    ignore_labels are left out. A text longer than the model's positions is cut to them, as the pipeline
    cuts it to the tokenizer's model_max_length. start and end index the text's characters."""
    single = isinstance(texts, str)
    texts = _texts("texts", texts)
    strategy, ignore = _tag_options(tokenizer, aggregation_strategy, ignore_labels)
    cfg = _token_classifier_config(model)
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"texts[{i}] is empty (no text other than white space)")
    if not texts:
        return []
    subword_prefix = getattr(tokenizer.backend.model, "continuing_subword_prefix", None)
    if not subword_prefix and strategy in ("first", "average", "max"):
        warnings.warn("the tokenizer marks no subwords (no continuing_subword_prefix): a word is guessed as the "
                      "tokens no space separates, as transformers' pipeline guesses", UserWarning, stacklevel=2)
    encs = _encodings(tokenizer, texts, _text_positions(model, tokenizer))
    ids = np.full((len(encs), max(len(e.ids) for e in encs)), tokenizer.pad_id or 0, dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, e in enumerate(encs):
        ids[b, :len(e.ids)], mask[b, :len(e.ids)] = e.ids, 1
    out = predict_tokens(model, ids, mask)
    names = _label_names(cfg, out.probs.shape[-1])
    dec = tokenizer.backend.decoder
    decode = dec.decode if dec is not None else " ".join
    res = []
    for text, enc, probs in zip(texts, encs, out.probs):
        tokens = _pre_entities(tokenizer, text, enc, probs, subword_prefix)
        res.append([{k: float(v) if k == "score" else v for k, v in e.items()}
                    for e in _entities(tokens, strategy, names, decode)
                    if e.get("entity", e.get("entity_group")) not in ignore])
    return res[0] if single else res


# ---- sentence embeddings -----------------------------------------------------------------------------
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")  # sentence-transformers' order when several are on


def pool(hidden, attention_mask=None, pooling="mean", normalize=False):
    """sentence-transformers' Pooling, over the real tokens (m_t = 1):
        cls: e = h[:, 0];   max: e = max_t h_t (padding at -1e9);   mean: e = sum_t m_t h_t / max(sum_t m_t, 1e-9);
        mean_sqrt_len: e = sum_t m_t h_t / sqrt(max(sum_t m_t, 1e-9));   several modes: concatenated in that order;
        normalize: e / max(||e||_2, 1e-12).    hidden: (B, T, C)  attention_mask: (B, T) -> (B, C * modes)"""
    hidden = np.asarray(hidden)
    if hidden.ndim != 3 or hidden.shape[1] == 0:
        raise ValueError(f"hidden must have shape (B, T, C) with T >= 1, got {hidden.shape}")
    if isinstance(normalize, (str, bytes)) or normalize not in (True, False):
        raise ValueError(f"normalize must be True or False, got {normalize!r}")
    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    if not modes or any(p not in POOLING_MODES for p in modes):
        raise ValueError(f"pooling must be one of {POOLING_MODES} or a tuple of them, got {pooling!r}")
    m = np.ones(hidden.shape[:2]) if attention_mask is None else np.asarray(attention_mask)
    if m.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask must have shape {hidden.shape[:2]}, got {m.shape}")
    m = zero_one("attention_mask", m, "0 and 1 (1 = a real token)").astype(hidden.dtype)[:, :, None]  # (B, T, 1)
    n = np.maximum(m.sum(axis=1), 1e-9)                                  # (B, 1)
    parts = {"cls": lambda: hidden[:, 0],
             "max": lambda: np.where(m > 0, hidden, -1e9).max(axis=1),
             "mean": lambda: (hidden * m).sum(axis=1) / n,
             "mean_sqrt_len": lambda: (hidden * m).sum(axis=1) / np.sqrt(n)}
    e = np.concatenate([parts[p]() for p in POOLING_MODES if p in modes], axis=-1)  # (B, C * modes)
    if normalize:
        e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e


def sentence_transformer(folder, dtype="float32"):
    """A sentence-transformers model folder as sentence-transformers reads it: modules.json lists
    Transformer (the encoder's folder), Pooling (its config.json: the modes) and Normalize; max_seq_length
    from sentence_bert_config.json. Any other module (Dense, ...) is refused, naming it.
    -> ModelOutput(model, tokenizer, pooling (modes), normalize, max_length)"""
    from pathlib import Path
    from .data import Tokenizer
    from .io import read_json
    from .models import from_pretrained
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model: {str(folder)!r} is neither a numlm model nor a sentence-transformers folder")
    modules = read_json(folder / "modules.json", kind=list)
    encoder, pooling, normalize = None, None, False
    for mod in modules:
        kind, sub = str(mod.get("type", "")).rsplit(".", 1)[-1], folder / mod.get("path", "")
        if kind == "Transformer":
            encoder = sub
        elif kind == "Pooling":
            cfg = read_json(sub / "config.json")
            pooling = tuple(p for p in POOLING_MODES if cfg.get(f"pooling_mode_{p}_tokens" if p != "cls"
                                                                else "pooling_mode_cls_token"))
            other = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and
                     k not in ("pooling_mode_cls_token",) + tuple(f"pooling_mode_{p}_tokens" for p in POOLING_MODES)]
            if other or not pooling:
                raise ValueError(f"{str(sub / 'config.json')!r}: pooling {other or 'none'} is not supported; "
                                 f"numlm pools by {POOLING_MODES}")
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(f"{str(folder / 'modules.json')!r}: module {mod.get('type')!r} is not supported "
                             "(numlm runs Transformer, Pooling and Normalize)")
    if encoder is None or pooling is None:
        raise ValueError(f"{str(folder / 'modules.json')!r} must list a Transformer and a Pooling module")
    st = folder / "sentence_bert_config.json"
    max_length = read_json(st).get("max_seq_length") if st.is_file() else None
    return ModelOutput(model=from_pretrained(encoder, dtype=dtype), tokenizer=Tokenizer.from_dir(encoder),
                       pooling=pooling, normalize=normalize, max_length=max_length)


def _encoder(model):
    """The encoder of a model: itself (BertModel, RobertaModel, DistilBertModel) or a task model's backbone;
    a PeftModel's base model's, whose LoRA, IA3 or bottleneck layers sit in it (prompt and prefix tuning
    run through the PeftModel itself, so they are refused)."""
    if hasattr(model, "peft_config"):
        if model.kind in ("PROMPT_TUNING", "PREFIX_TUNING"):
            raise ValueError(f"model: sentence embeddings of a {model.kind.lower().replace('_', ' ')} PeftModel are "
                             "not supported (its virtual tokens are not the text's); use LoRA, IA3 or an adapter")
        model = model.base_model
    if type(model).__name__ in ENCODERS:
        return model
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "-", None)
    if type(backbone).__name__ not in ENCODERS:
        raise ValueError(f"model: {type(model).__name__} has no BERT, RoBERTa or DistilBERT encoder to embed with")
    return backbone


def sentence_embeddings(model, input_ids, attention_mask=None, token_type_ids=None, pooling=None,
                        normalize=None):
    """Pooled last hidden states (pool) of an encoder (BertModel, RobertaModel, DistilBertModel or a task
    model's backbone), or of a sentence-transformers folder: its modules.json and 1_Pooling/config.json
    choose pooling and normalize where they are None (a model: mean, not normalised). -> (B, C)"""
    if not hasattr(model, "forward"):
        st = sentence_transformer(model)
        model = st.model
        pooling = st.pooling if pooling is None else pooling
        normalize = st.normalize if normalize is None else normalize
    ids = _ids("input_ids", input_ids)
    h = _encoder_call(_encoder(model), ids, attention_mask, token_type_ids).last_hidden_state
    return pool(h, attention_mask, "mean" if pooling is None else pooling, False if normalize is None else normalize)


def embed(model, tokenizer=None, texts=(), pooling=None, normalize=None, max_length=None):
    """texts -> (B, C) sentence embeddings. model: a sentence-transformers folder (its tokenizer, pooling,
    normalisation and max_seq_length, as SentenceTransformer(folder).encode) or a numlm encoder with its
    tokenizer (masked mean, L2-normalised unless told otherwise). A text is cut at max_length, else at the
    model's positions and the tokenizer's model_max_length, as sentence-transformers cuts it."""
    if not hasattr(model, "forward"):
        st = sentence_transformer(model)
        model, tokenizer = st.model, tokenizer or st.tokenizer
        pooling = st.pooling if pooling is None else pooling
        normalize = st.normalize if normalize is None else normalize
        max_length = st.max_length if max_length is None else max_length
    if tokenizer is None:
        raise ValueError("embed needs the model's tokenizer (or a sentence-transformers folder as model)")
    _check_tokenizer(tokenizer)
    if max_length is None:  # sentence-transformers' max_seq_length when none is set
        max_length = _text_positions(_encoder(model), tokenizer)
    enc = tokenizer.encode_batch(_texts("texts", texts), max_length=max_length)
    return sentence_embeddings(model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                               "mean" if pooling is None else pooling, True if normalize is None else normalize)


# ---- question answering ------------------------------------------------------------------------------
def best_spans(start_logits, end_logits, context_mask, top_k=1, max_answer_len=15):
    """The answer spans of one row, as transformers' question-answering pipeline scores them. The
    candidates c are the context tokens (context_mask) and position 0, the [CLS] token:
        p_start = softmax(start_logits over c),   p_end = softmax(end_logits over c)
        null = p_start[0] p_end[0]                       (the no-answer score), then p_start[0] = p_end[0] = 0
        score(s, e) = p_start[s] p_end[e]   for s <= e <= s + max_answer_len - 1, else 0
    The top_k (s, e) by score, best first, of which those with s and e both in c are kept: fewer than top_k
    when spans of score 0 (touching the question) were among them, as in the pipeline.
    start_logits, end_logits, context_mask: (T,) -> starts, ends, scores (n,), null (a 0-d array)"""
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    c = zero_one("context_mask", context_mask, "0 and 1 (or True and False)")  # a copy: position 0 joins it
    if not start_logits.ndim == 1 or not start_logits.shape == end_logits.shape == c.shape or c.size == 0:
        raise ValueError(f"start_logits, end_logits and context_mask must be one row each, of one length (T,), "
                         f"got {start_logits.shape}, {end_logits.shape} and {c.shape}")
    top_k, max_answer_len = positive_int("top_k", top_k), positive_int("max_answer_len", max_answer_len)
    c[0] = True
    p_start = softmax(np.where(c, start_logits, -np.inf))
    p_end = softmax(np.where(c, end_logits, -np.inf))
    null = p_start[0] * p_end[0]
    p_start[0] = p_end[0] = 0
    score = np.tril(np.triu(np.outer(p_start, p_end)), max_answer_len - 1)   # (T, T)
    flat = score.ravel()
    if top_k == 1:
        best = np.array([np.argmax(flat)])
    elif flat.size <= top_k:
        best = np.argsort(-flat)
    else:  # the pipeline's calls, so that spans of equal score (zeros) come in its order
        part = np.argpartition(-flat, top_k)[:top_k]
        best = part[np.argsort(-flat[part])]
    starts, ends = np.unravel_index(best, score.shape)
    keep = c[starts] & c[ends]
    return starts[keep], ends[keep], score[starts[keep], ends[keep]], null


def _qa_config(model):
    return _task_config(model, "ForQuestionAnswering", "question-answering")


def answer_spans(model, input_ids, context_mask, attention_mask=None, token_type_ids=None, top_k=1,
                 max_answer_len=15):
    """Extractive QA on rows [CLS] question [SEP] context [SEP] (right-padded): the model's start and end
    logits, then best_spans on each row's real tokens. context_mask (B, T): 1 on the tokens an answer may
    cover. model: any *ForQuestionAnswering (BERT, RoBERTa, DistilBERT), or a PeftModel on one.
    -> ModelOutput(starts, ends, scores: per row an array, best first; null_scores (B,))"""
    _qa_config(model)
    ids = _ids("input_ids", input_ids)
    top_k, max_answer_len = positive_int("top_k", top_k), positive_int("max_answer_len", max_answer_len)
    ctx = zero_one("context_mask", context_mask, "0 and 1 (or True and False)")
    real = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if ctx.shape != ids.shape or real.shape != ids.shape:
        raise ValueError(f"context_mask and attention_mask must have input_ids' shape {ids.shape}, "
                         f"got {ctx.shape} and {real.shape}")
    if not real[:, 0].all():
        raise ValueError("every row must start with a real token, its [CLS] (pad on the right)")
    out = _encoder_call(model, ids, attention_mask, token_type_ids)
    v = _virtual(model)
    start, end = np.asarray(out.start_logits)[:, v:], np.asarray(out.end_logits)[:, v:]   # (B, T) each
    rows = []
    for b in range(len(ids)):
        n = int(np.flatnonzero(real[b])[-1]) + 1  # a row's own length, as the pipeline runs it alone
        rows.append(best_spans(start[b, :n], end[b, :n], ctx[b, :n] & real[b, :n], top_k,
                               max_answer_len))
    starts, ends, scores, null = zip(*rows)
    return ModelOutput(starts=list(starts), ends=list(ends), scores=list(scores), null_scores=np.array(null))


def qa_windows(tokenizer, question, context, max_seq_len=384, doc_stride=128):
    """The pipeline's inputs: [CLS] question [SEP] part [SEP] windows of at most max_seq_len tokens, the
    context cut into parts of the room the question leaves, each part overlapping the one before by
    doc_stride tokens (a context that fits is one window; a doc_stride not below the room is refused where
    the tokenizers library would panic). -> list of tokenizers.Encoding"""
    _check_tokenizer(tokenizer)
    max_seq_len = positive_int("max_seq_len", max_seq_len)
    if not isinstance(doc_stride, (int, np.integer)) or isinstance(doc_stride, bool) or doc_stride < 0:
        raise ValueError(f"doc_stride must be an integer >= 0, got {doc_stride!r}")
    tk = tokenizer.backend
    n_question = len(tk.encode(question, add_special_tokens=False).ids)
    room = max_seq_len - n_question - tk.num_special_tokens_to_add(True)
    if room < 1:
        raise ValueError(f"the question's {n_question} tokens leave its context no room in max_seq_len="
                         f"{max_seq_len}; raise max_seq_len")
    if len(tk.encode(context, add_special_tokens=False).ids) <= room:
        return [tk.encode(question, context)]
    if doc_stride >= room:
        raise ValueError(f"doc_stride={doc_stride} must be below the {room} context tokens a window holds "
                         f"(max_seq_len={max_seq_len} less the question and special tokens)")
    with tokenizer.truncating(max_seq_len, stride=doc_stride, strategy="only_second") as cut:
        first = cut.encode(question, context)
    return [first] + first.overflowing


def _char_span(window, s, e):
    """Context characters of tokens s..e, widened to whole words (the pipeline's align_to_words); by the
    tokens' own offsets when one is in no word (the [CLS] token)."""
    first, last = window.token_to_word(s), window.token_to_word(e)
    if first is None or last is None:
        return window.offsets[s][0], window.offsets[e][1]
    return window.word_to_chars(first, sequence_index=1)[0], window.word_to_chars(last, sequence_index=1)[1]


def _answer_one(model, tokenizer, question, context, top_k, max_answer_len, max_seq_len, doc_stride,
                handle_impossible_answer):
    windows = qa_windows(tokenizer, question, context, max_seq_len, doc_stride)
    T = max(len(w.ids) for w in windows)
    ids = np.full((len(windows), T), tokenizer.pad_id or 0, np.int64)             # (W, T)
    mask, types, ctx = (np.zeros((len(windows), T), np.int64) for _ in range(3))
    for i, w in enumerate(windows):
        n = len(w.ids)
        ids[i, :n], mask[i, :n], types[i, :n] = w.ids, 1, w.type_ids
        ctx[i, :n] = [q == 1 for q in w.sequence_ids]
    if tokenizer.cls_id is not None:
        ctx |= ids == tokenizer.cls_id  # the pipeline keeps every [CLS] a candidate
    has_types = getattr(_qa_config(model), "type_vocab_size", None)
    # 2 top_k + 10 per window, the pipeline's margin for spans that name the same words
    out = answer_spans(model, ids, ctx, mask, types if has_types else None, 2 * top_k + 10, max_answer_len)
    answers = []
    for w, starts, ends, scores in zip(windows, out.starts, out.ends, out.scores):
        for s, e, p in zip(starts, ends, scores):
            a, z = _char_span(w, int(s), int(e))
            same = next((x for x in answers if x["answer"].lower() == context[a:z].lower()), None)
            if same is not None:  # one answer text, from several spans or windows: scores add
                same["score"] += float(p)
            else:
                answers.append({"score": float(p), "start": a, "end": z, "answer": context[a:z]})
    if handle_impossible_answer:  # the smallest of the windows' no-answer scores
        answers.append({"score": min(1e6, float(out.null_scores.min())), "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
    return answers if top_k > 1 else answers[0]


def answer(model, tokenizer, question, context, top_k=1, max_answer_len=15, max_seq_len=None, doc_stride=None,
           handle_impossible_answer=False):
    """Extractive question answering, transformers 4's question-answering pipeline: the context read in
    windows (qa_windows), spans scored in each (best_spans), mapped to whole words of the context; equal
    answer texts (any case) add their scores across spans and windows; with handle_impossible_answer the
    empty answer competes with the smallest no-answer score of the windows.
    -> {score, start, end, answer} (start/end: characters of the context), a list of top_k of them best first
    when top_k > 1 (the pipeline gives a lone answer as a dict even then); a list of those for a list of
    questions (one context for all, or one each). max_seq_len: the pipeline's default, min(384, the tokenizer's
    model_max_length), when None, and at most the model's positions; doc_stride: the pipeline's default,
    min(max_seq_len // 2, 128), when None. The pipeline's max_question_len applies to slow tokenizers only."""
    _qa_config(model)
    _check_tokenizer(tokenizer)
    single = isinstance(question, str)
    questions = _texts("question", question)
    contexts = [context] * len(questions) if isinstance(context, str) else _texts("context", context)
    if len(contexts) != len(questions):
        raise ValueError(f"{len(questions)} questions and {len(contexts)} contexts: give one context, or one each")
    for name, t in [("question", q) for q in questions] + [("context", c) for c in contexts]:
        if not t.strip():
            raise ValueError(f"{name} is empty (or only white space)")
    top_k, max_answer_len = positive_int("top_k", top_k), positive_int("max_answer_len", max_answer_len)
    if not isinstance(handle_impossible_answer, (bool, np.bool_)):
        raise ValueError(f"handle_impossible_answer must be True or False, got {handle_impossible_answer!r}")
    room = _text_positions(model, tokenizer)
    max_seq_len = positive_int("max_seq_len", min(384, room) if max_seq_len is None else max_seq_len)
    if max_seq_len > room:
        raise ValueError(f"max_seq_len={max_seq_len}: a window holds at most {room} tokens here (the model's "
                         f"positions and the tokenizer's model_max_length)")
    doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
    res = [_answer_one(model, tokenizer, q, c, top_k, max_answer_len, max_seq_len, doc_stride,
                       handle_impossible_answer) for q, c in zip(questions, contexts)]
    return res[0] if single else res
