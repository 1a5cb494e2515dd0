"""The pre-training recipes' data splits and `numlm eval` on small or odd corpora: validation is held
out, eval scores what it says, and a corpus too small for a split is refused in one line."""
import json

import numpy as np
import pytest

from numlm import from_pretrained
from numlm.cli import main
from numlm.data import Tokenizer, prepare, load_tokens
from numlm.recipes import BertData, GPTData, pretrain


def quiet(*a, **k):
    pass


def documents(n, lines=12):
    return ["\n".join(f"sentence {d} {i} tells of the {d * i % 7} kings and {i % 5} queens" for i in range(lines))
            for d in range(n)]


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    path = tmp_path_factory.mktemp("wp") / "wordpiece.json"
    Tokenizer.train_wordpiece_from_iterator(documents(12), 300).save(path)
    return path


def bert_rows(batches, tok):
    """Each row of the batches with its masked tokens put back, as a tuple of ids."""
    rows = []
    for b in batches:
        for ids, lab, m in zip(b["input_ids"], b["labels"], b["attention_mask"]):
            row = np.where(lab != -100, lab, ids)[:int(m.sum())]
            rows.append(tuple(int(x) for x in row))
    return rows


def test_gpt_short_last_document_falls_back_to_a_cut_inside_a_document():
    tokens = np.arange(1000) % 50
    cut = int(round(len(tokens) * 0.9))  # the intended 10%
    for last in (980, 990):  # a last document of one block, and of less than a block
        d = GPTData(tokens, [0, last], 16, 2, 0)
        assert d.val_tokens == len(tokens) - cut and d.train_tokens == cut


def test_gpt_aligned_split_is_kept_when_near_the_fraction():
    tokens = np.arange(1000) % 50
    d = GPTData(tokens, [0, 400, 920], 16, 2, 0)
    assert d.val_tokens == 1000 - 920


def test_gpt_corpus_too_small_for_a_block_says_so():
    with pytest.raises(ValueError, match=r"has 100 tokens.*block_size=16"):
        GPTData(np.arange(100) % 50, [0], 16, 2, 0)
