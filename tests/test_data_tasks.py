"""GPT-1's task input transformations and their packing for the double-heads models."""
import numpy as np
import pytest

import numlm
from numlm.data import (classification_input, entailment_input, similarity_inputs, multiple_choice_inputs,
                        pack_choices)

S, D, E, PAD = 1, 2, 3, 0  # start, delimiter, extract, padding ids of these tests


def test_layouts_follow_the_paper():
    assert classification_input([7, 8], S, E) == [1, 7, 8, 3]
    assert entailment_input([7], [8, 9], S, D, E) == [1, 7, 2, 8, 9, 3]
    assert similarity_inputs([7], [8, 9], S, D, E) == [[1, 7, 2, 8, 9, 3], [1, 8, 9, 2, 7, 3]]
    assert multiple_choice_inputs([7, 7], [[8], [9, 9]], S, D, E) == [[1, 7, 7, 2, 8, 3], [1, 7, 7, 2, 9, 9, 3]]


def test_pack_choices_pads_and_points_at_the_extract_token():
    ex = [multiple_choice_inputs([5, 6, 7], [[8], [9, 10, 11]], S, D, E),
          multiple_choice_inputs([5], [[12, 13], [14]], S, D, E)]
    b = pack_choices(ex, PAD)
    assert b["input_ids"].shape == b["attention_mask"].shape == b["labels"].shape == (2, 2, 9)
    for i, example in enumerate(ex):
        for n, seq in enumerate(example):
            L = len(seq)
            assert b["input_ids"][i, n, :L].tolist() == seq and (b["input_ids"][i, n, L:] == PAD).all()
            assert b["attention_mask"][i, n].tolist() == [1] * L + [0] * (9 - L)
            assert b["labels"][i, n].tolist() == seq + [-100] * (9 - L)
            assert b["mc_token_ids"][i, n] == L - 1 and b["input_ids"][i, n, L - 1] == E
    assert pack_choices(ex, PAD, max_length=12)["input_ids"].shape == (2, 2, 12)


def test_pack_choices_bad_input():
    with pytest.raises(ValueError, match="same number of choices"):
        pack_choices([[[1, 2]], [[1, 2], [3]]], PAD)
    with pytest.raises(ValueError, match="max_length"):
        pack_choices([[[1, 2, 3, 4]]], PAD, max_length=3)
    with pytest.raises(ValueError, match="empty"):
        pack_choices([], PAD)
    with pytest.raises(ValueError, match="at least one answer"):
        multiple_choice_inputs([5], [], S, D, E)
    with pytest.raises(ValueError, match="integers"):
        classification_input([1.5], S, E)


def tiny_double_heads(dropout=0.0):
    cfg = numlm.OpenAIGPTConfig(vocab_size=20, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                summary_first_dropout=dropout, initializer_range=0.3)  # O(1) gradients
    return numlm.OpenAIGPTDoubleHeadsModel(cfg, seed=1, dtype="float64")


def test_similarity_scores_sum_to_the_head_on_summed_representations():
    """GPT-1 adds the two orders' extract-token states before its linear head: the sum of the two
    per-order scores is that, up to the doubled bias."""
    model = tiny_double_heads().eval()
    b = pack_choices([similarity_inputs([5, 6], [7, 8, 9], S, D, E), similarity_inputs([10], [11], S, D, E)], PAD)
    out = model(b["input_ids"], attention_mask=b["attention_mask"], mc_token_ids=b["mc_token_ids"],
                output_hidden_states=True)
    h = out.hidden_states[-1].reshape(b["input_ids"].shape + (-1,))  # (B, 2, T, C)
    W = model.state_dict()["multiple_choice_head.summary.weight"]   # (1, C), transformers' layout
    bias = model.state_dict()["multiple_choice_head.summary.bias"]
    for i in range(2):
        summed = h[i, 0, b["mc_token_ids"][i, 0]] + h[i, 1, b["mc_token_ids"][i, 1]]
        np.testing.assert_allclose(out.mc_logits[i].sum(), W[0] @ summed + 2 * bias[0], rtol=1e-12)


def test_l3_objective_on_packed_multiple_choice_gradchecks():
    """L3 = L2 + lambda L1 on a packed multiple-choice batch, dropout on: gradients by hand = numerical."""
    model = tiny_double_heads(dropout=0.1).train()
    b = pack_choices([multiple_choice_inputs([5, 6], [[7], [8, 9], [10]], S, D, E),
                      multiple_choice_inputs([11], [[12, 13], [14], [15, 16]], S, D, E)], PAD)
    inputs = dict(b, mc_labels=np.array([1, 2]), lm_coef=0.5)
    out = model(**inputs)
    assert out.mc_logits.shape == (2, 3) and np.isfinite(out.loss) and np.isfinite(out.mc_loss)
    errors = numlm.gradcheck(model, inputs, max_entries=4, eps=1e-5)
    zero = "param:multiple_choice_head.summary.bias"  # one bias shared by all choices: softmax-invariant
    assert max(v for k, v in errors.items() if k != zero) < 1e-7
    # that bias gets no gradient from the choice loss, and the LM loss does not reach it
    assert np.abs(model.gradients()["multiple_choice_head.summary.bias"]).max() < 1e-12
