"""Models, inference and adapters under a fault pass: each defect it found, refused or fixed here,
and each test failed on the code before its fix."""
import json
import re

import numpy as np
import pytest

import numlm
from numlm import peft
from numlm.data import Tokenizer
from numlm.inference import pool
from numlm.inspect import attention_maps, check_model

TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the mat is on the floor"] * 4


def bert_cfg(V=60, **kw):
    return numlm.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=24, max_position_embeddings=32, **kw)


def gpt_cfg(V=50, **kw):
    return numlm.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, **kw)


@pytest.fixture(scope="module")
def wp():
    return Tokenizer.train_wordpiece_from_iterator(TEXTS, vocab_size=60, min_frequency=1)


def test_inference_runs_in_eval_mode_and_keeps_the_models_mode(wp):
    """A freshly built model trains (dropout on): predict, fill_mask, embed and generate gave a new answer
    each call. They answer as the model in eval mode does, and leave it training."""
    cls = numlm.BertForSequenceClassification(bert_cfg(wp.vocab_size), seed=1, dtype="float64")
    mlm = numlm.BertForMaskedLM(bert_cfg(wp.vocab_size), seed=1, dtype="float64")
    gpt = numlm.GPT2LMHeadModel(gpt_cfg(), seed=1, dtype="float64")
    calls = [(cls, lambda: numlm.predict(cls, [[2, 5, 6, 3]]).probs),
             (mlm, lambda: numlm.fill_mask(mlm, wp, "the [MASK] sat")[0][0]["score"]),
             (mlm, lambda: numlm.embed(mlm.bert, wp, ["the cat sat"])),
             (gpt, lambda: numlm.generate(gpt, [[1, 2, 3]], max_new_tokens=8))]
    for model, call in calls:
        assert model.training
        first = call()
        assert model.training and all(m.training for _, m in model.modules())
        model.eval()
        np.testing.assert_array_equal(call(), first)
        model.train()
    attention_maps(mlm, wp, "the cat")
    assert mlm.training


def test_fill_mask_and_embeddings_of_an_adapted_encoder(wp):
    """A PeftModel was refused as having no masked-LM head or encoder: LoRA fill-masks and embeds
    through its adapted layers, prompt tuning fill-masks past its virtual tokens, and embeddings of a
    prompt- or prefix-tuned encoder are refused by name."""
    def mlm():
        return numlm.BertForMaskedLM(bert_cfg(wp.vocab_size), seed=1, dtype="float64").eval()
    lora = peft.get_peft_model(mlm(), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                      init_lora_weights=False), seed=3).eval()
    ids = np.array([wp.encode("the [MASK] sat")])
    t = int(np.flatnonzero(ids[0] == wp.mask_id)[0])
    p = numlm.ops.softmax(lora(ids).logits[0, t])
    best = numlm.fill_mask(lora, wp, "the [MASK] sat", top_k=1)[0][0]
    assert best["token_id"] == int(np.argmax(p)) and best["score"] == pytest.approx(p.max(), rel=1e-12)
    assert best["score"] != pytest.approx(numlm.fill_mask(mlm(), wp, "the [MASK] sat", top_k=1)[0][0]["score"])
    h = lora.base_model.bert(ids).last_hidden_state.mean(axis=1)
    np.testing.assert_allclose(numlm.sentence_embeddings(lora, ids), h, rtol=1e-12)
    prompt = peft.get_peft_model(mlm(), peft.PromptTuningConfig(num_virtual_tokens=3), seed=3).eval()
    want = numlm.ops.softmax(prompt(ids).logits[0, 3 + t])
    got = numlm.fill_mask(prompt, wp, "the [MASK] sat", top_k=1)[0][0]
    assert got["token_id"] == int(np.argmax(want)) and got["score"] == pytest.approx(want.max(), rel=1e-12)
    for config in (peft.PromptTuningConfig(num_virtual_tokens=3), peft.PrefixTuningConfig(num_virtual_tokens=3)):
        with pytest.raises(ValueError, match="sentence embeddings of a (prompt|prefix) tuning PeftModel"):
            numlm.sentence_embeddings(peft.get_peft_model(mlm(), config), ids)


def test_a_padded_vocabulary_is_never_a_candidate(wp, tmp_path, capsys):
    """A model table larger than its tokenizer's vocabulary: fill_mask offers only ids the tokenizer
    has, generate suppresses the others (suppress_tokens), and `numlm generate` no longer dies mid-text."""
    mlm = numlm.BertForMaskedLM(bert_cfg(wp.vocab_size + 40), seed=1).eval()
    mlm.cls.predictions.params["bias"][wp.vocab_size:] = 50.0  # the padded rows would win every time
    rows = numlm.fill_mask(mlm, wp, "the [MASK] sat", top_k=3)[0]
    assert all(r["token_id"] < wp.vocab_size for r in rows)
    g = numlm.GPT2LMHeadModel(gpt_cfg(60), seed=1).eval()
    g.transformer.wte.params["weight"][40:] *= 30.0
    free = numlm.generate(g, [[1, 2]], max_new_tokens=6, eos_token_id=[])
    assert (free[0, 2:] >= 40).any()  # without suppression the padded rows are chosen
    out = numlm.generate(g, [[1, 2]], max_new_tokens=6, eos_token_id=[], suppress_tokens=range(40, 60))
    assert (out[0, 2:] < 40).all()
    with pytest.raises(ValueError, match="suppress_tokens must be token ids in"):
        numlm.generate(g, [[1, 2]], max_new_tokens=2, suppress_tokens=[60])
    with pytest.raises(ValueError, match="leaves no token"):
        numlm.generate(g, [[1, 2]], max_new_tokens=2, suppress_tokens=range(60))
    tok = Tokenizer.train_bpe_from_iterator(TEXTS, vocab_size=270, min_frequency=1)
    big = numlm.GPT2LMHeadModel(gpt_cfg(tok.vocab_size + 30, eos_token_id=tok.eos_id), seed=2).eval()
    big.transformer.wte.params["weight"][tok.vocab_size:] *= 30.0
    big.save_pretrained(tmp_path / "g")
    tok.save(tmp_path / "g")
    from numlm.cli import main
    assert main(["generate", str(tmp_path / "g"), "--prompt", "the cat", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("the cat")


def test_id2label_sets_the_number_of_labels(tmp_path):
    """from_pretrained(id2label=3 names) kept the file's 2 labels (names from the wrong map, lost on
    save): the names given are the labels, as in transformers, so a 2-label head no longer fits."""
    numlm.BertForSequenceClassification(bert_cfg(), seed=1).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="wrong shape: classifier.weight"):
        numlm.BertForSequenceClassification.from_pretrained(tmp_path / "m", id2label={0: "neg", 1: "neu", 2: "pos"})
    with pytest.raises(ValueError, match="num_labels=2 but id2label names 3 labels"):
        numlm.BertForSequenceClassification.from_pretrained(tmp_path / "m", num_labels=2,
                                                            id2label={0: "neg", 1: "neu", 2: "pos"})
    m = numlm.BertForSequenceClassification.from_pretrained(tmp_path / "m", id2label={0: "neg", 1: "pos"})
    m.save_pretrained(tmp_path / "named")
    saved = json.loads((tmp_path / "named" / "config.json").read_text())
    assert saved["id2label"] == {"0": "neg", "1": "pos"} and saved["label2id"] == {"neg": 0, "pos": 1}


@pytest.mark.parametrize("key, shown", [("1" * 5000, r"'111111111111'\.\.\. \(5000 characters\)"),
                                        ("neg", "'neg'"), ("1.5", "'1.5'"), (-1, "-1")])
def test_an_id2label_key_that_is_no_label_id_is_refused_naming_it(tmp_path, key, shown):
    """id2label's keys become label ids with int(): a 5000-digit key got Python's 'Exceeds the limit (4300
    digits)' error, a name its 'invalid literal for int()'; each is one line naming the key, and "1" still
    reads as 1."""
    numlm.BertForSequenceClassification(bert_cfg(), seed=1).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=f"^id2label key {shown} is not a label id"):
        numlm.from_pretrained(tmp_path / "m", id2label={key: "pos", "0": "neg"})
    m = numlm.from_pretrained(tmp_path / "m", id2label={"1": "pos", " 0": "neg"})
    assert m.config.extra["label2id"] == {"pos": 1, "neg": 0}


def test_labels_configs_and_seeds_that_cannot_train_are_refused():
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    regress = numlm.BertForSequenceClassification(bert_cfg(num_labels=1), seed=0)
    multi = numlm.GPT2ForSequenceClassification(gpt_cfg(pad_token_id=0, num_labels=3), seed=0)
    with pytest.raises(ValueError, match="labels for regression must be finite"):
        regress(ids, labels=np.array([np.inf, 1.0]))
    with pytest.raises(ValueError, match="labels for multi_label_classification must be finite"):
        multi(ids, labels=np.array([[0.0, np.nan, 1.0], [0.0, 0.0, 1.0]]))
    for field, value, match in [("initializer_range", float("nan"), "initializer_range must be a finite number"),
                                ("initializer_range", -1.0, "initializer_range must be >= 0"),
                                ("layer_norm_epsilon", "1e-5", "layer_norm_epsilon must be a finite number"),
                                ("resid_pdrop", "0.1", "resid_pdrop must be a finite number"),
                                ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false")]:
        with pytest.raises(ValueError, match=match):
            gpt_cfg(**{field: value})
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer >= 0"):
            numlm.GPT2LMHeadModel(gpt_cfg(), seed=seed)
    with pytest.raises(ValueError, match="scaling=nan is not supported"):
        peft.SeqBnConfig(scaling=float("nan"))
    with pytest.raises(ValueError, match=r"leave_out \[5\] must name layers of the model, 0 .. 0"):
        peft.get_peft_model(numlm.GPT2LMHeadModel(gpt_cfg(), seed=0), peft.SeqBnConfig(leave_out=[5]))
    with pytest.raises(ValueError, match="lm_coef must be a finite number, got None"):
        numlm.GPT2DoubleHeadsModel(gpt_cfg(), seed=0)(np.ones((1, 2, 3), int), lm_coef=None)
    with pytest.raises(ValueError, match="lm_labels must have the shape of input_ids"):
        multi(ids, lm_labels=ids[:, :2])


def test_unload_keeps_the_models_own_freezing_and_a_failed_wrap_the_config():
    """unload / merge_and_unload made trainable what the user froze before get_peft_model, and a
    refused get_peft_model filled the caller's config in (a second model then met fields never set)."""
    for undo in ("unload", "merge_and_unload"):
        m = numlm.GPT2LMHeadModel(gpt_cfg(), seed=0)
        m.transformer.wte.freeze()
        before = sorted(m.trainable_parameters())
        pm = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["c_attn"]))
        assert sorted(getattr(pm, undo)().trainable_parameters()) == before
    c = peft.PromptTuningConfig(num_virtual_tokens=40)
    with pytest.raises(ValueError, match="leaves no room"):
        peft.get_peft_model(numlm.GPT2LMHeadModel(gpt_cfg(), seed=0), c)
    assert (c.token_dim, c.num_layers, c.num_attention_heads) == (None, None, None)


def test_attention_maps_of_virtual_tokens_are_refused(tmp_path, capsys):
    from numlm.cli import main
    tok = Tokenizer.train_bpe_from_iterator(TEXTS, vocab_size=270, min_frequency=1)
    base = tmp_path / "gpt"
    numlm.GPT2LMHeadModel(gpt_cfg(tok.vocab_size), seed=1).save_pretrained(base)
    tok.save(base)
    for name, config in (("prompt", peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
                         ("prefix", peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))):
        pm = peft.get_peft_model(numlm.from_pretrained(base), config)
        pm.peft_config.base_model_name_or_path = str(base)
        pm.save_pretrained(tmp_path / name)
        png = tmp_path / f"{name}.png"
        assert main(["attention", str(tmp_path / name), "--text", "the cat", "--out", str(png)]) == 2
        assert f"attention maps of a {name} tuning model are not drawn" in capsys.readouterr().err
        assert not png.exists()


def test_check_model_refuses_its_arguments_by_name():
    m = numlm.GPT2LMHeadModel(gpt_cfg(), seed=0, dtype="float64")
    x = np.array([[1, 2, 3]])
    for kw, match in [(dict(eps=0), r"eps must be a number in \[1e-10, 1\]"), (dict(eps="1e-6"), "eps must be"),
                      (dict(tol="a"), r"tol must be a number in \(0, 1\)"), (dict(params=True), "params must be"),
                      (dict(progress=3), "progress must be a callable")]:
        with pytest.raises(ValueError, match=match):
            check_model(m, x, **{"params": 1, **kw})
    with pytest.raises(ValueError, match="input_ids must be integer token ids"):
        check_model(m, np.array([[1.0, 2.0]]), params=1)
    m.freeze()
    with pytest.raises(ValueError, match="every parameter of the model is frozen"):
        check_model(m, x, params=1)


def test_text_helpers_refuse_what_they_cannot_read(wp, tmp_path):
    cls = numlm.BertForSequenceClassification(bert_cfg(wp.vocab_size), seed=1).eval()
    for texts in (None, 5, ["a", 3]):
        with pytest.raises(ValueError, match="texts must be a str or a sequence of str"):
            numlm.classify(cls, wp, texts)
    assert numlm.classify(cls, wp, []) == []
    with pytest.raises(ValueError, match=r"hidden must have shape \(B, T, C\) with T >= 1"):
        pool(np.ones((1, 0, 4)), pooling="cls")
    with pytest.raises(ValueError, match="normalize must be True or False"):
        pool(np.ones((1, 2, 4)), normalize="no")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a numlm model nor a sentence-transformers folder"):
        numlm.embed(str(tmp_path / "file.txt"), None, ["a"])


def test_a_prompt_tuned_gpt_classifier_warns_of_a_pooled_pad():
    """transformers pools a prompt-tuned GPT-2 classifier's last position; a right-padded row pooled a pad
    in silence."""
    m = numlm.GPT2ForSequenceClassification(gpt_cfg(pad_token_id=0, num_labels=3), seed=0).eval()
    pm = peft.get_peft_model(m, peft.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS")).eval()
    batch = np.array([[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]])
    with pytest.warns(UserWarning, match="some rows end in padding there"):
        numlm.predict(pm, batch, attention_mask=(batch != 0).astype(int))


def test_adapter_files_take_the_umasks_mode(tmp_path):
    """peft's files were written 0600 through mkstemp: an adapter folder shared with a group could not be read."""
    import os
    pm = peft.get_peft_model(numlm.GPT2LMHeadModel(gpt_cfg(), seed=0), peft.LoraConfig(r=2, target_modules=["c_attn"]))
    old = os.umask(0o022)
    try:
        pm.save_pretrained(tmp_path / "a")
    finally:
        os.umask(old)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "a").iterdir()} == {
        "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}


def test_arguments_that_were_taken_for_something_else_are_refused():
    """logits_to_keep=True ran as 1, a uint64 id above 2**63 was reported as a negative number, and a
    tuple as a double-heads model's grad met numpy's error."""
    g = numlm.GPT2LMHeadModel(gpt_cfg(), seed=0)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0, got True"):
        g(ids, logits_to_keep=True)
    with pytest.raises(ValueError, match=f"input_ids must lie below 2\\*\\*63, got {2 ** 63}"):
        g(np.array([[2 ** 63]], dtype=np.uint64))
    dh = numlm.GPT2DoubleHeadsModel(gpt_cfg(), seed=0)
    out = dh(np.ones((1, 2, 3), int))
    with pytest.raises(ValueError, match="gradient of logits must be one array, got a tuple"):
        dh.backward((None, np.ones_like(out.mc_logits)))
    dh.backward(None, np.ones_like(out.mc_logits))  # the form the docstring gives


def _refused_forward_cases():
    """(model class, its config, a good forward's arguments, bad arguments each refused by name)"""
    B, T, K = 2, 5, 3
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (B, T))
    bert = bert_cfg(num_labels=K)
    roberta = numlm.RobertaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=40, num_labels=K, pad_token_id=0)
    distil = numlm.DistilBertConfig(vocab_size=60, dim=16, n_layers=1, n_heads=2, hidden_dim=24,
                                    max_position_embeddings=32, num_labels=K)
    mask, lab, tok = np.ones((B, T + 1)), np.array([0, 2]), rng.integers(0, K, (B, T))
    seq = [dict(labels=np.array([0, 1, 2])), dict(labels=np.array([0, K])), dict(attention_mask=mask),
           dict(input_ids=ids + 60)]
    tokens = [dict(labels=tok[:, :-1]), dict(labels=tok + K), dict(attention_mask=mask)]
    span = [dict(end_positions=None), dict(end_positions=np.array([[1, 2, 3]]))]
    return [
        (numlm.GPT2LMHeadModel, gpt_cfg(), dict(input_ids=ids, labels=ids),
         [dict(input_ids=ids + 50), dict(attention_mask=mask), dict(labels=ids[:, :-1]), dict(position_ids=ids + 40)]),
        (numlm.GPT2ForSequenceClassification, gpt_cfg(num_labels=K, pad_token_id=0),
         dict(input_ids=ids, labels=lab, lm_labels=ids), [*seq[:3], dict(lm_labels=ids[:, :-1])]),
        (numlm.GPT2DoubleHeadsModel, gpt_cfg(), dict(input_ids=ids[None], labels=ids[None], mc_labels=[1]),
         [dict(mc_labels=[2]), dict(mc_token_ids=[[T, 0]]), dict(labels=ids)]),
        (numlm.BertForSequenceClassification, bert, dict(input_ids=ids, labels=lab), seq),
        (numlm.BertForTokenClassification, bert, dict(input_ids=ids, labels=tok), tokens),
        (numlm.BertForMaskedLM, bert, dict(input_ids=ids, labels=ids), [dict(labels=ids[:1]), dict(labels=ids + 60)]),
        (numlm.BertForPreTraining, bert, dict(input_ids=ids, labels=ids, next_sentence_label=[0, 1]),
         [dict(next_sentence_label=[0, 2]), dict(labels=ids[:1])]),
        (numlm.BertForNextSentencePrediction, bert, dict(input_ids=ids, labels=[0, 1]), [dict(labels=[0, 2])]),
        (numlm.BertForQuestionAnswering, bert_cfg(), dict(input_ids=ids, start_positions=lab, end_positions=lab), span),
        (numlm.RobertaForSequenceClassification, roberta, dict(input_ids=ids, labels=lab), seq),
        (numlm.DistilBertForSequenceClassification, distil, dict(input_ids=ids, labels=lab), seq),
        (numlm.DistilBertForTokenClassification, distil, dict(input_ids=ids, labels=tok), tokens),
        (numlm.DistilBertForMaskedLM, distil, dict(input_ids=ids, labels=ids), [dict(labels=ids[:, :-1])]),
        (numlm.DistilBertForQuestionAnswering, numlm.DistilBertConfig(vocab_size=60, dim=16, n_layers=1, n_heads=2,
                                                                      hidden_dim=24, max_position_embeddings=32),
         dict(input_ids=ids, start_positions=lab, end_positions=lab), span),
    ]


@pytest.mark.parametrize("cls, cfg, good, bads", _refused_forward_cases(), ids=lambda c: getattr(c, "__name__", ""))
def test_a_refused_forward_leaves_the_last_forward_to_backward(cls, cfg, good, bads):
    """A forward refused for a bad argument (ids, mask, labels of the wrong shape or range), in training
    or under no_grad, changed nothing: backward() then differentiates the earlier forward exactly as a
    model that never saw the refused calls, and the next forward draws the same dropout masks."""
    seen, fresh = (cls(cfg, seed=0, dtype="float64").train() for _ in range(2))
    out = seen(**good)
    for bad in bads:
        with pytest.raises(ValueError):
            seen(**{**good, **bad})
        with numlm.no_grad(), pytest.raises(ValueError):
            seen(**{**good, **bad})
    seen.backward()
    want = fresh(**good)
    fresh.backward()
    assert out.loss == want.loss
    got, expected = seen.gradients(), fresh.gradients()
    assert got.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    assert seen(**good).loss == fresh(**good).loss  # the refused calls drew no dropout masks


def test_a_refused_prompt_tuned_forward_leaves_the_last_forward_to_backward():
    """Prompt tuning embeds the ids itself before the model checks the rest: a call refused there (labels
    of the wrong shape, ids out of range) kept the refused ids in the token table's cache, so backward()
    gave the trained token table the gradient of ids the model never ran."""
    def tuned():
        m = numlm.BertForSequenceClassification(bert_cfg(num_labels=3), seed=0, dtype="float64").train()
        pm = peft.get_peft_model(m, peft.PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"), seed=1)
        m.bert.embeddings.word_embeddings.unfreeze()
        return pm
    ids, labels = np.array([[5, 6, 7], [8, 9, 10]]), np.array([0, 2])
    seen, fresh = tuned(), tuned()
    seen(ids, labels=labels)
    for bad in [dict(labels=np.array([0, 1, 2])), dict(input_ids=ids + 60), dict(attention_mask=np.ones((2, 4)))]:
        with pytest.raises(ValueError, match="labels|input_ids|attention_mask"):
            seen(**{"input_ids": ids[::-1] + 10, "labels": labels, **bad})
    seen.backward()
    fresh(ids, labels=labels)
    fresh.backward()
    word = "bert.embeddings.word_embeddings.weight"
    assert np.abs(fresh.base_model.gradients()[word]).sum() > 0
    np.testing.assert_array_equal(seen.base_model.gradients()[word], fresh.base_model.gradients()[word])
    got, want = seen.gradients(), fresh.gradients()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("cls, cfg, shape", [(numlm.GPT2LMHeadModel, gpt_cfg(), (2, 4)),
                                             (numlm.BertModel, bert_cfg(), (2, 4)),
                                             (numlm.GPT2DoubleHeadsModel, gpt_cfg(), (2, 3, 4))])
def test_position_ids_of_another_shape_are_refused_not_reshaped(cls, cfg, shape):
    """(B, 1, T) position_ids ran as (B, T) (so did any shape of B*T entries ending in T), where transformers 5
    refuses them. input_ids' shape, the (B, T) it runs as, (1, T) and (T,) give what the per-row positions
    give; any other shape is one ValueError naming position_ids and the shapes it takes."""
    model = cls(cfg, seed=0, dtype="float64").eval()
    T, rows = shape[-1], int(np.prod(shape[:-1]))
    ids = np.random.default_rng(0).integers(0, 50, shape)
    main = "last_hidden_state" if cls is numlm.BertModel else "logits"
    p = np.arange(T) + 3  # not the positions a model counts itself
    want = model(ids, position_ids=np.broadcast_to(p, shape))[main]
    assert not np.allclose(model(ids)[main], want)
    for pos in [p, p[None], np.broadcast_to(p, (rows, T))]:
        np.testing.assert_array_equal(model(ids, position_ids=pos)[main], want)
    accepted = r"position_ids must have shape .*\(1, 4\) or \(4,\), got "
    for bad in [(shape[0], 1, T), (1, 1, T), (rows * T,), (rows, T, 1), (shape[0] + 1, T)]:
        with pytest.raises(ValueError, match=accepted + re.escape(str(bad))):
            model(ids, position_ids=np.zeros(bad, dtype=np.int64))
