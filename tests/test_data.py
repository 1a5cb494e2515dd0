"""numlm.data.pretrain: BERT masking and NSP pairs, GPT blocks, token files, resumable streams."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numlm.data import (
    IGNORE_INDEX, NSPPair, TokenStream, causal_lm_batches, load_document_starts, load_meta,
    load_tokens, mask_tokens, nsp_batch, nsp_pairs, pack_documents, prepare, sample_blocks,
    sequential_blocks, split_documents, split_tokens, bert_pretraining_batches,
)

SIGMA = 5.0


def within(count, n, p, extra_low=0.0, extra_high=0.0):
    """count ~ Binomial(n, p) within SIGMA standard deviations."""
    sd = np.sqrt(n * p * (1 - p))
    return n * p - SIGMA * sd - extra_low <= count <= n * p + SIGMA * sd + extra_high


# ---- mask_tokens -------------------------------------------------------------------------------
def random_batch(seed, B, T, V, n_special):
    """Rows [CLS] tokens [SEP] [PAD]...; specials are ids 0..n_special-1 (0 = PAD)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(n_special, V, size=(B, T))
    lengths = rng.integers(2, T + 1, size=B)
    attn = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    ids[:, 0] = 1
    ids[np.arange(B), lengths - 1] = 2
    ids[attn == 0] = 0
    return ids, attn


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 6), T=st.integers(2, 40),
       V=st.integers(8, 300), p=st.floats(0.01, 0.99), use_mask=st.booleans())
def test_mask_tokens_properties(seed, B, T, V, p, use_mask):
    ids, attn = random_batch(seed, B, T, V, n_special=5)
    special_ids = {0, 1, 2, 3, 4}
    before = ids.copy()
    spec = np.isin(ids, list(special_ids)) if use_mask else special_ids
    masked, labels = mask_tokens(ids, spec, 4, V, seed, mlm_probability=p, attention_mask=attn)
    np.testing.assert_array_equal(ids, before)                     # input untouched
    assert masked.dtype == labels.dtype == np.int64
    chosen = labels != IGNORE_INDEX
    never = np.isin(ids, list(special_ids)) | (attn == 0)
    assert not (chosen & never).any()                              # specials and padding never chosen
    np.testing.assert_array_equal(masked[~chosen], ids[~chosen])   # unchosen unchanged
    np.testing.assert_array_equal(labels[chosen], ids[chosen])     # labels = original ids
    assert ((masked >= 0) & (masked < V)).all()
    again = mask_tokens(ids, spec, 4, V, np.random.default_rng(seed), p, attn)
    np.testing.assert_array_equal(again[0], masked)                # determinism: int seed == Generator
    np.testing.assert_array_equal(again[1], labels)


def test_mask_tokens_rates():
    """1M maskable tokens: 15% chosen; of those [MASK] 80%, random 10%, kept 10% (5 sigma is under
    half a point of each rate, so moving any of the three draws' probabilities by 5 points fails).

    A random draw can land on the original id or on [MASK] (prob 1/V each), so the observable
    probabilities are P(mask) = .8 + .1/V, P(same) = .1 + .1/V, P(other) = .1 (V - 2) / V."""
    V, mask_id = 1000, 4
    rng = np.random.default_rng(0)
    ids = rng.integers(5, V, size=(1000, 1000))
    masked, labels = mask_tokens(ids, {0, 1, 2, 3, 4}, mask_id, V, rng)
    n = ids.size
    chosen = labels != IGNORE_INDEX
    k = int(chosen.sum())
    assert within(k, n, 0.15)
    out, orig = masked[chosen], ids[chosen]
    assert within(int((out == mask_id).sum()), k, 0.8 + 0.1 / V)
    assert within(int((out == orig).sum()), k, 0.1 + 0.1 / V)
    other = out[(out != mask_id) & (out != orig)]
    assert within(len(other), k, 0.1 * (V - 2) / V)
    # random replacements are uniform over the whole vocabulary: mean (V-1)/2, sd sqrt((V^2-1)/12)
    sd = np.sqrt((V**2 - 1) / 12 / len(other))
    assert abs(other.mean() - (V - 1) / 2) < SIGMA * sd
    assert other.min() < 0.05 * V and other.max() > 0.95 * V


def test_mask_tokens_respects_padding_with_attention_mask_only():
    ids = np.full((50, 40), 7)
    attn = np.zeros_like(ids)
    attn[:, :10] = 1
    masked, labels = mask_tokens(ids, set(), 4, 10, 1, mlm_probability=0.9, attention_mask=attn)
    assert (labels[:, 10:] == IGNORE_INDEX).all() and (masked[:, 10:] == 7).all()
    assert (labels[:, :10] != IGNORE_INDEX).any()


@pytest.mark.parametrize("kwargs, word", [
    (dict(mlm_probability=0.0), "mlm_probability"), (dict(mlm_probability=1.0), "mlm_probability"),
    (dict(mlm_probability=-0.1), "mlm_probability"), (dict(vocab_size=5), "input_ids"),
    (dict(mask_id=99), "mask_id"), (dict(input_ids=np.array([[1.5, 2.0]])), "input_ids"),
    (dict(input_ids=np.array([[-1, 6]])), "input_ids"), (dict(vocab_size=0), "vocab_size"),
])
def test_mask_tokens_bad_input(kwargs, word):
    args = dict(input_ids=np.array([[5, 6]]), special_mask_or_ids={0}, mask_id=4, vocab_size=10,
                rng=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        mask_tokens(**args)


# ---- NSP ---------------------------------------------------------------------------------------
def make_documents(seed, n_docs, n_sents=(3, 30), sent_len=(1, 12)):
    """Token k of document d is 10000 * (d + 1) + k: provenance and order are readable from ids."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n_docs):
        k, sents = 0, []
        for _ in range(rng.integers(*n_sents)):
            n = int(rng.integers(*sent_len))
            sents.append(list(range(10000 * (d + 1) + k, 10000 * (d + 1) + k + n)))
            k += n
        docs.append(sents)
    return docs


def sentence_starts(doc):
    return set(np.cumsum([0] + [len(s) for s in doc])[:-1] + doc[0][0])


def check_pair(docs, pair, max_length):
    a, b = np.array(pair.a), np.array(pair.b)
    assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) + 3 <= max_length
    da, db = a[0] // 10000 - 1, b[0] // 10000 - 1
    assert (a // 10000 - 1 == da).all() and (b // 10000 - 1 == db).all()
    assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()        # each a contiguous span
    if pair.label == 0:
        assert da == db and b[0] == a[-1] + 1                       # B continues A
        assert b[0] in sentence_starts(docs[da])                    # at a sentence boundary
    else:
        assert da != db                                             # B from another document
        assert b[0] in sentence_starts(docs[db])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_docs=st.integers(2, 6), max_length=st.integers(5, 80),
       short=st.sampled_from([0.0, 0.1, 1.0]))
def test_nsp_pairs_properties(seed, n_docs, max_length, short):
    docs = make_documents(seed, n_docs)
    pairs = nsp_pairs(docs, max_length, np.random.default_rng(seed), short_seq_prob=short)
    assert pairs
    for p in pairs:
        check_pair(docs, p, max_length)
    again = nsp_pairs(docs, max_length, seed, short_seq_prob=short)
    assert again == pairs


def test_nsp_label_rate():
    """Labels are 50/50, except that a chunk of one sentence (at most one per document and pass, the
    last) must take a random B: at most n_docs * dupe_factor extra label-1 pairs. 32k pairs: 5 sigma
    is 1.4 points, so a rate of 45% or 55% fails."""
    n_docs, dupe = 20, 5
    docs = make_documents(1, n_docs, n_sents=(900, 1100), sent_len=(2, 6))
    pairs = nsp_pairs(docs, 16, 0, short_seq_prob=0.0, dupe_factor=dupe)
    ones = sum(p.label for p in pairs)
    assert len(pairs) > 30000 and SIGMA * np.sqrt(len(pairs) / 4) + n_docs * dupe < 0.02 * len(pairs)
    assert within(ones, len(pairs), 0.5, extra_high=n_docs * dupe)
    for p in pairs[:500]:
        check_pair(docs, p, 64)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), max_length=st.integers(5, 60), pad=st.booleans())
def test_nsp_batch_layout(seed, max_length, pad):
    CLS, SEP, PAD = 2, 3, 0
    docs = make_documents(seed, 3)
    pairs = nsp_pairs(docs, max_length, seed)[:8]
    batch = nsp_batch(pairs, CLS, SEP, PAD, max_length=max_length if pad else None)
    ids, types, attn = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    assert ids.shape[1] == (max_length if pad else max(len(p.a) + len(p.b) + 3 for p in pairs))
    assert ids.shape[1] <= max_length
    for r, p in enumerate(pairs):
        na, nb = len(p.a), len(p.b)
        n = na + nb + 3
        assert ids[r, :n].tolist() == [CLS] + p.a + [SEP] + p.b + [SEP]
        assert types[r].tolist() == [0] * (na + 2) + [1] * (nb + 1) + [0] * (ids.shape[1] - n)
        assert attn[r].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert (ids[r, n:] == PAD).all()
    np.testing.assert_array_equal(batch["next_sentence_label"], [p.label for p in pairs])
    assert all(v.dtype == np.int64 for v in batch.values())


def test_bert_pretraining_batches_mask_only_segment_tokens():
    docs = make_documents(3, 4, sent_len=(1, 4))
    # ids are large: shift them into a 100-word vocabulary with specials 0..4
    small = [[[5 + t % 95 for t in s] for s in d] for d in docs]
    pairs = nsp_pairs(small, 32, 0)
    ids = dict(cls_id=2, sep_id=3, pad_id=0, mask_id=4, vocab_size=100, special_ids={0, 1, 2, 3, 4})
    seen = 0
    for batch in bert_pretraining_batches(pairs, 8, ids, 0, shuffle=False):
        plain = nsp_batch(pairs[seen:seen + 8], 2, 3, 0)
        lab, x = batch["labels"], batch["input_ids"]
        chosen = lab != IGNORE_INDEX
        np.testing.assert_array_equal(x[~chosen], plain["input_ids"][~chosen])
        np.testing.assert_array_equal(lab[chosen], plain["input_ids"][chosen])
        assert not np.isin(plain["input_ids"][chosen], [0, 1, 2, 3, 4]).any()
        for k in ("token_type_ids", "attention_mask", "next_sentence_label"):
            np.testing.assert_array_equal(batch[k], plain[k])
        seen += len(lab)
    assert seen == len(pairs)


@pytest.mark.parametrize("kwargs, word", [
    (dict(max_length=4), "max_length"), (dict(documents=[[[1, 2]]]), "documents"),
    (dict(documents=[]), "documents"), (dict(short_seq_prob=2.0), "short_seq_prob"),
])
def test_nsp_bad_input(kwargs, word):
    args = dict(documents=[[[1, 2], [3]], [[4, 5]]], max_length=16, rng=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        nsp_pairs(**args)


def test_nsp_batch_too_long():
    with pytest.raises(ValueError, match="max_length"):
        nsp_batch([NSPPair([1, 2, 3], [4, 5], 0)], 2, 3, 0, max_length=7)


# ---- causal LM ---------------------------------------------------------------------------------
def test_pack_documents():
    docs = [[5, 6, 7], np.array([8]), [9, 10]]
    packed = pack_documents(docs, 0)
    assert packed.dtype == np.int64
    assert packed.tolist() == [5, 6, 7, 0, 8, 0, 9, 10, 0]
    with pytest.raises(ValueError, match="token_lists"):
        pack_documents([], 0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 300), T=st.integers(1, 40),
       B=st.integers(1, 9))
def test_sample_blocks_are_slices(seed, N, T, B):
    tokens = np.arange(N, dtype=np.uint16)
    if N < T:
        with pytest.raises(ValueError, match="block_size"):
            sample_blocks(tokens, T, B, seed)
        return
    batch = sample_blocks(tokens, T, B, seed)
    x = batch["input_ids"]
    assert x.shape == (B, T) and x.dtype == np.int64
    np.testing.assert_array_equal(batch["labels"], x)                   # unshifted labels
    starts = x[:, 0]
    assert ((starts >= 0) & (starts <= N - T)).all()
    np.testing.assert_array_equal(x, starts[:, None] + np.arange(T))    # contiguous blocks
    np.testing.assert_array_equal(sample_blocks(tokens, T, B, seed)["input_ids"], x)


def test_sample_blocks_cover_all_starts_uniformly():
    N, T = 20, 5
    starts = np.concatenate([b["input_ids"][:, 0] for b in
                             causal_lm_batches(np.arange(N), T, 1000, 0, num_batches=10)])
    counts = np.bincount(starts, minlength=N - T + 1)
    assert len(counts) == N - T + 1
    p = 1 / (N - T + 1)
    assert all(within(c, len(starts), p) for c in counts)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 200), T=st.integers(1, 30), B=st.integers(1, 7))
def test_sequential_blocks(N, T, B):
    if N < T:
        return
    rows = np.concatenate([b["input_ids"] for b in sequential_blocks(np.arange(N), T, B)])
    n_blocks = N // T
    assert rows.shape == (n_blocks, T)
    np.testing.assert_array_equal(rows.reshape(-1), np.arange(n_blocks * T))


# ---- token files -------------------------------------------------------------------------------
class FakeTokenizer:
    """Deterministic word -> id map with a chosen vocabulary size (for the uint32 path)."""

    def __init__(self, vocab_size, eos_id=None, sep_id=None):
        self.vocab_size, self.eos_id, self.sep_id = vocab_size, eos_id, sep_id

    def word_id(self, w):
        return (sum(ord(c) * 7919 ** i for i, c in enumerate(w)) % (self.vocab_size - 10)) + 10

    def encode_many(self, texts, add_special_tokens=False):
        return [[self.word_id(w) for w in t.split()] for t in texts]


@pytest.mark.parametrize("V, dtype", [(1000, np.uint16), (65535, np.uint16), (65536, np.uint32),
                                      (200_000, np.uint32)])
def test_prepare_load_round_trip(tmp_path, V, dtype):
    tk = FakeTokenizer(V, eos_id=V - 1)
    rng = np.random.default_rng(V)
    words = ["w%d" % i for i in range(500)]
    docs = [" ".join(rng.choice(words, size=rng.integers(1, 50))) for _ in range(40)]
    meta = prepare(docs, tk, tmp_path / "c.bin", batch_docs=7)
    expect = np.concatenate([ids + [V - 1] for ids in tk.encode_many(docs)])
    tokens = load_tokens(tmp_path / "c.bin")
    assert isinstance(tokens, np.memmap) and tokens.dtype == dtype
    np.testing.assert_array_equal(tokens, expect)
    assert tokens.max() >= 60000 or V < 65536
    side = json.loads((tmp_path / "c.json").read_text())
    assert side == meta == load_meta(tmp_path / "c.bin")
    assert side["length"] == len(expect) and side["num_documents"] == len(docs)
    assert side["vocab_size"] == V and side["dtype"] == np.dtype(dtype).name
    starts = load_document_starts(tmp_path / "c.bin")
    np.testing.assert_array_equal(starts, np.cumsum([0] + [len(d.split()) + 1 for d in docs])[:-1])
    batch = sample_blocks(tokens, 8, 4, 0)                     # batches come straight off the memmap
    np.testing.assert_array_equal(batch["input_ids"], sample_blocks(expect, 8, 4, 0)["input_ids"])


def test_prepare_from_paths_and_bad_input(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("one two three")
    (tmp_path / "corpus" / "b.md").write_text("# Title\nfour *five*")
    tk = FakeTokenizer(100, sep_id=3)
    meta = prepare(tmp_path / "corpus", tk, tmp_path / "out" / "t.bin")
    tokens = load_tokens(tmp_path / "out" / "t.bin")
    expect = tk.encode_many(["one two three"])[0] + [3] + tk.encode_many(["Title\nfour five"])[0] + [3]
    assert tokens.tolist() == expect and meta["separator_id"] == 3
    with pytest.raises(ValueError, match="missing"):
        prepare(tmp_path / "missing", tk, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare(["", "  "], tk, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokens(tmp_path / "nope.bin")


def test_split_tokens_and_documents():
    tokens = np.arange(100)
    train, val = split_tokens(tokens, 0.2)
    assert len(train) == 80 and val.tolist() == list(range(80, 100))
    train, val = split_tokens(tokens, 0.2, doc_starts=[0, 30, 85, 95])
    assert len(train) == 85 and val[0] == 85
    docs = list("abcdefghij")
    tr, va = split_documents(docs, 0.3)
    assert tr == list("abcdefg") and va == list("hij")
    tr, va = split_documents(docs, 0.3, rng=0)
    assert sorted(tr + va) == docs and len(va) == 3
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            split_tokens(tokens, bad)
    with pytest.raises(ValueError, match="empty split"):
        split_tokens(tokens, 0.2, doc_starts=[0])


# ---- resumable stream --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["random", "epoch"])
def test_token_stream_resumes_exactly(mode):
    tokens = np.arange(1000, dtype=np.uint16)
    run = TokenStream(tokens, 16, 5, rng=7, mode=mode)
    for _ in range(17):                                      # crosses epoch boundaries (62 blocks)
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))         # survives a JSON checkpoint
    rest = [run.next_batch()["input_ids"] for _ in range(20)]
    resumed = TokenStream(tokens, 16, 5, rng=12345, mode=mode)
    resumed.load_state_dict(state)
    for expect in rest:
        np.testing.assert_array_equal(next(resumed)["input_ids"], expect)
    assert resumed.step == run.step == 37


def test_token_stream_epoch_visits_every_block_once():
    tokens = np.arange(100 * 8)
    s = TokenStream(tokens, 8, 10, rng=0, mode="epoch")
    starts = np.concatenate([s.next_batch()["input_ids"][:, 0] for _ in range(10)])
    assert sorted(starts.tolist()) == list(range(0, 800, 8))
    assert s.epoch == 0
    s.next_batch()
    assert s.epoch == 1
    other = TokenStream(tokens, 8, 10, rng=0, mode="random")
    with pytest.raises(ValueError, match="mode"):
        other.load_state_dict(s.state_dict())
