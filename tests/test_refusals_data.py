"""The data and tokenizer defects a fault pass found: a call that fails refuses in one line naming the
problem and leaves every file as it was; none silently writes over a file it was not asked to write."""
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import numlm
from numlm.cli import main
from numlm.data import Tokenizer, prepare, load_tokens, load_document_starts

LINES = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "birds sing in the trees"]


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe_from_iterator(LINES * 3, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def wordpiece():
    return Tokenizer.train_wordpiece_from_iterator(LINES * 3, vocab_size=60, min_frequency=1)


def refused(capsys, argv):
    """main(argv)'s exit code and its one line of stderr"""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return code, err


# ---- tokenizer train / save --------------------------------------------------------------------
@pytest.mark.parametrize("out", ["corpus.json", "."])
def test_tokenizer_train_refuses_an_out_that_is_its_corpus(tmp_path, capsys, out):
    """--out naming the --data file (or a folder whose tokenizer.json is the --data file) would replace
    the corpus with the tokenizer: refused, the corpus unchanged."""
    name = "corpus.json" if out == "corpus.json" else "tokenizer.json"
    data = tmp_path / name
    data.write_text("\n".join(LINES * 20) + "\n")
    before = data.read_bytes()
    code, err = refused(capsys, ["tokenizer", "train", "--vocab-size", "300", "--data", str(data),
                                 "--out", str(tmp_path / out)])
    assert code == 2 and "would overwrite the input" in err and name in err
    assert data.read_bytes() == before


SAVE_WITH_SMALL_FILE_LIMIT = """
import resource, signal, sys
from numlm.data import Tokenizer
lines = [" ".join(f"w{i}x{j}" for j in range(40)) for i in range(200)]
big = Tokenizer.train_bpe_from_iterator(lines, vocab_size=2000, min_frequency=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
try:
    big.save(sys.argv[1])
except ValueError as e:
    print(e)
"""


def test_a_failed_tokenizer_save_leaves_the_earlier_file_intact(tmp_path, bpe):
    """A save that cannot write the whole file (a size limit stands in for a full disk) is a ValueError
    naming the file, and the tokenizer.json it was to replace still loads as before."""
    path = tmp_path / "tok.json"
    bpe.save(path)
    before = path.read_bytes()
    r = subprocess.run([sys.executable, "-c", SAVE_WITH_SMALL_FILE_LIMIT, str(path), str(len(before))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "cannot write" in r.stdout and str(path) in r.stdout
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]   # no temporary file left
    assert Tokenizer.from_file(path).encode(LINES[0]) == bpe.encode(LINES[0])


def test_a_save_under_another_name_leaves_the_folders_tokenizer_config_alone(tmp_path, bpe, wordpiece):
    """A folder's tokenizer_config.json describes its tokenizer.json (transformers reads the specials
    from it): saving another tokenizer as folder/other.json does not replace it."""
    wordpiece.save(tmp_path)
    config = (tmp_path / "tokenizer_config.json").read_text()
    assert json.loads(config)["mask_token"] == "[MASK]"
    bpe.save(tmp_path / "other.json")
    assert (tmp_path / "tokenizer_config.json").read_text() == config
    assert Tokenizer.from_file(tmp_path / "other.json").vocab_size == bpe.vocab_size
    bpe.save(tmp_path / "tokenizer.json")   # the folder's own tokenizer.json does bring its config
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


@pytest.mark.parametrize("name", ["b.txt", "sub/c.md"])
def test_prepare_refuses_an_out_that_is_a_file_of_its_corpus_folder(tmp_path, capsys, bpe, name):
    """--out naming a text file inside the --data folder would replace that document with tokens after
    reading it: refused, the folder unchanged."""
    corpus = tmp_path / "corpus"
    for f in ("a.txt", "b.txt", "sub/c.md"):
        (corpus / f).parent.mkdir(parents=True, exist_ok=True)
        (corpus / f).write_text("\n".join(LINES) + "\n")
    bpe.save(tmp_path / "tokenizer.json")
    before = {f: f.read_bytes() for f in corpus.rglob("*") if f.is_file()}
    code, err = refused(capsys, ["prepare", "--tokenizer", str(tmp_path / "tokenizer.json"), "--data", str(corpus),
                                 "--out", str(corpus / name)])
    assert code == 2 and "would overwrite the input" in err and name.split("/")[-1] in err
    assert {f: f.read_bytes() for f in corpus.rglob("*") if f.is_file()} == before


def test_prepare_refuses_to_replace_a_file_that_is_no_token_file(tmp_path, capsys, bpe):
    """--out naming a user's file (no sidecar beside it: not a token file) replaced it with tokens."""
    corpus, notes = tmp_path / "corpus.txt", tmp_path / "notes.md"
    corpus.write_text("\n".join(LINES) + "\n")
    notes.write_text("my notes\n")
    bpe.save(tmp_path / "tokenizer.json")
    before = sorted(tmp_path.iterdir())
    code, err = refused(capsys, ["prepare", "--tokenizer", str(tmp_path / "tokenizer.json"), "--data", str(corpus),
                                 "--out", str(notes)])
    assert code == 2 and "is not a token file" in err and notes.read_text() == "my notes\n"
    assert sorted(tmp_path.iterdir()) == before
    assert main(["prepare", "--tokenizer", str(tmp_path / "tokenizer.json"), "--data", str(corpus), "--out",
                 str(tmp_path / "t.bin")]) == 0
    assert main(["prepare", "--tokenizer", str(tmp_path / "tokenizer.json"), "--data", str(corpus), "--out",
                 str(tmp_path / "t.bin")]) == 0  # its own token file is prepared again


# ---- prepare's companion files -------------------------------------------------------------------
def test_prepare_refuses_to_replace_a_users_json_beside_the_token_file(tmp_path, capsys, bpe):
    """train.bin's sidecar is train.json: a user's own train.json there is not replaced, by prepare or
    by numlm prepare, and nothing is written."""
    user = tmp_path / "train.json"
    user.write_text('{"text": "my labelled example", "label": 1}\n')
    with pytest.raises(ValueError, match="is not a token file's sidecar"):
        prepare(LINES, bpe, tmp_path / "train.bin")
    tok = tmp_path / "tok" / "tokenizer.json"
    bpe.save(tok)
    (tmp_path / "corpus.txt").write_text("\n".join(LINES) + "\n")
    code, err = refused(capsys, ["prepare", "--tokenizer", str(tok), "--data", str(tmp_path / "corpus.txt"),
                                 "--out", str(tmp_path / "train.bin")])
    assert code == 2 and str(user) in err
    assert user.read_text() == '{"text": "my labelled example", "label": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "tok", "train.json"]


def test_two_token_files_of_one_stem_do_not_share_a_sidecar(tmp_path, bpe):
    """shak.train and shak.val would share shak.json and shak.docs.npy: the second is refused and the
    first still loads with its own documents; a token file prepared again replaces its own sidecar."""
    train_docs = [f"alpha document {i} " * 5 for i in range(30)]
    prepare(train_docs, bpe, tmp_path / "shak.train")
    tokens, starts = np.array(load_tokens(tmp_path / "shak.train")), load_document_starts(tmp_path / "shak.train")
    with pytest.raises(ValueError, match="'shak.train'"):
        prepare(LINES, bpe, tmp_path / "shak.val")
    assert not (tmp_path / "shak.val").exists()
    np.testing.assert_array_equal(load_tokens(tmp_path / "shak.train"), tokens)
    np.testing.assert_array_equal(load_document_starts(tmp_path / "shak.train"), starts)
    assert len(starts) == len(train_docs)
    meta = prepare(LINES, bpe, tmp_path / "shak.train")   # its own: replaced
    assert meta["num_documents"] == len(LINES) == len(load_document_starts(tmp_path / "shak.train"))


def test_a_sidecar_without_a_recorded_name_is_the_existing_token_files(tmp_path, bpe):
    """A sidecar written before prepare recorded the token file's name belongs to the token file beside
    it when that exists; without one it may be another's, and is not replaced."""
    prepare(LINES, bpe, tmp_path / "a.bin")
    side = tmp_path / "a.json"
    meta = json.loads(side.read_text())
    del meta["token_file"]
    side.write_text(json.dumps(meta))
    assert prepare(LINES[:2], bpe, tmp_path / "a.bin")["num_documents"] == 2
    side.write_text(json.dumps(meta))
    (tmp_path / "a.bin").unlink()
    with pytest.raises(ValueError, match="another token file"):
        prepare(LINES, bpe, tmp_path / "a.bin")
    assert json.loads(side.read_text()) == meta


def test_a_token_file_renamed_with_its_sidecar_is_prepared_again(tmp_path, capsys, bpe):
    """tokens.bin, .json and .docs.npy renamed together to other.*: other.json still records tokens.bin, so
    preparing other.bin again was refused as 'the sidecar of the token file tokens.bin; move it', though no
    tokens.bin is there. It now prepares; a sidecar whose token file is gone and that does not describe
    out_path is refused in one line naming the file to remove, and nothing is written."""
    prepare(LINES, bpe, tmp_path / "tokens.bin")
    tokens = np.array(load_tokens(tmp_path / "tokens.bin"))
    for f in list(tmp_path.glob("tokens.*")):
        f.rename(tmp_path / ("other" + f.name[len("tokens"):]))
    np.testing.assert_array_equal(load_tokens(tmp_path / "other.bin"), tokens)  # it loads as renamed
    meta = prepare(LINES[:2], bpe, tmp_path / "other.bin")
    assert meta["num_documents"] == 2 == len(load_document_starts(tmp_path / "other.bin"))
    assert json.loads((tmp_path / "other.json").read_text())["token_file"] == "other.bin"
    (tmp_path / "other.bin").rename(tmp_path / "kept.bin")  # other.json's token file is gone
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    tok = tmp_path / "tok" / "tokenizer.json"
    bpe.save(tok)
    (tmp_path / "corpus.txt").write_text("\n".join(LINES) + "\n")
    code, err = refused(capsys, ["prepare", "--tokenizer", str(tok), "--data", str(tmp_path / "corpus.txt"),
                                 "--out", str(tmp_path / "other.dat")])
    assert code == 2 and "'other.bin', which is not beside it" in err and f"remove {str(tmp_path / 'other.json')!r}" in err
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.name in before} == before
    assert not (tmp_path / "other.dat").exists()


# ---- a user's labelled file ----------------------------------------------------------------------
def write_rows(path, rows):
    """rows of (text, label) as a .csv (header text,label) or a .jsonl"""
    if path.suffix == ".csv":
        path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows))
    else:
        path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_repeated_column_or_key_is_refused(tmp_path, kind):
    """text,label,label (or {"label": 0, ..., "label": 7}) kept only the last label, silently."""
    from numlm.data.datasets import from_file
    rows = [(f"example {i}", i % 2, 7 + i % 3) for i in range(20)]
    path = tmp_path / f"dup.{kind}"
    if kind == "csv":
        path.write_text("text,label,label\n" + "".join(f"{t},{a},{b}\n" for t, a, b in rows))
        want = "line 1: the column 'label' appears twice"
    else:
        path.write_text("".join(f'{{"text": "{t}", "label": {a}, "label": {b}}}\n' for t, a, b in rows))
        want = "line 1: the key 'label' appears twice"
    with pytest.raises(ValueError, match=want):
        from_file(path)


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_mistyped_huge_integer_label_is_refused_naming_its_line(tmp_path, kind):
    """One label 100000000 among 0 and 1 made 100000001 classes (or a MemoryError)."""
    from numlm.data.datasets import from_file
    rows = [(f"example {i}", i % 2) for i in range(20)] + [("oops", 10 ** 8)]
    path = write_rows(tmp_path / f"labels.{kind}", rows)
    line = len(rows) + (kind == "csv")      # the header is line 1 of a csv
    with pytest.raises(ValueError, match=f"line {line}: label {10 ** 8} cannot be a class id"):
        from_file(path)


@pytest.mark.parametrize("kind, as_text", [("csv", True), ("jsonl", True), ("jsonl", False)])
def test_a_label_longer_than_python_converts_is_refused_naming_it(tmp_path, capsys, wordpiece, kind, as_text):
    """A label of 5000 digits (a number, or its text) got Python's own error, 'Exceeds the limit (4300 digits)
    for integer string conversion': from_file and numlm finetune name its line and the label, and the run
    writes nothing."""
    from numlm.data.datasets import from_file
    huge = "1" * 5000
    path = write_rows(tmp_path / f"labels.{kind}", [(f"example {i}", i % 2) for i in range(20)] + [("oops", huge)])
    if not as_text:  # a JSON number, not a string
        path.write_text(path.read_text().replace(f'"{huge}"', huge))
    want = rf"line {21 + (kind == 'csv')}: .*'111111111111'\.\.\. \(5000 digits\)"
    with pytest.raises(ValueError, match=want):
        from_file(path)
    model = tmp_path / "model"
    numlm.BertForSequenceClassification(numlm.BertConfig(
        vocab_size=wordpiece.vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=32), seed=0).save_pretrained(model)
    wordpiece.save(model)
    code, err = refused(capsys, ["finetune", "--data", str(path), "--out", str(tmp_path / "run"), str(model)])
    assert code == 2 and re.search(want, err) and "Exceeds the limit" not in err
    assert not (tmp_path / "run").exists()


def test_integer_labels_with_a_few_ids_missing_are_still_classes(tmp_path):
    """Labels 0, 1, 2 and 4 (3 absent from a small file) stay ids: 5 classes; sparse ids (0, 17, 23,
    31), which loaded before the typo check, still do."""
    from numlm.data.datasets import from_file
    for labels in ([0, 1, 2, 4], [0, 17, 23, 31]):
        rows = [(f"example {i}", labels[i % 4]) for i in range(20)]
        data = from_file(write_rows(tmp_path / "labels.csv", rows))
        assert data.label_names == [str(i) for i in range(max(labels) + 1)]


def test_a_csv_field_longer_than_pythons_default_limit_is_read(tmp_path):
    """A long article in one field is valid CSV; csv's default field limit (131072) refused it."""
    import csv
    from numlm.data.datasets import from_file
    limit = csv.field_size_limit()
    long_text = "word " * (limit // 5 + 1000)
    rows = [(f"example {i}", i % 2) for i in range(20)] + [(long_text.strip(), 1)]
    data = from_file(write_rows(tmp_path / "long.csv", rows))
    texts = [e["text"] for split in ("train", "validation", "test") for e in data.split(split)]
    assert long_text.strip() in texts and len(texts) == len(rows)
    assert csv.field_size_limit() == limit   # the process's csv setting is left as it was


# ---- tokenizer training arguments ----------------------------------------------------------------
@pytest.mark.parametrize("train, kw, want", [
    ("bpe", {"vocab_size": 10 ** 30}, "vocab_size must be an int in"),
    ("bpe", {"vocab_size": 300, "min_frequency": -1}, "min_frequency must be an int >= 0"),
    ("bpe", {"vocab_size": 300, "min_frequency": 0.5}, "min_frequency must be an int >= 0"),
    ("wordpiece", {"vocab_size": 60, "min_frequency": "x"}, "min_frequency must be an int >= 0"),
    ("wordpiece", {"vocab_size": 60, "lowercase": "no"}, "lowercase must be True or False")])
def test_tokenizer_training_arguments_are_checked(train, kw, want):
    """An overflow, a silently truncated min_frequency and a TypeError became one ValueError each."""
    fn = Tokenizer.train_bpe_from_iterator if train == "bpe" else Tokenizer.train_wordpiece_from_iterator
    with pytest.raises(ValueError, match=want):
        fn(LINES, **kw)


def test_tokenizer_train_cli_refuses_a_huge_vocab_size_in_one_line(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(LINES) + "\n")
    code, err = refused(capsys, ["tokenizer", "train", "--vocab-size", str(10 ** 20), "--data", str(data),
                                 "--out", str(tmp_path / "tok.json")])
    assert code == 2 and "vocab_size must be an int in" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_a_white_space_only_training_file_is_empty(tmp_path):
    """The iterator refused a corpus of white space; the file path trained an alphabet-only tokenizer."""
    f = tmp_path / "blank.txt"
    f.write_text(" \n\t\n\n")
    with pytest.raises(ValueError, match="no text other than white space"):
        Tokenizer.train_bpe(f, vocab_size=300)


# ---- prepare's arguments and reading its files back --------------------------------------------------
@pytest.mark.parametrize("kw, want", [
    ({"separator": "big"}, "separator must be"), ({"separator": -1}, "separator must be"),
    ({"batch_docs": 0}, "batch_docs must be a positive int"), ({"batch_docs": 1.5}, "batch_docs must be a positive int")])
def test_prepare_arguments_are_checked_before_anything_is_written(tmp_path, bpe, kw, want):
    with pytest.raises(ValueError, match=want):
        prepare(LINES, bpe, tmp_path / "t.bin", **kw)
    assert list(tmp_path.iterdir()) == []


def test_prepare_refuses_a_separator_outside_the_vocabulary(tmp_path, bpe):
    """A separator id >= vocab_size was written into the token file (or overflowed its dtype)."""
    for sep in (bpe.vocab_size, 70000):
        with pytest.raises(ValueError, match=f"token id in \\[0, {bpe.vocab_size}\\), got {sep}"):
            prepare(LINES, bpe, tmp_path / "t.bin", separator=sep)
    assert list(tmp_path.iterdir()) == []
    last = bpe.vocab_size - 1
    prepare(LINES, bpe, tmp_path / "t.bin", separator=last)
    starts = load_document_starts(tmp_path / "t.bin")
    np.testing.assert_array_equal(np.asarray(load_tokens(tmp_path / "t.bin"))[starts[1:] - 1], last)


@pytest.mark.parametrize("damage, want", [
    (lambda d: (d / "t.json").write_text('{"dtype": "bogus", "length": 3, "num_documents": 1}'), "t.json' is not a token file's sidecar"),
    (lambda d: (d / "t.json").write_text('{"length": 3}'), "t.json' is not a token file's sidecar"),
    (lambda d: (d / "t.docs.npy").unlink(), "no document starts"),
    (lambda d: (d / "t.docs.npy").write_bytes(b"garbage"), "t.docs.npy' is damaged")])
def test_a_damaged_sidecar_or_document_starts_file_is_named(tmp_path, bpe, damage, want):
    prepare(LINES, bpe, tmp_path / "t.bin")
    damage(tmp_path)
    with pytest.raises(ValueError, match=want):
        load_document_starts(tmp_path / "t.bin")


@pytest.mark.parametrize("content, match", [
    (b"a\nb\n", r"vocab.txt' has no \[CLS\] or \[SEP\] token"),
    (b"", r"vocab.txt' has no \[CLS\] or \[SEP\] token"),
    (b"\xff\xfe\x00a\n", "holds a vocabulary the tokenizer cannot read .*UTF-8"),
])
def test_a_vocab_txt_the_tokenizer_cannot_read_is_one_line(tmp_path, content, match):
    """Tokenizer.from_dir raised the tokenizers package's TypeError or bare Exception."""
    (tmp_path / "vocab.txt").write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(e.value)


def test_batch_helpers_refuse_arguments_by_name():
    """They raised TypeErrors (None as an id, an int as the special ids, a str probability) or yielded
    nothing for a negative count."""
    from numlm.data import NSPPair, causal_lm_batches, mask_tokens, nsp_batch, nsp_pairs
    pairs = [NSPPair(np.array([5, 6]), np.array([7]), 0)]
    for kw, match in [(dict(cls_id=None, sep_id=2), "cls_id must be a token id"),
                      (dict(cls_id=1, sep_id=2, pad_id=None), "pad_id must be a token id")]:
        with pytest.raises(ValueError, match=match):
            nsp_batch(pairs, **kw)
    with pytest.raises(ValueError, match="special_mask_or_ids must be a bool mask or a collection"):
        mask_tokens(np.array([[5, 6, 7]]), 3, 4, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="short_seq_prob must lie in"):
        nsp_pairs([[[1, 2, 3]], [[4, 5, 6]]], 16, np.random.default_rng(0), short_seq_prob="0.1")
    for n in (-1, 1.5, "x"):
        with pytest.raises(ValueError, match="num_batches must be a positive int"):
            next(causal_lm_batches(np.arange(100), 8, 2, 0, num_batches=n))


def test_a_failed_folder_save_keeps_the_tokenizer_and_its_config_together(tmp_path, wordpiece):
    """Saved into a folder, tokenizer.json and tokenizer_config.json are both new or both as they were
    (the config is written aside first, so a full disk there changes nothing either; a size limit can
    only fail the larger tokenizer.json, which this checks)."""
    wordpiece.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    r = subprocess.run([sys.executable, "-c", SAVE_WITH_SMALL_FILE_LIMIT, str(tmp_path),
                        str(len(before["tokenizer.json"]))], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "cannot write" in r.stdout
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_inputs_that_loaded_before_the_checks_still_load():
    """The new checks kept what transformers' files and numpy callers give: bool fields as 0/1/null, a
    seed None, texts as an array or a generator, normalize as 0/1."""
    import numlm
    from numlm.models import GPT2Config
    cfg = GPT2Config.from_dict({"vocab_size": 50, "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2,
                                "scale_attn_weights": 1, "use_cache": None, "tie_word_embeddings": 0})
    assert not cfg.tie_word_embeddings and cfg.scale_attn_weights
    numlm.GPT2LMHeadModel(cfg, seed=None)
    tok = Tokenizer.train_wordpiece_from_iterator(LINES * 3, vocab_size=60, min_frequency=1)
    bert = numlm.BertForSequenceClassification(numlm.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=64), seed=1).eval()
    texts = np.array(LINES[:2])
    want = numlm.classify(bert, tok, list(texts))
    assert [r["label"] for r in numlm.classify(bert, tok, texts)] == [r["label"] for r in want]
    assert len(numlm.classify(bert, tok, (t for t in LINES[:2]))) == 2
    np.testing.assert_array_equal(numlm.embed(bert.bert, tok, LINES[:2], normalize=1),
                                  numlm.embed(bert.bert, tok, LINES[:2], normalize=True))
