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


@pytest.mark.parametrize("n", [12, 29])
def test_bert_validation_of_few_documents_holds_no_training_pair(n, wordpiece):
    tok = Tokenizer.from_file(wordpiece)
    d = BertData(documents(n), tok, 32, 4, 0, val_batches=2)
    train = {tuple([tok.cls_id, *p.a, tok.sep_id, *p.b, tok.sep_id]) for p in d.pairs}
    val = bert_rows(d.val, tok)
    assert val and not train & set(val)


@pytest.mark.parametrize("texts", [[documents(1, 40)[0]], documents(3, 4)], ids=["one file", "three files"])
def test_bert_trains_on_a_small_corpus_with_a_held_out_split(texts, wordpiece):
    tok = Tokenizer.from_file(wordpiece)
    d = BertData(texts, tok, 32, 4, 0)
    train = {tuple([tok.cls_id, *p.a, tok.sep_id, *p.b, tok.sep_id]) for p in d.pairs}
    assert d.pairs and d.val and not train & set(bert_rows(d.val, tok))


def test_bert_on_one_file_from_the_command_line(tmp_path, capsys):
    f = tmp_path / "one.txt"
    f.write_text(documents(1, 60)[0] + "\n")
    run = tmp_path / "run"
    assert main(["pretrain", "--arch", "bert", "--size", "tiny", "--data", str(f), "--vocab-size", "300",
                 "--out", str(run), "--steps", "2", "--batch-size", "2", "--block-size", "16"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run / "model"), "--data", str(f), "--block-size", "16", "--batch-size", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert np.isfinite(out["val_mlm_loss"]) and out["pairs"] == out["data_pairs"] > 0


def test_bert_on_too_few_lines_says_what_to_give(tmp_path, capsys):
    f = tmp_path / "three.txt"
    f.write_text("one line here\nand a second\nand a third\n")
    assert main(["pretrain", "--arch", "bert", "--size", "tiny", "--data", str(f), "--vocab-size", "300",
                 "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--block-size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 non-empty lines" in err and "at least 4 lines" in err
    assert "val_fraction" not in err and not (tmp_path / "run").exists()


def test_bert_with_a_byte_level_bpe_names_the_missing_tokens(tmp_path, capsys):
    bpe = tmp_path / "bpe.json"
    Tokenizer.train_bpe_from_iterator(documents(12), 300).save(bpe)
    with pytest.raises(ValueError, match=r"no \[CLS\]/\[SEP\]/\[MASK\]/\[PAD\] tokens.*WordPiece"):
        BertData(documents(12), Tokenizer.from_file(bpe), 32, 4, 0)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, t in enumerate(documents(12)):
        (folder / f"d{i}.txt").write_text(t)
    assert main(["pretrain", "--arch", "bert", "--size", "tiny", "--data", str(folder), "--tokenizer", str(bpe),
                 "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--block-size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[CLS]" in err and "--kind wordpiece" in err


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


@pytest.fixture(scope="module")
def gpt_runs(corpus, wordpiece, tmp_path_factory):
    """Tiny GPT-2 runs: one with its own byte-level BPE (eos separator), one with a WordPiece ([SEP])."""
    runs = {}
    for name, tok in (("bpe", None), ("wordpiece", wordpiece)):
        out = tmp_path_factory.mktemp(name)
        pretrain("gpt2", size="tiny", data=corpus, tokenizer_path=tok, vocab_size=None if tok else 300, out_dir=out,
                 block_size=16, batch_size=2, steps=2, log=quiet, progress=False)
        runs[name] = out / "model"
    return runs


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_eval_scores_every_block_of_the_data_as_prepare_lays_it_out(kind, gpt_runs, corpus, tmp_path, capsys):
    model_dir, T = gpt_runs[kind], 16
    data = tmp_path / "eval"  # junk first, then documents, each followed by prepare's separator
    data.mkdir()
    (data / "a.txt").write_text("junk qq zz xx " * 60)
    for i in range(5):
        (data / f"doc{i}.txt").write_text((corpus / f"doc{i}.txt").read_text())
    prepare(data, Tokenizer.from_file(model_dir / "tokenizer.json"), tmp_path / "eval.bin")
    tokens = np.asarray(load_tokens(tmp_path / "eval.bin"), np.int64)
    blocks = tokens[:len(tokens) // T * T].reshape(-1, T)
    want = float(from_pretrained(model_dir, dtype="float64").eval()(input_ids=blocks, labels=blocks).loss)
    assert main(["eval", str(model_dir), "--data", str(data), "--block-size", str(T), "--dtype", "float64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == blocks.size and out["data_tokens"] == len(tokens)
    assert abs(out["val_loss"] - want) < 1e-9 * want


def test_eval_batches_caps_and_says_how_much_it_scored(gpt_runs, corpus, capsys):
    assert main(["eval", str(gpt_runs["bpe"]), "--data", str(corpus), "--block-size", "16", "--batch-size", "2",
                 "--batches", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["blocks"] == 6 and out["tokens"] == 96 < out["data_tokens"]
    assert f"96 of the {out['data_tokens']:,} tokens" in out["scored"]


def test_a_json_that_is_not_a_model_config_is_refused(tmp_path, corpus, capsys):
    """--config tokenizer.json built a default GPT-2 (every key an extra) and failed on its vocabulary."""
    Tokenizer.train_bpe_from_iterator(["a tiny corpus for a tiny tokenizer"] * 5, 300).save(tmp_path / "tok.json")
    args = ["pretrain", "--arch", "gpt2", "--config", str(tmp_path / "tok.json"), "--vocab-size", "300",
            "--block-size", "16", "--batch-size", "4", "--steps", "2", "--data", str(corpus), "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert "is not a model config: no model_type and no field of GPT2Config" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_resume_onto_another_split_of_the_corpus_is_refused(tmp_path, corpus, capsys):
    """The split rule changed today: a run records its training split's size, and a resume whose split
    differs is refused (a run before the record cannot tell); --allow-changes takes the new split."""
    import json as js
    from numlm.train import _state_hash
    out = tmp_path / "r"
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--vocab-size", "300", "--block-size", "16",
            "--batch-size", "4", "--data", str(corpus), "--out", str(out)]
    assert main(args + ["--steps", "2"]) == 0
    for state_file in (out / "checkpoints").glob("step-*/trainer_state.json"):
        state = js.loads(state_file.read_text())
        n = state["run"]["train_tokens"]
        state["run"]["train_tokens"] = n + 1  # as if the run had trained on another cut of the corpus
        state["state_sha256"] = _state_hash(state)
        state_file.write_text(js.dumps(state))
    capsys.readouterr()
    assert main(args + ["--steps", "4", "--resume"]) == 2
    assert f"trained on a split of {n + 1:,} tokens of this corpus, this one has {n:,}" in capsys.readouterr().err
    assert main(args + ["--steps", "4", "--resume", "--allow-changes"]) == 0


def test_eval_without_data_scores_the_part_pretrain_held_out(tmp_path, corpus):
    """numlm eval with no --data scored all of the default corpus, the text a demo model trained on:
    held_out scores the validation part, the very tokens GPTData holds out of the token file."""
    from numlm.data import load_document_starts
    from numlm.models import GPT2Config, GPT2LMHeadModel
    from numlm.recipes import eval_gpt, load_corpus
    _, docs = load_corpus(str(corpus))
    tok = Tokenizer.train_bpe_from_iterator(docs, 300)
    prepare(docs, tok, tmp_path / "t.bin")
    data = GPTData(load_tokens(tmp_path / "t.bin"), load_document_starts(tmp_path / "t.bin"), 16, 4, 0,
                   val_batches=10 ** 6)  # every validation block
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                       eos_token_id=tok.eos_id, bos_token_id=tok.eos_id), seed=0)
    held = eval_gpt(model, docs, tok, 16, 4, held_out=True)
    assert held["data_tokens"] == data.val_tokens < eval_gpt(model, docs, tok, 16, 4, max_batches=1)["data_tokens"]
    assert held["val_loss"] == pytest.approx(data.evaluate(model)["val_loss"], rel=1e-6)  # the token file's blocks


def test_eval_holds_out_a_bert_runs_documents_with_the_runs_own_seed(tmp_path, capsys, monkeypatch):
    """Without --data, eval scores the documents pretrain held out, which its --seed drew: eval took its own
    --seed (default 0), so a run of --seed 3 was scored partly on its training text, silently. The seed now
    comes from the run's record; another --seed is refused by name. A run of another corpus holds none of
    the default one out, and is scored with any --seed. (The default corpus here: a few small documents.)"""
    import numlm.recipes
    from numlm.recipes import eval_seed
    corpus = documents(6)
    monkeypatch.setattr(numlm.recipes, "default_corpus", lambda: ("the default corpus", corpus))
    run = tmp_path / "run"
    args = ["--arch", "bert", "--size", "tiny", "--vocab-size", "300", "--steps", "2", "--batch-size", "2",
            "--block-size", "16"]
    assert main(["pretrain", *args, "--out", str(run), "--seed", "3"]) == 0
    capsys.readouterr()
    ckpt = max((run / "checkpoints").iterdir())
    for model_dir in (run / "model", ckpt):
        assert eval_seed(model_dir) == eval_seed(model_dir, 3) == eval_seed(model_dir, 3, corpus) == 3
        with pytest.raises(ValueError, match="--seed 0 is not the seed 3 the run of .* was pre-trained with"):
            eval_seed(model_dir, 0, corpus)
        assert eval_seed(model_dir, 0, documents(7)) == 0  # trained on other documents: none held out of these
    assert eval_seed(tmp_path, None) == 0 and eval_seed(tmp_path, 5) == 5  # no run: the seed given, else 0
    assert main(["eval", str(run / "model"), "--seed", "0", "--block-size", "16"]) == 2
    assert "--seed 0 is not the seed 3" in capsys.readouterr().err
    assert main(["eval", str(run / "model"), "--block-size", "16", "--batch-size", "2", "--batches", "1"]) == 0
    scored = json.loads(capsys.readouterr().out)["scored"]
    assert "with seed 3" in scored and "other documents" not in scored
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(documents(7)) + "\n")
    assert main(["pretrain", *args, "--data", str(other), "--out", str(tmp_path / "o"), "--seed", "3"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "o" / "model"), "--seed", "0", "--block-size", "16", "--batch-size", "2",
                 "--batches", "1"]) == 0
    scored = json.loads(capsys.readouterr().out)["scored"]
    assert "would hold out for validation with seed 0; the model was pre-trained on other documents" in scored
    ckpts = sorted((run / "checkpoints").iterdir())
    assert len(ckpts) == 2
    ckpts[1].joinpath("trainer_state.json").write_text("{")  # damaged: the older one holds other weights
    for model_dir in (run / "model", ckpts[1]):
        with pytest.raises(ValueError, match="no readable checkpoint of the run of .* records the seed"):
            eval_seed(model_dir)
        assert eval_seed(model_dir, 3) == 3
    assert eval_seed(ckpts[0]) == 3
    assert main(["eval", str(run / "model"), "--block-size", "16"]) == 2
    assert "pass that --seed, or give --data" in capsys.readouterr().err


def test_eval_says_when_a_gpt_was_pre_trained_on_other_documents(tmp_path, capsys, monkeypatch):
    """Without --data, eval scores the part of the default corpus pretrain holds out, and said so as if
    the model's run had held it out: of a GPT pre-trained on --data X, which never read the default
    corpus, the label now says the model was pre-trained on other documents."""
    import numlm.recipes
    monkeypatch.setattr(numlm.recipes, "default_corpus", lambda: ("the default corpus", documents(6)))
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(documents(7)) + "\n")
    args = ["--arch", "gpt2", "--size", "tiny", "--vocab-size", "300", "--steps", "2", "--batch-size", "2",
            "--block-size", "16"]
    for name, data in (("own", []), ("other", ["--data", str(other)])):
        assert main(["pretrain", *args, *data, "--out", str(tmp_path / name)]) == 0
        capsys.readouterr()
        assert main(["eval", str(tmp_path / name / "model"), "--block-size", "16", "--batch-size", "2"]) == 0
        scored = json.loads(capsys.readouterr().out)["scored"]
        assert "the part pretrain" in scored
        assert ("pre-trained on other documents" in scored) == (name == "other")


def test_flags_that_would_do_nothing_are_refused(tmp_path, capsys, corpus):
    """eval --seed on a causal LM (it draws nothing) and --allow-changes without --resume (a new run has
    nothing to change) were accepted and ignored"""
    run = tmp_path / "run"
    args = ["pretrain", "--arch", "gpt2", "--size", "tiny", "--vocab-size", "300", "--steps", "2", "--batch-size", "2",
            "--block-size", "16", "--data", str(corpus), "--out", str(run)]
    assert main(args + ["--allow-changes"]) == 2
    assert "--allow-changes applies to --resume" in capsys.readouterr().err and not run.exists()
    assert main(args) == 0
    capsys.readouterr()
    assert main(["eval", str(run / "model"), "--block-size", "16", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "a causal LM's eval draws nothing" in err


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_eval_scores_a_checkpoint_with_its_runs_tokenizer(tmp_path, capsys, monkeypatch, arch):
    """A pre-training checkpoint holds no tokenizer: eval refused it ('has no tokenizer.json'). It reads
    the run's, and the last checkpoint (model/'s weights) scores as model/ does."""
    import numlm.recipes
    monkeypatch.setattr(numlm.recipes, "default_corpus", lambda: ("the default corpus", documents(6)))
    run = tmp_path / "run"
    assert main(["pretrain", "--arch", arch, "--size", "tiny", "--vocab-size", "300", "--steps", "2",
                 "--batch-size", "2", "--block-size", "16", "--out", str(run)]) == 0
    capsys.readouterr()
    scores = []
    for model_dir in (run / "model", max((run / "checkpoints").iterdir())):
        assert main(["eval", str(model_dir), "--block-size", "16", "--batch-size", "2"]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0] == scores[1] and "val_loss" in scores[0]


def test_eval_refuses_a_checkpoint_whose_run_tokenizer_is_another(tmp_path, capsys, monkeypatch):
    """The run's tokenizer.json, which a checkpoint is scored with, may not be the one it trained with (a
    run resumed with another --tokenizer, the file replaced): it was used silently. The checkpoint records
    its tokenizer's fingerprint; model/ holds its own tokenizer and still scores."""
    import numlm.recipes
    monkeypatch.setattr(numlm.recipes, "default_corpus", lambda: ("the default corpus", documents(6)))
    run, other = tmp_path / "run", tmp_path / "other.txt"
    other.write_text("\n\n".join(documents(7)[::-1]).upper() + "\n")
    assert main(["pretrain", "--arch", "gpt2", "--size", "tiny", "--vocab-size", "300", "--steps", "2",
                 "--batch-size", "2", "--block-size", "16", "--out", str(run)]) == 0
    assert main(["tokenizer", "train", "--vocab-size", "300", "--data", str(other), "--out",
                 str(run / "tokenizer.json"), "--overwrite"]) == 0
    capsys.readouterr()
    step = max((run / "checkpoints").iterdir())
    assert main(["eval", str(step), "--block-size", "16", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "was trained with another tokenizer than" in err
    assert main(["eval", str(run / "model"), "--block-size", "16", "--batch-size", "2"]) == 0
    (step / "tokenizer.json").write_bytes((run / "model" / "tokenizer.json").read_bytes())
    assert main(["eval", str(step), "--block-size", "16", "--batch-size", "2"]) == 0


def test_eval_seed_is_that_of_the_run_that_saved_the_model(tmp_path, monkeypatch):
    """A run resumed with --allow-changes and another --seed saves checkpoints of its own seed; stopped
    before its end (a crash, Ctrl-C) it leaves model/ of the earlier run: eval took the newest
    checkpoint's seed, and refused model/'s own. Also "." inside model/ and a link to it found no run
    (seed 0, silently), as did a run whose checkpoints were removed."""
    import shutil
    from numlm.recipes import eval_seed
    f = tmp_path / "one.txt"
    f.write_text(documents(1, 60)[0] + "\n")
    run = tmp_path / "run"
    args = ["pretrain", "--arch", "bert", "--size", "tiny", "--data", str(f), "--vocab-size", "300",
            "--out", str(run), "--batch-size", "2", "--block-size", "16"]
    assert main(args + ["--steps", "2", "--seed", "3"]) == 0
    shutil.copytree(run / "model", tmp_path / "kept")
    assert main(args + ["--steps", "4", "--seed", "5", "--resume", "--allow-changes"]) == 0
    assert eval_seed(run / "model") == 5  # written by the resumed run
    shutil.rmtree(run / "model")
    shutil.copytree(tmp_path / "kept", run / "model")  # as a resumed run stopped early leaves it
    assert eval_seed(run / "model") == eval_seed(run / "model", 3) == 3
    (tmp_path / "link").symlink_to(run / "model")
    assert eval_seed(tmp_path / "link") == 3
    monkeypatch.chdir(run / "model")
    assert eval_seed(".") == 3
    shutil.rmtree(run / "checkpoints" / "step-0000002")  # as keep_last removes it after two later saves
    with pytest.raises(ValueError, match="no readable checkpoint of the run of '.' records the seed"):
        eval_seed(".")
    assert eval_seed(".", 3) == 3
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ValueError, match="records the seed"):
        eval_seed(run / "model")
