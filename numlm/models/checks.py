"""Input checks of the transformers-facing classes: every bad argument becomes a ValueError naming it,
so the math cores (gpt_core, bert_core) and the heads run on arrays that are already right."""
import numpy as np

from ..ops._check import int_array, ids_in_range
from ..ops import IGNORE_INDEX


def as_ids(name, x):
    """Token ids, labels or positions as int64; anything not integer is refused naming `name`."""
    return int_array(name, x).astype(np.int64, copy=False)


def labels_like(name, labels, shape, n, allow=IGNORE_INDEX):
    """Integer labels of `shape` in [0, n) (or the ignore index)."""
    labels = as_ids(name, labels)
    if labels.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {labels.shape}")
    return ids_in_range(name, labels, n, allow=allow)


def check_grad(name, grad, ref):
    """A gradient handed to backward(grad): the shape and a floating dtype of the output `ref`."""
    grad = np.asarray(grad)
    if grad.shape != ref.shape:
        raise ValueError(f"gradient of {name} must have shape {ref.shape}, got {grad.shape}")
    if grad.dtype.kind != "f":
        raise ValueError(f"gradient of {name} must be floating point, got dtype {grad.dtype}")
    return grad.astype(ref.dtype, copy=False)


def no_loss(what):
    raise ValueError(f"backward() without a gradient needs a loss: call the model with {what}")


def padding_mask(attention_mask, want, shape_note=""):
    """A 0/1 (B, T_k) mask as bool, or None when nothing is masked (the plain causal / full mask)."""
    if attention_mask is None:
        return None
    m = np.asarray(attention_mask)
    if m.shape != want:
        raise ValueError(f"attention_mask must have shape {want}{shape_note}, got {m.shape}")
    if m.dtype != np.bool_ and not np.isin(m, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    m = m.astype(bool)
    return None if m.all() else m


def inputs_embeds_like(inputs_embeds, dtype, C):
    e = np.asarray(inputs_embeds)
    if e.ndim < 3 or e.shape[-1] != C or e.shape[-2] == 0 or e.size == 0:
        raise ValueError(f"inputs_embeds must have shape (B, T, {C}) with T >= 1, got {e.shape}")
    if e.dtype.kind != "f":
        raise ValueError(f"inputs_embeds must be floating point, got dtype {e.dtype}")
    return e.astype(dtype, copy=False)


def token_inputs(input_ids, inputs_embeds, dtype, C, min_ndim=2, max_ndim=3):
    """(shape of the ids, ids or None, inputs_embeds or None): exactly one of the two is given."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is not None:
        e = inputs_embeds_like(inputs_embeds, dtype, C)
        return e.shape[:-1], None, e
    ids = as_ids("input_ids", input_ids)
    if not min_ndim <= ids.ndim <= max_ndim or ids.shape[-1] == 0 or ids.size == 0:
        want = "(B, T)" if max_ndim == 2 else "(B, T) or (B, N, T)"
        raise ValueError(f"input_ids must have shape {want} with T >= 1, got {ids.shape}")
    return ids.shape, ids, None


def position_ids_like(position_ids, B, T, start, limit, shape_note):
    """(B, T) positions: given ((B, T), (1, T) or (T,)), or start .. start + T - 1 for every row."""
    if position_ids is None:
        position_ids = np.arange(start, start + T, dtype=np.int64)[None]  # padding does not shift them
    position_ids = as_ids("position_ids", position_ids)
    if position_ids.shape[-1:] != (T,) or position_ids.size not in (T, B * T):
        raise ValueError(f"position_ids must have shape {shape_note}, {(1, T)} or {(T,)}, got {position_ids.shape}")
    position_ids = np.broadcast_to(position_ids.reshape(-1, T), (B, T))
    return ids_in_range("position_ids", position_ids, limit)


def past_like(past, L, B, H, D, dtype):
    """past_key_values: L (key, value) pairs (B, H, T_past, D) of the model's dtype -> T_past."""
    if not isinstance(past, (tuple, list)) or len(past) != L:
        raise ValueError(f"past_key_values must be a tuple of {L} (key, value) pairs, got "
                         f"{type(past).__name__} of length {len(past) if hasattr(past, '__len__') else '?'}")
    Tp = None
    for i, kv in enumerate(past):
        if not isinstance(kv, (tuple, list)) or len(kv) != 2:
            raise ValueError(f"past_key_values[{i}] must be a (key, value) pair")
        for name, a in zip(("key", "value"), kv):
            if not isinstance(a, np.ndarray) or a.ndim != 4 or a.shape[:2] != (B, H) or a.shape[3] != D:
                raise ValueError(f"past_key_values[{i}] {name} must have shape (B, H, T_past, D) = "
                                 f"({B}, {H}, T_past, {D}), got {getattr(a, 'shape', type(a).__name__)}")
            if a.dtype != dtype:
                raise ValueError(f"past_key_values[{i}] {name} has dtype {a.dtype}, the model {dtype}")
            if Tp is None:
                Tp = a.shape[2]
            elif a.shape[2] != Tp:
                raise ValueError(f"past_key_values[{i}] {name} has T_past={a.shape[2]}, layer 0 has {Tp}")
    return Tp


def gpt_inputs(config, dtype, input_ids, attention_mask, token_type_ids, position_ids, past_key_values,
               inputs_embeds=None):
    """GPT-1 / GPT-2 inputs, (B, T) or (B, N, T) (multiple choice, flattened to (B*N, T) as transformers).
    -> shape, ids (B, T) or None, inputs_embeds (B, T, C) or None, mask (B, T_past + T) bool or None,
       token types (B, T) or None, positions (B, T)"""
    cfg = config
    shape, ids, embeds = token_inputs(input_ids, inputs_embeds, dtype, cfg.n_embd)
    T = shape[-1]
    B = int(np.prod(shape[:-1]))
    if ids is not None:
        ids = ids_in_range("input_ids", ids.reshape(B, T), cfg.vocab_size)
    else:
        embeds = embeds.reshape(B, T, cfg.n_embd)
    past_len = 0 if past_key_values is None else past_like(past_key_values, cfg.n_layer, B, cfg.n_head,
                                                           cfg.n_embd // cfg.n_head, dtype)
    if past_len + T > cfg.n_positions:
        raise ValueError(f"sequence length {past_len + T} (past {past_len} + input_ids {T}) exceeds "
                         f"n_positions {cfg.n_positions}")
    mask = padding_mask(attention_mask, shape[:-1] + (past_len + T,),
                        f" (input_ids {shape}, past length {past_len})")
    mask = None if mask is None else mask.reshape(B, past_len + T)
    if token_type_ids is not None:
        token_type_ids = as_ids("token_type_ids", token_type_ids)
        if token_type_ids.shape != shape:
            raise ValueError(f"token_type_ids must have the shape of input_ids {shape}, got {token_type_ids.shape}")
        token_type_ids = token_type_ids.reshape(B, T)
        ids_in_range("token_type_ids", token_type_ids, cfg.vocab_size)  # looked up in the token table
    pos = position_ids_like(position_ids, B, T, past_len, cfg.n_positions, shape)
    return shape, ids, embeds, mask, token_type_ids, pos


def bert_inputs(config, dtype, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds=None):
    """BERT inputs -> ids (B, T) or None, inputs_embeds (B, T, C) or None, mask (B, T) bool or None,
    token types (B, T), positions (B, T) or (1, T)"""
    cfg = config
    shape, ids, embeds = token_inputs(input_ids, inputs_embeds, dtype, cfg.hidden_size, max_ndim=2)
    B, T = shape
    if T > cfg.max_position_embeddings:
        raise ValueError(f"input_ids has sequence length {T} > max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    if ids is not None:
        ids_in_range("input_ids", ids, cfg.vocab_size)
    if token_type_ids is None:
        token_type_ids = np.zeros((B, T), dtype=np.int64)
    token_type_ids = as_ids("token_type_ids", token_type_ids)
    if token_type_ids.shape != (B, T):
        raise ValueError(f"token_type_ids must have shape {(B, T)} like input_ids, got {token_type_ids.shape}")
    ids_in_range("token_type_ids", token_type_ids, cfg.type_vocab_size)
    if position_ids is None:
        position_ids = np.arange(T, dtype=np.int64)[None]  # (1, T): broadcast over B in the lookup
    position_ids = as_ids("position_ids", position_ids)
    if position_ids.ndim == 1:
        position_ids = position_ids[None]
    if position_ids.shape not in ((B, T), (1, T)):
        raise ValueError(f"position_ids must have shape {(B, T)}, {(1, T)} or {(T,)}, got {position_ids.shape}")
    ids_in_range("position_ids", position_ids, cfg.max_position_embeddings)
    mask = padding_mask(attention_mask, (B, T), " like input_ids")
    return ids, embeds, mask, token_type_ids, position_ids


def lm_labels(labels, shape, V):
    """Language-model labels: the shape of input_ids, ids in [0, V) or -100 (ignored)."""
    labels = as_ids("labels", labels)
    if labels.shape != tuple(shape):
        raise ValueError(f"labels must have the shape of input_ids {tuple(shape)}, got {labels.shape}")
    return ids_in_range("labels", labels, V, allow=IGNORE_INDEX)
