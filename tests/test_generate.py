"""Decoding: against transformers' generate on the fixture models, against brute force and plain
reference loops on a small table model, and statistically for sampling."""
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import numlm
from numlm.decoding import (generate, repetition_penalty, temperature_scale, top_k_filter, top_p_filter)
from numlm.kernels import matmul as mm
from numlm.models import ModelOutput

from conftest import FIXTURES

GEN = FIXTURES / "generate"
HF = FIXTURES / "hf"
MODELS = ["gpt2-tiny", "openai-gpt-tiny"]


class TableLM:
    """A stand-in causal LM whose logits depend on the whole visible history through its cache:
    logits[b, t] = A[id_t] + P[pos_t] + S[(sum of unmasked ids up to t) % M].
    The cache is one (k, v) pair holding the ids seen so far, (B, 1, T, 1), so a beam reorder that
    forgets to move it changes the numbers."""

    M = 5

    def __init__(self, V=7, n_positions=32, seed=0, scale=2.0, eos_token_id=None, pad_token_id=None):
        rng = np.random.default_rng(seed)
        self.A = rng.normal(size=(V, V)) * scale
        self.P = rng.normal(size=(n_positions, V)) * scale
        self.S = rng.normal(size=(self.M, V)) * scale
        self.config = SimpleNamespace(vocab_size=V, n_positions=n_positions, eos_token_id=eos_token_id,
                                      pad_token_id=pad_token_id)
        self.lm_head = "table"
        self.calls = []  # (T_new, T_total) per forward

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=False):
        ids = np.asarray(input_ids)
        B, T = ids.shape
        past = np.zeros((B, 0), np.int64) if past_key_values is None else \
            past_key_values[0][0][:, 0, :, 0].astype(np.int64)
        seen = np.concatenate([past, ids], axis=1)                  # (B, T_total)
        Tt = seen.shape[1]
        mask = np.ones((B, Tt), np.int64) if attention_mask is None else np.asarray(attention_mask)
        assert mask.shape == (B, Tt)
        pos = np.arange(Tt - T, Tt)[None].repeat(B, 0) if position_ids is None else np.asarray(position_ids)
        hist = np.cumsum(seen * mask, axis=1)[:, -T:] % self.M
        self.calls.append((T, Tt))
        out = ModelOutput(logits=self.A[ids] + self.P[pos] + self.S[hist])
        if use_cache:
            k = seen[:, None, :, None].astype(np.float64)
            out.past_key_values = ((k, k.copy()),)
        return out


def f32_logits(model, seq):
    """float32 next-token logits of one unpadded row, from a full forward."""
    return model(np.asarray(seq)[None]).logits[0, -1].astype(np.float32)


def load(name):
    return numlm.from_pretrained(HF / name, dtype="float64"), np.load(GEN / name / "reference.npz")


# ---- transformers' generate on the fixture models ----------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_greedy_matches_transformers(name):
    model, ref = load(name)
    out = generate(model, ref["prompt_ids"], ref["prompt_attention_mask"], max_new_tokens=12, pad_token_id=0,
                   eos_token_id=98, return_dict_in_generate=True, output_scores=True)
    np.testing.assert_array_equal(out.sequences, ref["greedy_sequences"])
    np.testing.assert_allclose(np.stack(out.scores, axis=1), ref["greedy_scores"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(numlm.generate(model, ref["prompt_ids"], ref["prompt_attention_mask"],
                                                 max_new_tokens=12, pad_token_id=0, eos_token_id=98,
                                                 use_cache=False), ref["greedy_sequences"])


@pytest.mark.parametrize("name", MODELS)
def test_beam_matches_transformers(name):
    model, ref = load(name)
    out = generate(model, ref["beam_prompt_ids"], num_beams=4, num_return_sequences=4, max_new_tokens=10,
                   length_penalty=1.0, early_stopping=False, eos_token_id=98, pad_token_id=0,
                   return_dict_in_generate=True)
    np.testing.assert_array_equal(out.sequences, ref["beam_sequences"])
    assert out.sequences_scores.dtype == np.float32
    np.testing.assert_allclose(out.sequences_scores, ref["beam_sequence_scores"], rtol=0, atol=1e-5)
    again = generate(model, ref["beam_prompt_ids"], num_beams=4, num_return_sequences=4, max_new_tokens=10,
                     eos_token_id=98, pad_token_id=0, use_cache=False, return_dict_in_generate=True)
    np.testing.assert_array_equal(again.sequences, ref["beam_sequences"])
    np.testing.assert_allclose(again.sequences_scores, ref["beam_sequence_scores"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_cached_logits_equal_full_forward(name):
    """Prefill + one token per step with the cache == a full forward over the whole sequence, float64,
    every step, left-padded rows included (compared at real tokens)."""
    model, ref = load(name)
    seqs, mask0 = ref["greedy_sequences"], ref["prompt_attention_mask"]
    B, T0 = mask0.shape
    mask = np.concatenate([mask0, np.ones((B, seqs.shape[1] - T0), np.int64)], axis=1)
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    out = model(seqs[:, :T0], attention_mask=mask[:, :T0], position_ids=pos[:, :T0], use_cache=True)
    past, cached = out.past_key_values, [out.logits[:, -1]]
    for t in range(T0, seqs.shape[1] - 1):
        out = model(seqs[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                    past_key_values=past, use_cache=True)
        assert out.past_key_values[0][0].shape[2] == t + 1
        past = out.past_key_values
        cached.append(out.logits[:, -1])
    full = model(seqs[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1]).logits
    for i, t in enumerate(range(T0 - 1, seqs.shape[1] - 1)):
        np.testing.assert_allclose(cached[i], full[:, t], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_top_k_1_sampling_is_greedy(name):
    model, ref = load(name)
    out = generate(model, ref["prompt_ids"], ref["prompt_attention_mask"], max_new_tokens=12, pad_token_id=0,
                   eos_token_id=98, do_sample=True, top_k=1, temperature=0.7, seed=3)
    np.testing.assert_array_equal(out, ref["greedy_sequences"])


# ---- the table model: reference loops and brute force ------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       new=st.integers(1, 8), use_eos=st.booleans())
def test_greedy_left_padded_equals_each_row_alone(seed, lengths, new, use_eos):
    """A batch with left padding decodes every row exactly as that row alone, unpadded; rows that hit
    EOS are then filled with pad. The reference loop is a plain full-forward argmax."""
    V = 6
    eos = 2 if use_eos else None
    model = TableLM(V=V, seed=seed)
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, V, n) for n in lengths]
    T0 = max(lengths)
    pad = 5
    ids = np.full((len(rows), T0), pad)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T0 - len(r):], mask[b, T0 - len(r):] = r, 1
    got = generate(model, ids, mask, max_new_tokens=new, eos_token_id=eos, pad_token_id=pad)
    expect = []
    for r in rows:
        seq, done = list(r), False
        for _ in range(new):
            tok = pad if done else int(np.argmax(f32_logits(model, seq)))
            seq.append(tok)
            done = done or tok == eos
        expect.append(seq[len(r):])
    expect = np.array(expect)
    if eos is not None:  # generation stops once every row has finished
        stop = max((list(e).index(eos) + 1 if eos in e else new) for e in expect)
        expect = expect[:, :stop]
    np.testing.assert_array_equal(got[:, T0:], expect)
    np.testing.assert_array_equal(got[:, :T0], ids)


def test_cache_feeds_one_token_per_step():
    model = TableLM(seed=1)
    generate(model, [[1, 2, 3, 4]], max_new_tokens=6)
    assert model.calls == [(4, 4)] + [(1, 5 + i) for i in range(5)]
    model.calls.clear()
    generate(model, [[1, 2, 3, 4]], max_new_tokens=3, use_cache=False)
    assert model.calls == [(4, 4), (5, 5), (6, 6)]


def all_hypotheses(model, prompt, V, n, eos):
    """Every continuation up to n tokens (ending at EOS or at length n) with its float32 sum of
    float32 log-probabilities."""
    out = []
    for L in range(1, n + 1):
        for cont in itertools.product(range(V), repeat=L):
            if eos is not None and (eos in cont[:-1] or (L < n and cont[-1] != eos)):
                continue
            if eos is None and L < n:
                continue
            seq, total = list(prompt), np.float32(0)
            for tok in cont:
                z = f32_logits(model, seq)
                lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
                total = np.float32(total + lp[tok])
                seq.append(tok)
            out.append((cont, total))
    return out


@pytest.mark.parametrize("eos", [None, 0])
def test_wide_beam_is_exhaustive(eos):
    """With num_beams = V^(n-1) beam search keeps every prefix, so its hypotheses are the exact best
    of all continuations: scored sum(log p) / length^length_penalty."""
    V, n, prompt = 3, 3, [1, 0]  # no pad (V - 1) in the prompt, else the mask is inferred from it
    K = V ** (n - 1)
    lp = 1.0 if eos is None else 0.0
    model = TableLM(V=V, seed=7, scale=1.0)
    out = generate(model, prompt, num_beams=K, num_return_sequences=K, max_new_tokens=n, eos_token_id=eos,
                   pad_token_id=V - 1, length_penalty=lp, early_stopping="never" if eos is not None else False,
                   return_dict_in_generate=True)
    hyps = all_hypotheses(model, prompt, V, n, eos)
    scored = sorted(((total / np.float32(len(c) ** lp), c) for c, total in hyps), key=lambda x: -x[0])[:K]
    np.testing.assert_allclose(out.sequences_scores, [s for s, _ in scored], rtol=0, atol=1e-6)
    for row, (_, cont) in zip(out.sequences, scored):
        assert tuple(row[2:2 + len(cont)]) == cont
        assert (row[2 + len(cont):] == V - 1).all()  # pad after EOS


def test_beam_cache_reorder_matches_no_cache():
    model = TableLM(V=9, seed=4, eos_token_id=3)
    ids = np.array([[0, 0, 5, 6], [1, 2, 7, 8]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=7, pad_token_id=0, return_dict_in_generate=True)
    a = generate(model, ids, mask, **kw)
    b = generate(model, ids, mask, use_cache=False, **kw)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    np.testing.assert_array_equal(a.sequences_scores, b.sequences_scores)


def test_beam_of_one_is_greedy():
    model = TableLM(V=8, seed=2)
    greedy = generate(model, [[3, 1]], max_new_tokens=6)
    np.testing.assert_array_equal(generate(model, [[3, 1]], max_new_tokens=6, num_beams=1), greedy)


# ---- sampling ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sample_frequencies_match_softmax(temperature):
    """Empirical first-token frequencies match softmax(logits / T) within 5 binomial sigmas."""
    V, N = 7, 20_000
    model = TableLM(V=V, seed=5, scale=1.0)
    prompt = np.array([[4, 2, 6]] * N)
    out = generate(model, prompt, max_new_tokens=1, do_sample=True, top_k=None, temperature=temperature, seed=11)
    z = f32_logits(model, [4, 2, 6]).astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    counts = np.bincount(out[:, -1], minlength=V)
    sigma = np.sqrt(N * p * (1 - p))
    assert (np.abs(counts - N * p) <= 5 * sigma + 1).all(), (counts, N * p)


@settings(max_examples=15, deadline=None)
@given(top_p=st.floats(0.05, 0.95), seed=st.integers(0, 1000))
def test_top_p_never_samples_outside_nucleus(top_p, seed):
    """Every sampled token's more-likely tokens hold < top_p of the probability (sorted cumulative)."""
    V = 10
    model = TableLM(V=V, seed=seed, scale=1.5)
    prompt = np.array([[1, 2]] * 300)
    out = generate(model, prompt, max_new_tokens=3, do_sample=True, top_k=None, top_p=top_p, seed=seed)
    for b in range(0, 300, 7):
        for t in range(2, out.shape[1]):
            z = f32_logits(model, out[b, :t]).astype(np.float64)
            p = np.exp(z - z.max())
            p /= p.sum()
            tok = out[b, t]
            assert p[p > p[tok]].sum() < top_p + 1e-5


def test_top_k_samples_only_top_k():
    V = 12
    model = TableLM(V=V, seed=9, scale=1.0)
    out = generate(model, np.array([[3]] * 500), max_new_tokens=1, do_sample=True, top_k=3, seed=0)
    z = f32_logits(model, [3])
    allowed = set(np.argsort(-z)[:3].tolist())
    assert set(out[:, 1].tolist()) == allowed  # all three appear in 500 draws, nothing else


def test_same_seed_same_tokens():
    model = TableLM(V=11, seed=3, scale=0.5)
    kw = dict(max_new_tokens=10, do_sample=True, top_k=None)
    a = generate(model, [[1, 2, 3]] * 4, seed=123, **kw)
    b = generate(model, [[1, 2, 3]] * 4, rng=np.random.default_rng(123), **kw)
    c = generate(model, [[1, 2, 3]] * 4, seed=124, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_num_return_sequences_sampling_repeats_rows():
    model = TableLM(V=11, seed=3, scale=0.5)
    out = generate(model, [[1, 2], [3, 4]], max_new_tokens=4, do_sample=True, num_return_sequences=3, seed=0)
    assert out.shape == (6, 6)
    np.testing.assert_array_equal(out[:3, :2], [[1, 2]] * 3)
    np.testing.assert_array_equal(out[3:, :2], [[3, 4]] * 3)


def test_processors_formulas():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 9)).astype(np.float32)
    np.testing.assert_array_equal(temperature_scale(s, 0.5), s / np.float32(0.5))
    ids = np.array([[1, 1, 4], [0, 8, 2], [5, 5, 5]])
    r = repetition_penalty(s, ids, 1.3)
    for b in range(3):
        for v in range(9):
            want = (s[b, v] * np.float32(1.3) if s[b, v] < 0 else s[b, v] / np.float32(1.3)) if v in ids[b] else s[b, v]
            assert r[b, v] == np.float32(want)
    k = top_k_filter(s, 4)
    for b in range(3):
        kept = np.isfinite(k[b])
        assert kept.sum() == 4 and set(np.flatnonzero(kept)) == set(np.argsort(-s[b])[:4])
    p = top_p_filter(s, 0.6)
    for b in range(3):
        probs = np.exp(s[b] - s[b].max()); probs /= probs.sum()
        order = np.argsort(-probs)
        before = np.concatenate([[0], np.cumsum(probs[order])[:-1]])   # mass of strictly more likely tokens
        np.testing.assert_array_equal(np.isfinite(p[b, order]), before < 0.6)


def test_repetition_penalty_in_generate():
    """With a huge penalty greedy decoding never repeats a token it has already seen."""
    model = TableLM(V=12, seed=6, scale=0.5)
    out = generate(model, [[1, 2]], max_new_tokens=8, repetition_penalty=1e6)
    assert len(set(out[0].tolist())) == out.shape[1]


# ---- streaming, lengths, special tokens --------------------------------------------------------------
def test_streamer_gets_tokens_as_produced():
    model = TableLM(V=9, seed=8)
    got = []
    out = generate(model, [[1, 2], [3, 4]], max_new_tokens=5,
                   streamer=lambda t: got.append((t.copy(), len(model.calls))))
    np.testing.assert_array_equal(np.stack([g for g, _ in got], axis=1), out[:, 2:])
    assert [n for _, n in got] == [1, 2, 3, 4, 5]  # each step's tokens arrive before the next forward

    class S:
        def __init__(self):
            self.toks, self.ended = [], False
        def put(self, t):
            self.toks.append(t)
        def end(self):
            self.ended = True
    s = S()
    out = generate(model, [[1, 2]], max_new_tokens=4, streamer=s)
    assert s.ended and np.concatenate(s.toks).tolist() == out[0, 2:].tolist()


@pytest.mark.parametrize("do_sample", [False, True])
def test_a_step_with_no_token_left_to_pick_is_refused(do_sample):
    """Every score at -inf (a repetition penalty over a prompt holding every token, all scores negative):
    greedy picked token 0 silently, and sampling blamed the temperature."""
    model = TableLM(V=5, seed=2)
    model.A, model.P, model.S = (-np.abs(t) - 1 for t in (model.A, model.P, model.S))
    with pytest.raises(ValueError, match="every token scores -inf in row 0 at new token 1: repetition_penalty=1e"):
        generate(model, [[0, 1, 2, 3, 4]], max_new_tokens=2, repetition_penalty=1e300, do_sample=do_sample, seed=0)
    assert generate(model, [[0, 1, 2, 3, 4]], max_new_tokens=2, repetition_penalty=2.0).shape == (1, 7)


def test_lengths_and_defaults():
    model = TableLM(V=9, seed=8, eos_token_id=None)
    # no length given: 20 new tokens, fewer where the 32 positions end (transformers 5; 4 generated up to a
    # total of 20, so a prompt of 20 tokens or more came back alone)
    assert generate(model, [[1, 2, 3]]).shape == (1, 23)
    long = [list(range(1, 9)) * 3]
    for kw in (dict(do_sample=True, num_return_sequences=3, seed=0), dict(num_beams=3, num_return_sequences=3)):
        assert generate(model, long, **kw).shape == (3, 32)
    with pytest.raises(ValueError, match="a prompt of 32 tokens leaves no room in the model's position table"):
        generate(model, [list(range(1, 9)) * 4])
    assert generate(model, [[1, 2, 3]], max_length=7).shape == (1, 7)
    with pytest.warns(UserWarning, match="max_new_tokens wins"):
        assert generate(model, [[1, 2, 3]], max_length=30, max_new_tokens=2).shape == (1, 5)


def test_eos_stops_and_pad_defaults_to_eos():
    model = TableLM(V=9, seed=8)
    free = generate(model, [[1, 2], [5, 6]], max_new_tokens=8)
    eos = int(free[0, 4])                                                # row 0's third new token
    model.config.eos_token_id = eos
    out = generate(model, [[1, 2], [5, 6]], max_new_tokens=8)
    stop0 = list(out[0, 2:]).index(eos)
    assert (out[0, 2 + stop0 + 1:] == eos).all()                         # filled with pad == eos
    np.testing.assert_array_equal(out[0, :2 + stop0 + 1], free[0, :2 + stop0 + 1])
    # several EOS ids
    out2 = generate(model, [[1, 2]], max_new_tokens=8, eos_token_id=[99, int(free[0, 2])], pad_token_id=0)
    assert out2.shape == (1, 3)


# ---- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=np.zeros((1, 0), np.int64)), "empty prompt"),
    (dict(input_ids=[[]]), "empty prompt"),
    (dict(input_ids=[list(range(5)) * 7]), "position table"),
    (dict(max_new_tokens=40), "overflow"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_k=0), "top_k"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(input_ids=[[1, 2, 99]]), "input_ids"),
    (dict(attention_mask=[[1, 1]]), "attention_mask"),
    (dict(streamer=print, num_beams=2), "streamer"),
    # True is an int: it meant 1 beam, 1 sequence, 1 new token
    (dict(num_beams=True), "num_beams"),
    (dict(num_beams=2, num_return_sequences=True), "num_return_sequences"),
    (dict(max_new_tokens=True), "max_new_tokens"),
])
def test_bad_input(kwargs, match):
    model = TableLM(V=9, n_positions=32)
    args = dict(input_ids=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


def test_model_without_lm_head():
    seqcls = numlm.from_pretrained(HF / "gpt2-tiny-seqcls")
    with pytest.raises(ValueError, match="language-modeling head"):
        generate(seqcls, [[1, 2, 3]], max_new_tokens=2)
    with pytest.raises(ValueError, match="language-modeling head"):
        numlm.generate(numlm.from_pretrained(HF / "bert-tiny"), [[1, 2, 3]], max_new_tokens=2)


PEFT_GEN = FIXTURES / "generate" / "peft-gpt2-tiny"


@pytest.mark.parametrize("method", ["prompt", "prefix", "lora"])
def test_generation_from_an_adapter_equals_peft(method):
    """numlm.generate on a PeftModel gives peft's generate on transformers token for token, greedy and
    beam: prompt tuning's virtual tokens once before the (left-padded) prompt, prefix tuning's prefix in
    the KV cache with positions from n, LoRA unmerged and merged."""
    from numlm import peft
    ref = np.load(PEFT_GEN / "reference.npz")
    base = numlm.from_pretrained(FIXTURES / "hf" / "gpt2-tiny", dtype="float64")
    pm = peft.PeftModel.from_pretrained(base, FIXTURES / "peft" / f"{method}-gpt2-tiny" / "adapter")
    kw = dict(max_new_tokens=10, pad_token_id=0, eos_token_id=98)
    out = generate(pm, ref["prompt_ids"], ref["prompt_attention_mask"], return_dict_in_generate=True,
                   output_scores=True, **kw)
    np.testing.assert_array_equal(out.sequences, ref[f"{method}/greedy_sequences"])
    np.testing.assert_allclose(np.stack(out.scores, axis=1), ref[f"{method}/greedy_scores"], rtol=0, atol=1e-5)
    beam = generate(pm, ref["prompt_ids"], ref["prompt_attention_mask"], num_beams=3, return_dict_in_generate=True,
                    **kw)
    np.testing.assert_array_equal(beam.sequences, ref[f"{method}/beam_sequences"])
    np.testing.assert_allclose(beam.sequences_scores, ref[f"{method}/beam_sequence_scores"], rtol=1e-5)
    if method == "lora":
        merged = pm.merge_and_unload()
        np.testing.assert_array_equal(generate(merged, ref["prompt_ids"], ref["prompt_attention_mask"], **kw),
                                      ref["lora_merged/greedy_sequences"])


def test_generation_needs_an_lm_under_the_adapter():
    from numlm import peft
    base = numlm.from_pretrained(HF / "bert-tiny-seqcls", dtype="float64")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="BertForSequenceClassification has no language-modeling head"):
        generate(pm, [[1, 2, 3]], max_new_tokens=2)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 3), k=st.integers(1, 6), n=st.integers(1, 80),
       levels=st.integers(1, 6), specials=st.booleans())
def test_topk_desc_is_the_first_k_of_a_stable_sort(seed, B, k, n, levels, specials):
    """beam search's top-k (a partition, then a sort of the entries at or above the k-th largest, for
    long rows) picks what a stable descending sort's first k are: ties by lower index, -inf, and NaN
    (sorted last) included"""
    from numlm.decoding import _topk_desc
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, (B, n)).astype(np.float32)  # few levels: many ties
    if specials:
        x[rng.random(x.shape) < 0.2] = -np.inf
        x[rng.random(x.shape) < 0.1] = np.nan
    k = min(k, n)
    np.testing.assert_array_equal(_topk_desc(x, k), np.argsort(-x, axis=-1, kind="stable")[:, :k])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), V=st.integers(300, 6000), scale=st.sampled_from([0.3, 1.0, 3.0, 12.0, 200.0]),
       top_p=st.floats(0.05, 0.95), keep=st.integers(1, 3), B=st.integers(1, 2), top_k=st.booleans())
def test_top_p_keeps_the_tokens_with_less_than_top_p_ranked_above_them(seed, V, scale, top_p, keep, B, top_k):
    """top_p_filter on long rows (its head grown until it holds top_p): a token stays exactly when the
    tokens ranked above it (by score, ties by lower index) hold less than top_p (float64 reference; a
    token within 1e-5 of the edge may go either way), or it is among the `keep` highest; kept scores
    unchanged, the others -inf; after a top-k filter too (most scores -inf), and with score gaps so wide
    (scale 200) that most probabilities are 0 in float32 and the `keep` highest must go by score"""
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal((B, V)) * scale).astype(np.float32)
    if top_k:
        s = top_k_filter(s, int(rng.integers(1, 60)))
    out = top_p_filter(s, top_p, min_tokens_to_keep=keep)
    for b in range(B):
        p = np.exp(s[b].astype(np.float64) - s[b].max())
        p /= p.sum()
        order = np.argsort(-s[b], kind="stable")
        above = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
        want = ((above < top_p) | (np.arange(V) < keep)) & np.isfinite(s[b, order])  # a kept -inf stays -inf
        sure = np.abs(above - top_p) > 1e-5
        np.testing.assert_array_equal(np.isfinite(out[b, order])[sure], want[sure])
        kept = np.isfinite(out[b])
        np.testing.assert_array_equal(out[b, kept], s[b, kept])
        assert np.all(out[b, ~kept] == -np.inf)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_top_p_on_a_flat_row_keeps_what_float64_sums_keep(top_p):
    """50,257 equal scores (a random model's row, all sorted): the tokens kept are those with less than
    top_p above them summed in float64 (float32 sums over the row drifted 16-17 tokens)"""
    V = 50257
    out = top_p_filter(np.zeros((1, V), np.float32), top_p)
    above = np.concatenate([[0.0], np.cumsum(np.full(V, np.float32(1.0) / np.float32(V), np.float64))[:-1]])
    np.testing.assert_array_equal(np.isfinite(out[0]), above < top_p)


# ---- the compiled decoding step of a GPT-2 block (kernels/decode.py) ------------------------------------
_STEP_MODELS = {}


def step_model(dtype, cached=True, **cfg):
    """A GPT-2 whose four layer weights are all 1 MB or more (n_embd 512: the smallest, c_proj, is
    512 x 512 float32), so a decoding step's products run on cols_gemv and the block step may run; its
    biases and LayerNorms random, not their zero and one. cached=False: a new one, to change"""
    from numlm.models.gpt import GPT2Config, GPT2LMHeadModel
    key = (dtype, tuple(sorted(cfg.items())))
    if key not in _STEP_MODELS or not cached:
        config = GPT2Config(**{**dict(n_embd=512, n_head=8, n_layer=2, vocab_size=64, n_positions=64), **cfg})
        model = GPT2LMHeadModel(config, seed=1, dtype=dtype).eval()
        rng = np.random.default_rng(2)
        for name, p in model.parameters().items():
            if p.ndim == 1:
                p[...] = rng.normal(name.endswith("ln_1.weight") or name.endswith("ln_2.weight"), 0.3, p.shape)
        if not cached:
            return model
        _STEP_MODELS[key] = model
    return _STEP_MODELS[key]


def count_steps(monkeypatch):
    """a list that GPTBlock.step appends to at every call"""
    from numlm.models.gpt import GPTBlock
    calls, step = [], GPTBlock.step
    monkeypatch.setattr(GPTBlock, "step", lambda self, *a: calls.append(1) or step(self, *a))
    return calls


@settings(max_examples=8, deadline=None)
@given(dtype=st.sampled_from(["float32", "float64"]), B=st.integers(1, 4), T=st.integers(1, 6),
       pads=st.lists(st.integers(0, 5), min_size=4, max_size=4), steps=st.integers(1, 30), seed=st.integers(0, 99))
def test_block_step_gives_the_modules_numbers(dtype, B, T, pads, steps, seed):
    """Every decoding step runs twice on the same cache: through the block's modules (asking for the
    attention maps keeps it off the compiled step) and through the compiled step; logits and the new
    keys and values are the same bit for bit, over left-padded rows and the cache's buffer doubling"""
    model = step_model(dtype)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, (B, T))
    mask = (np.arange(T)[None] >= np.minimum(pads[:B], T - 1)[:, None]).astype(np.int64)  # a real token a row
    cores = [block.attn.core for block in model.transformer.h]
    with numlm.no_grad(), pytest.MonkeyPatch.context() as mp:
        calls = count_steps(mp)
        # the LM head's few-row product goes to BLAS's own threads while they spin after an earlier test's
        # one-row GEMV (matmul.BLAS_SPINS_FOR): both forwards take the same path, not one each side of its end
        mp.setattr(mm, "_blas_spins_until", [0.0])
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        for _ in range(steps):
            kw = dict(input_ids=out.logits[:, -1].argmax(-1)[:, None], position_ids=mask.sum(-1, keepdims=True),
                      attention_mask=np.concatenate([mask, np.ones((B, 1), np.int64)], 1),
                      past_key_values=out.past_key_values, use_cache=True)
            before = len(calls)
            ref = model(**kw, output_attentions=True)
            assert len(calls) == before  # the reference ran the modules
            ref_kv = [tuple(a.copy() for a in core.present) for core in cores]
            for core, kv in zip(cores, out.past_key_values):
                core.present = kv  # as before the first call: the cache fed back is the layer's own
            out, mask = model(**kw), kw["attention_mask"]
            np.testing.assert_array_equal(out.logits, ref.logits)
            for core, kv in zip(cores, ref_kv):
                np.testing.assert_array_equal(core.present[0], kv[0])
                np.testing.assert_array_equal(core.present[1], kv[1])
            if len(calls) == before:  # the modules: only where the reference reallocated the buffer
                assert cores[0].room[0].shape[2] == 2 * mask.shape[1]
    assert calls or steps == 1  # the first step makes the room


def lora_c_attn():
    from numlm import peft
    return peft.get_peft_model(step_model("float32", cached=False, n_layer=1),
                               peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))


def openai_gpt():
    from numlm.models.gpt import OpenAIGPTConfig, OpenAIGPTLMHeadModel
    config = OpenAIGPTConfig(n_embd=512, n_head=8, n_layer=2, vocab_size=64, n_positions=64)
    return OpenAIGPTLMHeadModel(config, seed=1).eval()


def decode_steps(model, n, rows=1):
    """a 4-token prompt and n greedy steps, each feeding back the cache the last returned"""
    out = model(input_ids=np.arange(1, 5)[None].repeat(rows, 0), use_cache=True)
    for t in range(n):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), position_ids=np.full((rows, 1), 4 + t),
                    past_key_values=out.past_key_values, use_cache=True)
    return out


class ClippedGELU(numlm.nn.Activation):
    def forward(self, x):
        return np.minimum(super().forward(x), x.dtype.type(0.1))


class OwnReLU(numlm.nn.Module):
    """an activation module of the user's own: no name for OPS, its forward its own"""

    def forward(self, x):
        return np.maximum(x, x.dtype.type(0))


def _make_case(case, monkeypatch):
    """the model of a case of test_block_step_runs_only_where_it_gives_the_modules_numbers, the case's
    change made (restored by monkeypatch)"""
    from numlm.nn import OPS
    model = {"weights under 1 MB": lambda: step_model("float32", n_embd=256, n_head=4), "GPT-1": openai_gpt,
             "LoRA on c_attn": lora_c_attn}.get(case, lambda: step_model("float32", cached=False))()
    if case == "in training":
        model.train()
    if case == "MC dropout":
        for block in model.transformer.h:
            block.mlp.dropout.train()
    if case == "an Activation subclass":
        for block in model.transformer.h:
            block.mlp.act = ClippedGELU("gelu_new")
    if case == "an activation module of its own":
        for block in model.transformer.h:
            block.mlp.act = OwnReLU()
    if case == "the LayerNorm op replaced":
        forward, backward = OPS["layernorm"]
        monkeypatch.setitem(OPS, "layernorm", (lambda *a: forward(*a), backward))
    if case == "no OpenBLAS":
        monkeypatch.setattr(mm, "_blas", None)
    return model


STEP_CASES = ["the compiled step", "under grad", "in training", "MC dropout", "GPT-1", "weights under 1 MB",
              "5 rows", "no OpenBLAS", "an Activation subclass", "an activation module of its own",
              "the LayerNorm op replaced", "LoRA on c_attn", "beam search's reordered cache"]


@pytest.mark.parametrize("case", STEP_CASES)
def test_block_step_runs_only_where_it_gives_the_modules_numbers(case, monkeypatch):
    """greedy decoding takes the compiled step, but where its buffer is full; under grad, in training
    (the block's or one dropout's), in GPT-1, with weights or rows the matmul path gives to BLAS, without
    OpenBLAS, with a module or op not numlm's own, with LoRA or a reordered (concatenated) cache, every
    step runs the modules"""
    model = _make_case(case, monkeypatch)
    calls = count_steps(monkeypatch)
    if case in ("beam search's reordered cache", "LoRA on c_attn"):
        generate(model, np.arange(1, 5)[None], max_new_tokens=6, eos_token_id=[], num_beams=1 + ("beam" in case))
    elif case == "under grad":
        decode_steps(model, 8)
    else:
        with numlm.no_grad():
            decode_steps(model, 8, rows=5 if case == "5 rows" else 1)
    # t = 4 makes the buffer (room for 10 keys), t = 5..9 fill it, t = 10 doubles it (22), t = 11
    assert len(calls) == (2 * 6 if case == "the compiled step" else 0), case


@pytest.mark.parametrize("change", ["ln_1 weight float64", "c_fc bias of shape (1,)", "eps 0", "4 rows, 1 cached"])
def test_block_step_leaves_bad_input_to_the_modules_checks(change):
    """what the ops refuse with a ValueError the step refuses too (the modules run and raise), not a
    silent answer or a write past the cache's buffer"""
    model = step_model("float32", cached=False)
    block = model.transformer.h[0]
    with numlm.no_grad():
        out = decode_steps(model, 2)
        if change == "ln_1 weight float64":
            block.ln_1.params["weight"] = block.ln_1.params["weight"].astype(np.float64)
        elif change == "c_fc bias of shape (1,)":
            block.mlp.c_fc.params["bias"] = block.mlp.c_fc.params["bias"][:1].copy()
        elif change == "eps 0":
            block.ln_1.eps = block.ln_2.eps = 0.0
        keeps, kept = numlm.nn.attention_keeps, numlm.nn.attention_keeps[0]
        with pytest.raises(ValueError):
            if change == "4 rows, 1 cached":  # a block called directly, as a model's forward sets it up
                keeps[0] = ("present",)
                try:
                    block(np.zeros((4, 1, 512), np.float32), None, out.past_key_values[0])
                finally:
                    keeps[0] = kept
            else:
                model(input_ids=[[1]], position_ids=[[6]], past_key_values=out.past_key_values, use_cache=True)


def test_block_step_on_one_thread_gives_the_same_numbers(monkeypatch):
    """while a stall sends the GEMVs to one thread (matmul._gemv_alone_until), the step runs there too,
    with the same numbers"""
    from numlm import kernels
    from numlm.kernels import matmul as mm
    from numlm.kernels.decode import gpt2_block_step
    model = step_model("float32")
    with numlm.no_grad():
        both = decode_steps(model, 4).logits
        alone, at_one_thread = [], kernels.at_one_thread
        monkeypatch.setattr(kernels, "at_one_thread", lambda k, *a: alone.append(k) or at_one_thread(k, *a))
        monkeypatch.setattr(mm, "_gemv_alone_until", [float("inf")])
        one = decode_steps(model, 4).logits
    assert alone.count(gpt2_block_step) == 2 * 3
    np.testing.assert_array_equal(one, both)
