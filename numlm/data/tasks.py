"""GPT-1's input transformations for fine-tuning (Radford et al. 2018, section 3.3): every task
becomes token sequences the pre-trained decoder reads left to right, framed by a start token, a
delimiter and an extract token whose final hidden state feeds the task head.

    classification  [start] text [extract]
    entailment      [start] premise [delim] hypothesis [extract]
    similarity      [start] a [delim] b [extract]  and  [start] b [delim] a [extract]   (both orders;
                    GPT-1 adds their two representations, i.e. sums the two scores up to a bias)
    multiple choice [start] context [delim] answer_k [extract]   for every answer k

`pack_choices` pads a batch of such sequence lists into the (B, N, T) arrays the double-heads models
take: input_ids, attention_mask, mc_token_ids (the extract token's position) and LM labels.
"""
import numpy as np

from ..ops._check import int_array
from ..ops import IGNORE_INDEX


def _seq(name, ids):
    ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if ids.size == 0:
        return []
    ids = int_array(name, ids)
    if ids.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {ids.shape}")
    return [int(i) for i in ids]


def classification_input(text, start, extract):
    """[start] text [extract]"""
    return [start, *_seq("text", text), extract]


def entailment_input(premise, hypothesis, start, delim, extract):
    """[start] premise [delim] hypothesis [extract]"""
    return [start, *_seq("premise", premise), delim, *_seq("hypothesis", hypothesis), extract]


def similarity_inputs(a, b, start, delim, extract):
    """Both orders, as two choices of one example: there is no inherent order between a and b."""
    return [entailment_input(a, b, start, delim, extract), entailment_input(b, a, start, delim, extract)]


def multiple_choice_inputs(context, answers, start, delim, extract):
    """One sequence per answer: [start] context [delim] answer [extract]"""
    if len(answers) < 1:
        raise ValueError("answers must hold at least one answer")
    return [entailment_input(context, ans, start, delim, extract) for ans in answers]


def pack_choices(examples, pad_id, max_length=None):
    """Pad a batch of examples, each a list of N token sequences (N the same for all), on the right.
    -> input_ids, attention_mask, labels (input_ids with -100 at padding, for the LM auxiliary loss
    L1) of shape (B, N, T) and mc_token_ids (B, N): the position of each sequence's last token (the
    extract token). Sequences longer than max_length are refused, not cut: cutting would drop the
    extract token the head reads."""
    if not examples:
        raise ValueError("examples is empty")
    N = len(examples[0])
    for b, ex in enumerate(examples):
        if len(ex) != N or N == 0:
            raise ValueError(f"every example needs the same number of choices ({N}); example {b} has {len(ex)}")
    seqs = [[_seq(f"examples[{b}][{n}]", s) for n, s in enumerate(ex)] for b, ex in enumerate(examples)]
    T = max(len(s) for ex in seqs for s in ex)
    if max_length is not None:
        if T > max_length:
            raise ValueError(f"a sequence has {T} tokens, more than max_length={max_length}")
        T = max_length
    B = len(seqs)
    input_ids = np.full((B, N, T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, N, T), dtype=np.int64)
    mc_token_ids = np.zeros((B, N), dtype=np.int64)
    for b, ex in enumerate(seqs):
        for n, s in enumerate(ex):
            if not s:
                raise ValueError(f"examples[{b}][{n}] is empty")
            input_ids[b, n, :len(s)] = s
            attention_mask[b, n, :len(s)] = 1
            mc_token_ids[b, n] = len(s) - 1
    labels = np.where(attention_mask == 1, input_ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "mc_token_ids": mc_token_ids}
