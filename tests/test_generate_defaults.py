"""generate's defaults and edge cases: left padding under the repetition penalty, generation_config.json,
the double-heads models, non-finite logits, and the refusals of odd arguments."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import numlm
from numlm.decoding import generate, repetition_penalty

TINY = Path(__file__).parent / "fixtures" / "hf" / "gpt2-tiny"


@pytest.fixture(scope="module")
def gpt():
    return numlm.from_pretrained(TINY, dtype="float64")


ROW, PAD = [5, 7, 9, 11], 12
PADDED = (np.array([[PAD, PAD] + ROW, [1, 2, 3, 4, 5, 6]]), np.array([[0, 0, 1, 1, 1, 1], [1] * 6]))


@pytest.mark.parametrize("kw, pad", [(dict(), PAD), (dict(num_beams=3), 33)])
def test_repetition_penalty_skips_left_padding(gpt, kw, pad):
    """a left-padded row decodes as the row alone: the pads are not tokens seen (transformers'
    prompt_ignore_length). Counted, pad id 12 changed the greedy run's last tokens, 33 the beams' first."""
    common = dict(max_new_tokens=12, repetition_penalty=1.3, pad_token_id=pad, eos_token_id=98, **kw)
    alone = generate(gpt, np.array([ROW]), np.ones((1, 4), int), **common)[0, 4:]
    padded = generate(gpt, np.where(PADDED[1] == 0, pad, PADDED[0]), PADDED[1], **common)[0, 6:]
    np.testing.assert_array_equal(padded[:len(alone)], alone)


def test_repetition_penalty_skips_left_padding_when_sampling(gpt):
    """sampling's processed scores of a padded row are the row's alone (its draws differ: a batch of two
    takes two numbers a step)"""
    common = dict(max_new_tokens=1, repetition_penalty=1.3, pad_token_id=PAD, eos_token_id=98, do_sample=True,
                  top_k=None, seed=0, return_dict_in_generate=True, output_scores=True)
    alone = generate(gpt, np.array([ROW]), np.ones((1, 4), int), **common).scores[0][0]
    padded = generate(gpt, *PADDED, **common).scores[0][0]
    np.testing.assert_allclose(padded, alone, rtol=1e-6)


def test_repetition_penalty_pads_argument():
    """repetition_penalty(pads=) leaves a row's first pads[b] positions out, and only those"""
    rng = np.random.default_rng(0)
    s, ids = rng.standard_normal((2, 9)), np.array([[3, 4, 3, 5], [1, 2, 3, 8]])
    got = repetition_penalty(s, ids, 2.0, pads=np.array([2, 0]))
    want = np.stack([repetition_penalty(s[:1], ids[:1, 2:], 2.0)[0], repetition_penalty(s[1:], ids[1:], 2.0)[0]])
    np.testing.assert_array_equal(got, want)
    assert got[0, 3] != s[0, 3] and got[0, 5] != s[0, 5]  # 3 is also among the row's real tokens
    assert got[0, 4] == s[0, 4] and got[1, 4] == s[1, 4]  # 4 only among its pads


def _first_new(tokens, eos):
    """the first token after the first that none before it is, nor eos: a stop the run meets there"""
    k = next(k for k in range(1, len(tokens)) if tokens[k] not in tokens[:k] and tokens[k] != eos)
    return k, int(tokens[k])


def _saved(gpt, folder, gen):
    gpt.save_pretrained(folder)
    (Path(folder) / "generation_config.json").write_text(json.dumps(gen))
    return folder


def test_generation_config_eos_is_generates_default(gpt, tmp_path):
    """generation_config.json's eos_token_id (a list) is the default: generation stops at a token the
    free run produced, which the config's own eos does not name"""
    ids = np.array([[5, 7, 9, 11]])
    free = generate(gpt, ids, max_new_tokens=12, eos_token_id=[])[0, 4:]
    k, stop = _first_new(free, gpt.config.eos_token_id)
    model = numlm.from_pretrained(_saved(gpt, tmp_path / "m", {"eos_token_id": [97, stop]}), dtype="float64")
    out = generate(model, ids, max_new_tokens=12)[0, 4:]
    np.testing.assert_array_equal(out, free[:k + 1])
    # an explicit eos_token_id still wins; a re-saved model keeps the file
    assert len(generate(model, ids, max_new_tokens=12, eos_token_id=[])[0]) == 16
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text()) == {"eos_token_id": [97, stop]}


def test_generation_config_other_settings_warn(gpt, tmp_path):
    """settings generate takes only as arguments are named on load; token ids and defaults are not"""
    folder = _saved(gpt, tmp_path / "m", {"eos_token_id": 3, "do_sample": True, "top_p": 0.9, "num_beams": 1,
                                          "transformers_version": "4.57.6"})
    with pytest.warns(UserWarning, match=r"do_sample=True, top_p=0\.9: numlm's generate takes only the token ids"):
        numlm.from_pretrained(folder)
    quiet = _saved(gpt, tmp_path / "q", {"bos_token_id": 1, "eos_token_id": 3, "_from_model_config": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert numlm.from_pretrained(quiet).generation_config["eos_token_id"] == 3


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=2), dict(use_cache=False)])
def test_double_heads_generate_as_their_lm(tmp_path, kw):
    """a double-heads model generates from (B, T) prompts as the LM head model with its weights does"""
    cfg = numlm.GPT2Config(vocab_size=60, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    dh = numlm.GPT2DoubleHeadsModel(cfg, seed=3, dtype="float64")
    dh.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="multiple_choice_head"):
        lm = numlm.GPT2LMHeadModel.from_pretrained(tmp_path, dtype="float64")
    ids = np.array([[4, 9, 2], [7, 1, 3]])
    got = generate(dh, ids, max_new_tokens=6, eos_token_id=[], **kw)
    np.testing.assert_array_equal(got, generate(lm, ids, max_new_tokens=6, eos_token_id=[], **kw))
    assert got.shape == (2, 9)


def test_infinite_logits_are_refused(gpt):
    """logits that overflow to inf stop every search with one error; before, beam search returned the
    bare prompt"""
    model = numlm.from_pretrained(TINY, dtype="float32")
    w = model.transformer.ln_f.params["weight"]
    w[...] = 0
    w[3] = 3e38
    model.transformer.ln_f.params["bias"][...] = 0
    for kw in (dict(), dict(num_beams=2), dict(do_sample=True, seed=0)):
        with pytest.raises(ValueError, match="logits hold inf"):
            generate(model, np.array([[5, 7, 9, 11]]), max_new_tokens=3, **kw)


@pytest.mark.parametrize("kw, match", [(dict(do_sample=True, temperature=1e-40), "temperature=1e-40"),
                                      (dict(do_sample=True, temperature=1e-10), "temperature=1e-10"),
                                      (dict(length_penalty=-10.0), "length_penalty=-10.0")])
def test_beam_scores_at_the_empty_hypotheses_score_are_refused(gpt, kw, match):
    """sum(log p) / length ** length_penalty at or below -1e9, the score beam search gives the empty
    hypotheses it starts from: the bare prompt came back, scored -1e9, with no error. Above it, scores of
    that size still search (a temperature of 1e-8 gives the beams of greedy beam search)."""
    prompt, args = np.array([[5, 7, 9, 11]]), dict(max_new_tokens=20, num_beams=3, eos_token_id=98,
                                                   return_dict_in_generate=True)
    with pytest.raises(ValueError, match=match):
        generate(gpt, prompt, **args, **kw)
    cold = generate(gpt, prompt, **args, do_sample=True, temperature=1e-8, seed=0)
    np.testing.assert_array_equal(cold.sequences, generate(gpt, prompt, **args).sequences)
    assert cold.sequences.shape == (1, 24) and -1e9 < cold.sequences_scores[0] < -1e6


@pytest.mark.parametrize("kw", [dict(do_sample=True, top_k=2, seed=0), dict(suppress_tokens=list(range(2, 99)))])
def test_fewer_hypotheses_than_asked_are_named_as_such(gpt, kw):
    """Two tokens pass a step, so one new token gives two hypotheses: asked for four, the search was refused
    as if it had found none ("no hypothesis scored above -1e9 ... length_penalty"); it names
    num_return_sequences, and two are returned"""
    args = dict(max_new_tokens=1, num_beams=4, eos_token_id=[], return_dict_in_generate=True, **kw)
    with pytest.raises(ValueError, match="only 2 hypotheses .* fewer than num_return_sequences=4"):
        generate(gpt, np.array([[5, 7, 9]]), num_return_sequences=4, **args)
    two = generate(gpt, np.array([[5, 7, 9]]), num_return_sequences=2, **args)
    assert two.sequences.shape == (2, 4) and (two.sequences_scores > -1e9).all()


@pytest.mark.parametrize("kw, match", [
    (dict(eos_token_id=[3, None]), None),
    (dict(suppress_tokens=3), None),
    (dict(input_ids=np.array([[2 ** 64 - 1]], dtype=np.uint64)), "below 2\\*\\*63"),
    (dict(attention_mask=[[1, 1, 1, 1], [1]]), "attention_mask must be a rectangular"),
])
def test_odd_arguments(gpt, kw, match):
    args = dict(input_ids=np.array([[5, 7, 9, 11]]), max_new_tokens=2)
    args.update(kw)
    ids = args.pop("input_ids")
    if match is None:  # accepted: a None among the eos ids is skipped; one id is a list of one
        out = generate(gpt, ids, **args)
        assert out.shape == (1, 6)
        if "suppress_tokens" in kw:
            assert 3 not in out[0, 4:]
        return
    with pytest.raises(ValueError, match=match):
        generate(gpt, ids, **args)


def test_cli_generate_reads_generation_config(tmp_path, capsys):
    """numlm generate stops at generation_config.json's eos: a token the free run printed"""
    from numlm.cli import main
    from numlm.data.tokenizer import Tokenizer
    texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 4
    tok = Tokenizer.train_bpe_from_iterator(texts, vocab_size=280, min_frequency=1)
    cfg = numlm.GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                           eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    model = numlm.GPT2LMHeadModel(cfg, seed=3, dtype="float32")  # its greedy run turns to a new token
    ids = tok.encode("the cat", add_special_tokens=False)
    free = generate(model, [ids], max_new_tokens=12, eos_token_id=[])[0, len(ids):]
    k, stop = _first_new(free, tok.eos_id)
    _saved(model, tmp_path, {"eos_token_id": [tok.eos_id, stop]})
    tok.save(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == "the cat" + tok.decode(free[:k + 1]) + "\n"


@pytest.mark.parametrize("gen", [{"eos_token_id": "49"}, {"eos_token_id": 49.0}, {"eos_token_id": -5},
                                 {"eos_token_id": [3, "x"]}, {"pad_token_id": "x"}, {"bos_token_id": True}])
def test_generation_config_ids_are_token_ids(gpt, tmp_path, gen):
    """a token id in generation_config.json that is not one is refused on load, naming the file ("49" had
    been read as the ids 4 and 9)"""
    with pytest.raises(ValueError, match=r"generation_config.json'?: \w+_token_id must be a token id"):
        numlm.from_pretrained(_saved(gpt, tmp_path, gen))


def test_a_model_without_one_removes_the_folders_generation_config(gpt, tmp_path):
    """saving a model with no generation config over a folder that has one leaves none: the earlier
    model's eos would have become this one's"""
    _saved(gpt, tmp_path, {"eos_token_id": 98})
    fresh = numlm.GPT2LMHeadModel(gpt.config, seed=5, dtype="float64")
    fresh.save_pretrained(tmp_path)
    assert not (tmp_path / "generation_config.json").exists()
    assert numlm.from_pretrained(tmp_path).generation_config is None


def test_encoders_never_read_a_generation_config(tmp_path):
    """only models that generate read generation_config.json: a BERT folder with a malformed one, or one
    with sampling settings, loads without a word, as in transformers"""
    cfg = numlm.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    numlm.BertForMaskedLM(cfg, seed=0).save_pretrained(tmp_path)
    for text in ("{not json", json.dumps({"do_sample": True, "eos_token_id": "x"})):
        (tmp_path / "generation_config.json").write_text(text)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert numlm.from_pretrained(tmp_path).generation_config is None
