"""Decoding with a KV cache, as transformers' `generate` does it: greedy, sampling (temperature, top-k,
top-p, repetition penalty) and beam search, with EOS / max-length stopping and left-padded batches.

The model contract (GPT2LMHeadModel, OpenAIGPTLMHeadModel or anything alike):
    out = model(input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False)
    out.logits: (B, T, V); with use_cache=True, out.past_key_values: one (k, v) per layer, (B, H, T, D).
The prompt is run once (prefill), then each step feeds only the new token; its attention reads the
cached keys and values, O(T) per step. Position ids are cumsum(mask) - 1 (1 at pads), as in transformers.

Exactly like transformers, next-token logits are cast to float32 before any processing, so beam
scores are float32 sums of float32 log-probabilities."""
import warnings

import inspect

import numpy as np

from .models.pretrained import ModelOutput, as_ids
from .nn import eval_mode, no_grad
from .ops import softmax, log_softmax
from .ops._check import positive_int, zero_one

NEG = np.float32(-1.0e9)  # transformers' "very large negative" for beams that must not be chosen


# ---- logits processors (transformers' order: repetition penalty, temperature, top-k, top-p) --------------
def repetition_penalty(scores, input_ids, penalty, pads=None):
    """s[b, t] = s / penalty if s > 0 else s * penalty,  for every token t in input_ids[b] after its first
    pads[b] (the prompt's left padding: transformers' prompt_ignore_length). Overflow is quiet, as in
    temperature_scale.    scores: (B, V)  input_ids: (B, T)  pads: (B,) or None -> (B, V)"""
    B, V = scores.shape
    rows = np.arange(B)[:, None]
    if pads is not None and pads.any():  # a skipped position points at an extra column, dropped after
        input_ids = np.where(np.arange(input_ids.shape[1]) < pads[:, None], V, input_ids)
        scores = np.concatenate([scores, np.zeros((B, 1), scores.dtype)], axis=1)
    s = scores[rows, input_ids]                                     # (B, T)
    out = scores.copy()
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        out[rows, input_ids] = np.where(s < 0, s * penalty, s / penalty).astype(scores.dtype)
    return out[:, :V]


def temperature_scale(scores, temperature):
    """s / temperature.    scores: (B, V) -> (B, V)
    Overflow is quiet: generate refuses the scores it leaves (NaN, or every beam at -inf)."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return scores / scores.dtype.type(temperature)


def top_k_filter(scores, top_k, min_tokens_to_keep=1):
    """s where s >= (k-th largest s of its row) else -inf;  k = min(max(top_k, min_keep), V).
    scores: (B, V) -> (B, V)"""
    V = scores.shape[-1]
    k = min(max(int(top_k), min_tokens_to_keep), V)
    kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1:k]         # (B, 1)
    return np.where(scores < kth, scores.dtype.type(-np.inf), scores)


def top_p_filter(scores, top_p, min_tokens_to_keep=1):
    """Nucleus: a token stays if the tokens ranked above it (highest score first, ties by lower index)
    hold less than top_p of the softmax, and the `min_tokens_to_keep` highest always; -inf elsewhere.
    transformers drops the tokens whose ascending cumulative softmax is <= 1 - top_p: the same tokens,
    up to rounding (the sums here are float64's).    scores: (B, V) -> (B, V)"""
    probs = softmax(scores)
    out = np.full_like(scores, -np.inf)
    for b in range(scores.shape[0]):
        head, mass = _nucleus(scores[b], probs[b], top_p, min_tokens_to_keep)
        keep = np.concatenate([[True], mass[:-1] < top_p])          # the mass ranked above each < top_p
        keep[:min_tokens_to_keep] = True
        out[b, head[keep]] = scores[b, head[keep]]
    return out


def _nucleus(s, p, top_p, least):
    """The tokens of the scores s (V,) highest first (ties by lower index), down to the first with top_p
    of their softmax p ranked above it at least and `least` of them at least; and the cumulative sum of
    their p. Only the tokens of p >= max / 16^j are sorted (p rises with s: they lead the order), j
    growing until they hold top_p; all once they are an eighth of the row. Over GPT-2's 50,257 scores:
    0.07-0.4 ms, ~5 with all sorted (a flat row still is, ~6)."""
    V, tau = p.size, p.max() / 16
    while True:
        head = np.flatnonzero(p >= tau) if tau > 0 else np.arange(V)  # a prefix of the order (NaN: all)
        if 8 * head.size < V:
            head = head[np.argsort(-s[head], kind="stable")]
        else:
            head = np.argsort(-s, kind="stable")
        mass = np.cumsum(p[head], dtype=np.float64)
        if head.size == V or (mass[-1] >= top_p and head.size >= least):
            return head, mass
        tau /= 16


def process_logits(scores, input_ids, do_sample, temperature=1.0, top_k=None, top_p=1.0,
                   repetition_penalty_=1.0, min_tokens_to_keep=1, suppress=None, pads=None):
    """transformers' LogitsProcessorList for these options, in its order. scores: (B, V) float32.
    suppress: token ids never chosen (score -inf), transformers' suppress_tokens. pads: (B,) each row's
    left padding, which the repetition penalty skips."""
    if repetition_penalty_ != 1.0:
        scores = repetition_penalty(scores, input_ids, repetition_penalty_, pads)
    if suppress is not None:
        scores = scores.copy()
        scores[:, suppress] = -np.inf
    if do_sample:
        if temperature != 1.0:
            scores = temperature_scale(scores, temperature)
        if top_k is not None and top_k < scores.shape[-1]:
            scores = top_k_filter(scores, top_k, min_tokens_to_keep)
        if top_p < 1.0:
            scores = top_p_filter(scores, top_p, min_tokens_to_keep)
    return scores


def sample_tokens(probs, rng):
    """One draw per row from the categorical probs (inverse CDF).    probs: (B, V) -> (B,) int64"""
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)              # (B, V)
    u = rng.random(probs.shape[0]) * cdf[:, -1]                     # (B,)
    return np.argmax(cdf > u[:, None], axis=-1).astype(np.int64)


# ---- the model step ---------------------------------------------------------------------------------
def _map_cache(past, fn):
    """Apply fn to every array of a (nested tuple) KV cache."""
    if isinstance(past, np.ndarray):
        return fn(past)
    return tuple(_map_cache(p, fn) for p in past)


def _keep_last_logits(model):
    """{"logits_to_keep": 1} if the model (a PeftModel's base model) can compute logits for the last
    position only (transformers' logits_to_keep), else {}. Asked once per generation: reading a
    signature costs more than the rest of a decoding step's Python."""
    model = model.base_model if hasattr(model, "generation_inputs") else model
    try:
        keeps = "logits_to_keep" in inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        keeps = False
    return {"logits_to_keep": 1} if keeps else {}


CHOICE_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


def _step(model, ids, mask, pos, past, use_cache, keep):
    """Next-token logits as float32 (as transformers casts them) and the new cache. A PeftModel says
    what its base model is fed (numlm.peft: virtual tokens before the prompt). keep: _keep_last_logits.
    ids, pos: (B, T_new)  mask: (B, T_total) or None -> (B, V), cache"""
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past)
    if hasattr(model, "generation_inputs"):
        kw, model = model.generation_inputs(ids, mask, pos, past), model.base_model
    choices = getattr(model, "multiple_choice_head", None) is not None  # double heads: (B, choices, T) inputs
    if choices:  # one choice a row
        kw = {k: v[:, None] if k in CHOICE_INPUTS and v is not None else v for k, v in kw.items()}
    with no_grad():  # no caches for a backward: one layer's activations at a time
        out = model(**kw, use_cache=use_cache, **keep)
    logits = np.asarray(out.logits)[:, 0] if choices else np.asarray(out.logits)  # (B, T, V)
    logits = logits[:, -1, :].astype(np.float32, copy=False)  # (B, V)
    if not np.isfinite(logits).all():  # argmax would read NaN as token 0; beams die on log_softmax(inf)
        what = "NaN" if np.isnan(logits).any() else "inf"
        raise ValueError(f"the model's next-token logits hold {what} (NaN or inf weights, or float32 overflow): "
                         f"nothing to choose from")
    return logits, (out.past_key_values if use_cache else None)


def _position_limit(config):
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(config, name, None)
        if isinstance(v, int):
            return v
    return None


def has_lm_head(model):
    """Causal LMs: transformers' *LMHeadModel classes, or a model with an `lm_head` (module or tied key);
    a PeftModel on one."""
    model = getattr(model, "base_model", model)
    if type(model).__name__.endswith("ForMaskedLM"):  # RoBERTa's and DistilBERT's MLM heads are lm_head too
        return False
    return (type(model).__name__.endswith("LMHeadModel") or getattr(model, "lm_head", None) is not None
            or "lm_head.weight" in (getattr(model, "tied", None) or {}))


def _as_ids(input_ids):
    try:
        ids = np.asarray(input_ids)
    except ValueError as e:
        raise ValueError(f"input_ids must be a rectangular (B, T) array of token ids ({e})") from None
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (B, T) or (T,), got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError(f"input_ids: empty prompt (shape {ids.shape}); give at least one token per row")
    return as_ids("input_ids", ids).copy()  # the caller's array is never returned as the result


def _eos_list(eos):
    if eos is None:
        return []
    if isinstance(eos, (int, np.integer)):
        return [int(eos)]
    return [int(e) for e in eos if e is not None]


def _check_args(V, do_sample, temperature, top_k, top_p, repetition_penalty, length_penalty, eos_token_id,
                pad_token_id, seed, rng, use_cache, output_scores, return_dict_in_generate, attention_mask):
    """The numbers and flags of generate(), NaN and infinity included (each error names its argument);
    greedy decoding with a sampling argument warns, as transformers does."""
    def real(name, v, ok, want):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not np.isfinite(v) or not ok(v):
            raise ValueError(f"{name} must be a finite number{want}, got {v!r}")

    def token(name, v, in_vocab=True):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 or (in_vocab and V is not None and v >= V):
            raise ValueError(f"{name} must be a token id in [0, {V}), got {v!r}")

    for name, v in (("do_sample", do_sample), ("use_cache", use_cache), ("output_scores", output_scores),
                    ("return_dict_in_generate", return_dict_in_generate)):
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {v!r}")
    real("temperature", temperature, lambda v: v > 0, " > 0")
    real("top_p", top_p, lambda v: 0 < v <= 1, " in (0, 1]")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None to disable), got {top_k!r}")
    real("repetition_penalty", repetition_penalty, lambda v: v > 0, " > 0")
    real("length_penalty", length_penalty, lambda v: True, "")
    for e in ([eos_token_id] if eos_token_id is None or np.ndim(eos_token_id) == 0 else list(eos_token_id)):
        if e is not None:
            token("eos_token_id", e, in_vocab=False)
            if V is not None and e >= V:
                warnings.warn(f"eos_token_id {e} is outside the vocabulary [0, {V}): generation never stops at it",
                              UserWarning, stacklevel=3)
    if pad_token_id is not None:
        token("pad_token_id", pad_token_id)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0 (or None), got {seed!r}")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy Generator (np.random.default_rng(...)), got {type(rng).__name__}")
    if rng is not None and seed is not None:
        raise ValueError("give seed or rng, not both: seed starts a new generator, rng is one already running")
    if attention_mask is not None:
        try:
            m = np.asarray(attention_mask)
        except ValueError as e:
            raise ValueError(f"attention_mask must be a rectangular (B, T) array of 0 and 1 ({e})") from None
        zero_one("attention_mask", m, "0 (padding) and 1 (real token)")
    if not do_sample:
        given = [f"{n}={v!r}" for n, v, default in (("temperature", temperature, 1.0), ("top_p", top_p, 1.0),
                                                    ("top_k", top_k, 50)) if v is not None and v != default]
        if given:
            verb = "matters" if len(given) == 1 else "matter"
            warnings.warn(f"do_sample is False, so {', '.join(given)} only {verb} when sampling: set "
                          f"do_sample=True or leave them unset", UserWarning, stacklevel=3)


# ---- generate ---------------------------------------------------------------------------------------
def _suppressed(tokens, V):
    """suppress_tokens as an index array (None for none), each a token id of the vocabulary."""
    if tokens is None:
        return None
    ids = np.asarray(tokens if isinstance(tokens, np.ndarray) or np.ndim(tokens) == 0 else list(tokens)).reshape(-1)
    if ids.ndim != 1 or (ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0 or (V and ids.max() >= V))):
        raise ValueError(f"suppress_tokens must be token ids in [0, {V}), got {tokens!r}")
    if V and np.unique(ids).size >= V:
        raise ValueError("suppress_tokens leaves no token to generate")
    return ids.astype(np.int64) if ids.size else None


def _check_options(num_beams, num_return_sequences, do_sample, early_stopping, streamer):
    """The search options, checked as transformers' GenerationConfig.validate does (the numbers are
    _check_args')."""
    positive_int("num_beams", num_beams)
    positive_int("num_return_sequences", num_return_sequences)
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be <= num_beams={num_beams}")
    if num_beams == 1 and not do_sample and num_return_sequences > 1:
        raise ValueError(f"greedy search returns one sequence per prompt; num_return_sequences="
                         f"{num_return_sequences} needs do_sample=True or num_beams >= num_return_sequences")
    if not (isinstance(early_stopping, (bool, np.bool_)) or early_stopping in ("never",)):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if streamer is not None and not callable(getattr(streamer, "put", streamer)):
        raise ValueError(f"streamer must be a callable or have put(tokens), got {type(streamer).__name__}")
    if streamer is not None and num_beams > 1:
        raise ValueError("streamer is not supported with beam search (num_beams > 1): beams change until the end")


DEFAULT_NEW_TOKENS = 20  # transformers 5's generate with no length given: 20 new, within the position table


def _max_length(max_new_tokens, max_length, T0, config, virtual=0):
    """The total length to generate to (prompt included), checked against the position table (less the
    `virtual` tokens prompt or prefix tuning puts before the prompt). Neither length given: the prompt
    and DEFAULT_NEW_TOKENS, fewer where the position table ends (transformers 5)."""
    limit = _position_limit(config)
    limit = None if limit is None else limit - virtual
    if max_new_tokens is not None:
        positive_int("max_new_tokens", max_new_tokens)
        if max_length is not None:
            warnings.warn(f"both max_new_tokens={max_new_tokens} and max_length={max_length!r} are set: "
                          "max_new_tokens wins, as in transformers", UserWarning, stacklevel=3)
        max_length = T0 + int(max_new_tokens)
    elif max_length is None:
        max_length = T0 + DEFAULT_NEW_TOKENS if limit is None else min(T0 + DEFAULT_NEW_TOKENS, limit)
    elif not isinstance(max_length, (int, np.integer)) or max_length <= T0:
        raise ValueError(f"max_length={max_length!r} must exceed the prompt length {T0} "
                         "(or pass max_new_tokens)")
    if limit is not None and T0 >= limit:
        raise ValueError(f"input_ids: a prompt of {T0} tokens leaves no room in the model's position table "
                         f"({limit} positions) for a new token")
    if limit is not None and max_length > limit:
        raise ValueError(f"max_new_tokens/max_length: generating up to {max_length} tokens would overflow the "
                         f"model's position table ({limit} positions); at most {limit - T0} new tokens fit")
    return max_length


def generation_config(model):
    """the settings of a model's generation_config.json (a PeftModel's base model's), {} without one"""
    return getattr(getattr(model, "base_model", model), "generation_config", None) or {}


def _special_tokens_and_mask(ids, attention_mask, eos_token_id, pad_token_id, config, gen):
    """eos ids (a list), the pad id and the prompt's (B, T) 0/1 attention mask. eos and pad default to the
    generation config's (gen: generation_config.json's), else the config's (pad falls back to the first eos)."""
    if eos_token_id is None:
        eos_token_id = gen.get("eos_token_id", getattr(config, "eos_token_id", None))
    eos = _eos_list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = gen.get("pad_token_id", getattr(config, "pad_token_id", None))
    if pad_token_id is None and eos:
        pad_token_id = eos[0]
    known_pad = pad_token_id is not None
    if pad_token_id is None:
        pad_token_id = 0  # fills finished rows only; never taken for padding in the prompt

    # the attention mask: given, or inferred from pads as transformers does when pad != eos
    if attention_mask is None:
        if known_pad and pad_token_id in ids and pad_token_id not in eos:
            mask = (ids != pad_token_id).astype(np.int64)
        else:
            mask = np.ones_like(ids)
    else:
        mask = np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {ids.shape}, got {mask.shape}")
        mask = (mask != 0).astype(np.int64)
    if not mask.any(axis=1).all():
        raise ValueError(f"attention_mask: rows {np.flatnonzero(~mask.any(axis=1)).tolist()} have no tokens")
    if len(ids) > 1 and (mask[:, -1] == 0).any():
        warnings.warn("a prompt is right-padded; decoder-only generation expects left padding")
    return eos, pad_token_id, mask


def generate(model, input_ids, attention_mask=None, *, max_new_tokens=None, max_length=None,
             do_sample=False, num_beams=1, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0,
             length_penalty=1.0, early_stopping=False, num_return_sequences=1, eos_token_id=None,
             pad_token_id=None, use_cache=True, rng=None, seed=None, streamer=None, output_scores=False,
             return_dict_in_generate=False, suppress_tokens=None):
    """transformers' `generate` for decoder-only LMs: greedy (default), sampling (`do_sample=True`) or beam
    search (`num_beams > 1`). input_ids: (B, T) or (T,) int; attention_mask (B, T) 0/1, left padding.

    Returns the sequences (B * num_return_sequences, T + new) int64 (prompt included; rows that finished
    are filled with pad_token_id), or with return_dict_in_generate=True a ModelOutput with `sequences`,
    `scores` (with output_scores: per step the processed float32 next-token scores (B, V)) and, for beam
    search, `sequences_scores` (float32 sum of generated log-probs / generated length ** length_penalty).

    max_new_tokens, or max_length (prompt included); neither: 20 new tokens, fewer where the position table
    ends (transformers 5). top_k=None disables top-k (transformers' default is 50 when sampling);
    eos_token_id (one id or a list) and pad_token_id default to the model's generation_config.json's, else
    its config's (pad falls back to the first eos). Sampling draws from
    `rng` (a numpy Generator) or default_rng(seed). `streamer`: a callable given each step's new tokens
    (B,) as they are produced (or an object with put(tokens) / end(), like transformers' streamers).
    suppress_tokens: ids never generated (transformers' suppress_tokens; e.g. the rows of a padded
    vocabulary no tokenizer decodes). Runs in eval mode (no dropout), the model's modes kept."""
    if not has_lm_head(model):
        raise ValueError(f"model: {type(getattr(model, 'base_model', model)).__name__} has no language-modeling "
                         "head; generate needs a causal LM such as GPT2LMHeadModel or OpenAIGPTLMHeadModel")
    config = getattr(model, "config", None)
    ids = _as_ids(input_ids)
    B, T0 = ids.shape
    V = getattr(config, "vocab_size", None)
    _check_args(V, do_sample, temperature, top_k, top_p, repetition_penalty, length_penalty, eos_token_id,
                pad_token_id, seed, rng, use_cache, output_scores, return_dict_in_generate, attention_mask)
    if V is not None and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(f"input_ids must lie in [0, {V}), got range [{ids.min()}, {ids.max()}]")

    _check_options(num_beams, num_return_sequences, do_sample, early_stopping, streamer)
    suppress = _suppressed(suppress_tokens, V)
    early_stopping = early_stopping if isinstance(early_stopping, str) else bool(early_stopping)  # np.True_ too
    virtual = getattr(getattr(model, "peft_config", None), "num_virtual_tokens", None) or 0
    max_length = _max_length(max_new_tokens, max_length, T0, config, virtual)
    gen = generation_config(model)
    eos, pad_token_id, mask = _special_tokens_and_mask(ids, attention_mask, eos_token_id, pad_token_id, config, gen)

    if do_sample and rng is None:
        rng = np.random.default_rng(seed)
    if num_beams > 1:
        _check_length_penalty(length_penalty, max_length - T0)
    elif num_return_sequences > 1:  # transformers repeats every prompt row
        ids, mask = np.repeat(ids, num_return_sequences, axis=0), np.repeat(mask, num_return_sequences, axis=0)
    with eval_mode(model):  # dropout off, the model's modes kept (transformers leaves a training model's on)
        if num_beams > 1:
            seqs, seq_scores, scores = _beam_search(
                model, ids, mask, max_length, num_beams, num_return_sequences, length_penalty, early_stopping,
                eos, pad_token_id, use_cache, do_sample, temperature, top_k, top_p, repetition_penalty, suppress, rng)
        else:
            seqs, scores = _sample(model, ids, mask, max_length, eos, pad_token_id, use_cache, do_sample,
                                   temperature, top_k, top_p, repetition_penalty, suppress, rng, streamer)
            seq_scores = None
    return _result(seqs, scores, seq_scores, output_scores, return_dict_in_generate)


def _result(seqs, scores, seq_scores, output_scores, return_dict_in_generate):
    """generate's return: the sequences, or a ModelOutput with the scores asked for"""
    if not return_dict_in_generate:
        return seqs
    out = ModelOutput(sequences=seqs)
    if output_scores:
        out.scores = scores
    if seq_scores is not None:
        out.sequences_scores = seq_scores
    return out


def _positions(mask):
    """cumsum(mask) - 1, with 1 at pads (transformers' prepare_inputs_for_generation).  (B, T) -> (B, T)"""
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return pos


def _model_inputs(seqs, mask, pos, cur, past):
    """First step: the whole prompt; later steps: only the newest token (the cache has the rest).
    The mask is omitted where it is all ones (the causal mask alone gives the same numbers)."""
    m = mask[:, :cur]
    m = None if m.all() else m
    if past is None:
        return seqs[:, :cur], m, pos[:, :cur]
    return seqs[:, cur - 1:cur], m, pos[:, cur - 1:cur]


def _sample(model, ids, mask, max_length, eos, pad, use_cache, do_sample, temperature, top_k, top_p,
            penalty, suppress, rng, streamer):
    """transformers' _sample: one token per row per step; greedy when do_sample is False."""
    B, T0 = ids.shape
    seqs = np.full((B, max_length), pad, dtype=np.int64)            # (B, T_max)
    seqs[:, :T0] = ids
    full_mask = np.ones((B, max_length), dtype=np.int64)
    full_mask[:, :T0] = mask
    pos = _positions(full_mask)                                     # (B, T_max)
    unfinished = np.ones(B, dtype=bool)
    eos_arr = np.array(eos, dtype=np.int64)
    pads = np.argmax(mask != 0, axis=1)                             # (B,) the left padding
    scores, past, cur, keep = [], None, T0, _keep_last_logits(model)
    put = getattr(streamer, "put", streamer)
    while cur < max_length:
        x, m, p = _model_inputs(seqs, full_mask, pos, cur, past if use_cache else None)
        logits, past = _step(model, x, m, p, past, use_cache, keep)  # (B, V)
        s = process_logits(logits, seqs[:, :cur], do_sample, temperature, top_k, top_p, penalty, suppress=suppress,
                           pads=pads)
        scores.append(s)
        dead = unfinished & ~(s > -np.inf).any(axis=-1)  # argmax would pick token 0, sampling divide 0 by 0
        if dead.any():
            raise ValueError(f"every token scores -inf in row {np.flatnonzero(dead)[0]} at new token {cur - T0 + 1}: "
                             f"repetition_penalty={penalty} or suppress_tokens left nothing to pick")
        if do_sample:
            probs = softmax(s)
            if np.isnan(probs).any():
                raise ValueError(f"temperature={temperature} overflows the scores: sampling needs finite probabilities")
            tokens = sample_tokens(probs, rng)
        else:
            tokens = np.argmax(s, axis=-1)
        tokens = np.where(unfinished, tokens, pad)                  # (B,)
        seqs[:, cur] = tokens
        cur += 1
        if put is not None:
            put(tokens.copy())
        if eos_arr.size:
            unfinished &= ~np.isin(tokens, eos_arr)
        if not unfinished.any():
            break
    if hasattr(streamer, "end"):
        streamer.end()
    return seqs[:, :cur], tuple(scores)


def _gather_beams(x, idx):
    """x[b, idx[b, j], ...]:  x (B, K, ...)  idx (B, K') -> (B, K', ...)"""
    return x[np.arange(x.shape[0])[:, None], idx]


def _topk_desc(x, k):
    """Indices of the k largest entries of each row, largest first (ties: lower index first): the first k
    of a stable sort. A long row (beam search's K * V scores) sorts only the entries at or above its k-th
    largest (a full sort of 4 x 50,257 scores took ~6 ms a step, a third of the step)."""
    if 2 * k >= x.shape[-1]:
        return np.argsort(-x, axis=-1, kind="stable")[:, :k]
    top = np.empty((x.shape[0], k), dtype=np.intp)
    for b, row in enumerate(x):
        above = np.flatnonzero(row >= np.partition(row, row.size - k)[row.size - k])  # index order
        if above.size < k:  # NaNs (they sort last) took places among the k largest
            above = np.arange(row.size)
        top[b] = above[np.argsort(-row[above], kind="stable")[:k]]
    return top


class Beams:
    """The state of a beam search over B prompts with K beams: the K running beams (token ids, summed
    log p, the beam each token came from) and the K best finished hypotheses."""

    def __init__(self, ids, K, max_length, pad):
        B, T0 = ids.shape
        self.running_seqs = np.full((B, K, max_length), pad, dtype=np.int64)  # (B, K, T_max)
        self.running_seqs[:, :, :T0] = ids[:, None, :]
        self.sequences = self.running_seqs.copy()
        self.running_scores = np.zeros((B, K), dtype=np.float32)
        self.running_scores[:, 1:] = NEG                                 # only beam 0 starts live
        self.beam_scores = np.full((B, K), NEG, dtype=np.float32)
        self.finished = np.zeros((B, K), dtype=bool)
        self.improvable = np.ones((B, 1), dtype=bool)
        self.running_idx = np.full((B, K, max_length - T0), -1, dtype=np.int64)
        self.beam_idx = self.running_idx.copy()


def _beam_candidates(bm, acc, cur, T0, n_keep, eos_arr, max_length, do_sample, rng):
    """The top n_keep continuations over all beams (log p, token ids, source beams) and which of them
    stop here (EOS or max length).    acc: (B, K*V) summed log p"""
    B, K, _ = bm.running_seqs.shape
    V = acc.shape[1] // K
    if do_sample:  # sampling without replacement = top-k of log p + Gumbel noise
        top = _topk_desc(acc.astype(np.float64) - np.log(-np.log(rng.random(acc.shape))), n_keep)
    else:
        top = _topk_desc(acc, n_keep)                               # (B, n_keep)
    topk_logp = np.take_along_axis(acc, top, axis=1)
    src = top // V
    topk_seqs = _gather_beams(bm.running_seqs, src)                 # (B, n_keep, T_max)
    topk_seqs[:, :, cur] = top % V
    topk_idx = _gather_beams(bm.running_idx, src)
    topk_idx[:, :, cur - T0] = src + np.arange(B)[:, None] * K
    hits = np.isin(topk_seqs[:, :, cur], eos_arr) if eos_arr.size else np.zeros_like(topk_logp, dtype=bool)
    if cur + 1 >= max_length:
        hits = np.ones_like(hits)
    return topk_logp, topk_seqs, topk_idx, hits


def _check_length_penalty(length_penalty, n):
    """Beam scores divide by generated_length ** length_penalty in float32: refused where that power
    leaves float32's range within n new tokens (every score would be 0 or infinite)."""
    if abs(length_penalty) * np.log(n) > np.log(np.finfo(np.float32).max):
        raise ValueError(f"length_penalty={length_penalty!r}: generated_length ** length_penalty leaves float32's "
                         f"range within {n} new tokens; use |length_penalty| <= "
                         f"{np.log(np.finfo(np.float32).max) / np.log(n):.4g}")


def _beam_advance(bm, cand, cur, T0, length_penalty, early_stopping):
    """The K best continuations that go on become the running beams; the ones that stopped merge
    into the finished hypotheses, scored sum(log p) / generated_length ** length_penalty."""
    topk_logp, topk_seqs, topk_idx, hits = cand
    f32, K = np.float32, bm.running_scores.shape[1]
    live_logp = topk_logp + hits.astype(f32) * NEG
    nxt = _topk_desc(live_logp, K)
    bm.running_seqs, bm.running_scores = _gather_beams(topk_seqs, nxt), _gather_beams(live_logp, nxt)
    bm.running_idx = _gather_beams(topk_idx, nxt)
    just_done = hits & (np.arange(hits.shape[1]) < K)[None, :]
    done_scores = topk_logp / f32((cur + 1 - T0) ** length_penalty)
    full = bm.finished.all(axis=-1, keepdims=True) & (early_stopping is True)
    done_scores = done_scores + full.astype(f32) * NEG
    done_scores = done_scores + (~bm.improvable).astype(f32) * NEG
    done_scores = done_scores + (~just_done).astype(f32) * NEG
    merged_scores = np.concatenate([bm.beam_scores, done_scores], axis=1)
    best = _topk_desc(merged_scores, K)
    bm.sequences = _gather_beams(np.concatenate([bm.sequences, topk_seqs], axis=1), best)
    bm.beam_scores = _gather_beams(merged_scores, best)
    bm.beam_idx = _gather_beams(np.concatenate([bm.beam_idx, topk_idx], axis=1), best)
    bm.finished = _gather_beams(np.concatenate([bm.finished, just_done], axis=1), best)


def _beam_going_on(bm, cur, T0, max_length, length_penalty, early_stopping, hits):
    """False when no running beam can still beat a finished hypothesis (or every row is done)."""
    best_len = max_length - T0 if early_stopping == "never" and length_penalty > 0.0 else cur - T0
    best_running = bm.running_scores[:, :1] / np.float32(best_len ** length_penalty)
    worst_done = np.where(bm.finished, bm.beam_scores.min(axis=1, keepdims=True), NEG)
    bm.improvable = bm.improvable & (best_running > worst_done).any(axis=-1, keepdims=True)
    return bool(bm.improvable.any() and not (bm.finished.all() and early_stopping is True) and not hits.all())


def _check_found(scores, temperature, length_penalty, penalty):
    """Refuse a search that returns hypotheses scored -1e9 or less, the score of the empty ones it starts
    from (the bare prompt would come back): sum(log p) / length ** length_penalty fell there (a tiny
    temperature, a negative length penalty, a repetition penalty leaving -inf), or fewer continuations
    than num_return_sequences got through (top_k, top_p, suppress_tokens).    scores: (B, n_return)"""
    found = (scores > NEG).sum(axis=1)                              # (B,)
    if (found == scores.shape[1]).all():
        return
    given = [f"{n}={v!r}" for n, v in (("temperature", temperature), ("length_penalty", length_penalty),
                                       ("repetition_penalty", penalty)) if v != 1.0]
    given = f" with {', '.join(given)}" if given else ""
    if found.min() == 0:
        raise ValueError(f"beam search found no hypothesis scored above -1e9, the score of an empty one: "
                         f"sum(log p) / length ** length_penalty falls below it{given}")
    raise ValueError(f"beam search found only {found.min()} hypotheses scored above -1e9 (the score of an empty "
                     f"one) for a prompt, fewer than num_return_sequences={scores.shape[1]}: too few tokens pass "
                     f"top_k / top_p / suppress_tokens, or sum(log p) / length ** length_penalty falls below it{given}")


def _beam_search(model, ids, mask, max_length, K, n_return, length_penalty, early_stopping, eos, pad,
                 use_cache, do_sample, temperature, top_k, top_p, penalty, suppress, rng):
    """transformers 5's vectorized _beam_search: keep the K best running beams; every step take the
    top (2 or 1 + n_eos) * K continuations, move the ones that hit EOS / max length into the K finished
    hypotheses scored sum(log p) / generated_length ** length_penalty. All scores float32."""
    B, T0 = ids.shape
    n_keep, eos_arr = max(2, 1 + len(eos)) * K, np.array(eos, dtype=np.int64)
    bm = Beams(ids, K, max_length, pad)
    full_mask = np.ones((B * K, max_length), dtype=np.int64)
    full_mask[:, :T0] = np.repeat(mask, K, axis=0)
    pos = _positions(full_mask)
    pads = np.argmax(full_mask[:, :T0] != 0, axis=1)                # (B*K,) the left padding
    scores, past, cur, keep = [], None, T0, _keep_last_logits(model)
    while cur < max_length:
        flat = bm.running_seqs.reshape(B * K, max_length)
        if past is None and use_cache:  # prefill once per prompt, then copy the cache to its K beams
            logits, past = _step(model, ids, None if mask.all() else mask, pos[::K, :T0], None, True, keep)
            logits = np.repeat(logits, K, axis=0)
            past = _map_cache(past, lambda a: np.repeat(a, K, axis=0))
        else:
            x, m, p = _model_inputs(flat, full_mask, pos, cur, past if use_cache else None)
            logits, past = _step(model, x, m, p, past, use_cache, keep)  # (B*K, V)
        V = logits.shape[-1]
        logp = process_logits(log_softmax(logits), flat[:, :cur], do_sample, temperature, top_k, top_p, penalty,
                              min_tokens_to_keep=2, suppress=suppress, pads=pads)
        scores.append(logp)
        acc = (logp.reshape(B, K, V) + bm.running_scores[:, :, None]).reshape(B, K * V)   # (B, K*V)
        cand = _beam_candidates(bm, acc, cur, T0, n_keep, eos_arr, max_length, do_sample, rng)
        _beam_advance(bm, cand, cur, T0, length_penalty, early_stopping)
        if use_cache:  # reorder the cache to the surviving beams
            order = bm.running_idx[:, :, cur - T0].reshape(B * K)
            past = _map_cache(past, lambda a: a[order])
        cur += 1
        if not _beam_going_on(bm, cur, T0, max_length, length_penalty, early_stopping, cand[3]):
            break
    sequences = bm.sequences[:, :n_return].reshape(B * n_return, max_length)
    _check_found(bm.beam_scores[:, :n_return], temperature if do_sample else 1.0, length_penalty, penalty)
    seq_scores = bm.beam_scores[:, :n_return].reshape(B * n_return)
    beam_idx = bm.beam_idx[:, :n_return].reshape(B * n_return, -1)
    out_len = T0 + int((beam_idx != -1).sum(axis=1).max())
    return sequences[:, :out_len], seq_scores, tuple(scores)
