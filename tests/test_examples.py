"""The examples' own logic, without their long runs."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_strategies_says_which_method_needs_more_steps():
    s = load("strategies")
    assert s.METHODS["prompt"][3].lr == 0.3  # the prompt-tuning paper's learning rate
    assert s.METHODS["lora"][3].total_steps(10201) == 20 * 319  # epochs in steps of batch 32
    res = {"train_examples": 10201, "train_seconds": 300.0, "steps": 150}
    rows = [("prompt", {**res, "test_accuracy": 0.58}), ("full", {**res, "test_accuracy": 0.80})]
    lines = s.notes(rows, 150, majority=0.572, quick=False)
    assert len(lines) == 1  # full learned, prompt did not
    assert lines[0].startswith("- prompt (20 tokens) ended at 58.0% after 150 steps")
    assert "--methods prompt --steps 30000" in lines[0] and "about 1,000 minutes" in lines[0]
    # a run as long as the recipe that still did not learn gets no command for a longer one
    lines = s.notes([("head", {**res, "steps": 700, "test_accuracy": 0.60})], 700, majority=0.572, quick=False)
    assert len(lines) == 1 and "head only" in lines[0] and "--steps" not in lines[0]


def test_prefix_character_holds_the_character_out_of_the_pretraining(tmp_path):
    import re
    import pytest
    from numlm.data import datasets, shakespeare_texts
    s = load("prefix_character")
    txt, corpus, n, plays = s.character_data("FALSTAFF", tmp_path)
    texts = shakespeare_texts()
    said = [len(re.findall(r"^FALSTAFF:$", t, re.M)) for t in texts]
    data = datasets.load(txt)
    assert n == len(data.train + data.validation + data.test) == sum(said) > 400
    assert plays == sum(1 for k in said if k) and len(list(corpus.iterdir())) == len(texts) - plays
    assert not any("FALSTAFF:" in p.read_text() for p in corpus.iterdir())
    with pytest.raises(ValueError, match="'NOBODY' has 0 speeches in the plays; try one of .*FALSTAFF"):
        s.character_data("NOBODY", tmp_path / "x")
