"""Model names through the Hugging Face cache, offline on the real code path: a cache folder in
huggingface_hub's layout (models--ORG--NAME/snapshots/REV/..., refs/main) built from models numlm saves,
HF_HOME and HF_HUB_OFFLINE=1 set, and the names resolved by huggingface_hub itself (no mock)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import numlm
from numlm.data import Tokenizer

HF = Path(__file__).parent / "fixtures" / "hf"
REV = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("huggingface_hub") is None,
                                reason="huggingface_hub is not installed (pip install 'numlm[hub]')")


def snapshot(home, repo, rev, ref=None):
    """The folder huggingface_hub keeps a snapshot in; refs/<ref> names `rev` when given."""
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    folder = root / "snapshots" / rev
    folder.mkdir(parents=True)
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(rev)
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """HF_HOME with a cached tiny RoBERTa MLM (main and an older revision with other weights) and its
    tokenizer, a cached GPT-2, a pickle-only repository; HF_HUB_OFFLINE=1."""
    home = tmp_path / "hf"
    m = numlm.from_pretrained(HF / "roberta-tiny-mlm", dtype="float64")
    m.save_pretrained(snapshot(home, "numlm-test/roberta-tiny", REV, "main"))
    old = snapshot(home, "numlm-test/roberta-tiny", OLD)
    m.lm_head.params["bias"][:] += 1.0  # another revision: other weights
    m.save_pretrained(old)
    tok = Tokenizer.train_bpe_from_iterator(["a tiny corpus for a tiny tokenizer"] * 5, 300)
    tok.save(home / "hub" / "models--numlm-test--roberta-tiny" / "snapshots" / REV)
    numlm.from_pretrained(HF / "distilgpt2-tiny").save_pretrained(snapshot(home, "distilgpt2", REV, "main"))
    pickled = snapshot(home, "numlm-test/pickled", REV, "main")
    (pickled / "config.json").write_text((HF / "roberta-tiny-mlm" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_load_by_name_offline(hub):
    ref = np.load(HF / "roberta-tiny-mlm" / "reference.npz", allow_pickle=False)
    model = numlm.from_pretrained("numlm-test/roberta-tiny", dtype="float64")
    assert type(model) is numlm.RobertaForMaskedLM
    out = model(ref["input_ids"], attention_mask=ref["attention_mask"])
    assert np.abs(out.logits - ref["logits"]).max() / np.abs(ref["logits"]).max() < 1e-10
    # revision= picks another snapshot: the bias moved by 1 moves every logit by 1
    old = numlm.from_pretrained("numlm-test/roberta-tiny", dtype="float64", revision=OLD)
    np.testing.assert_allclose(old(ref["input_ids"], attention_mask=ref["attention_mask"]).logits,
                               ref["logits"] + 1.0, rtol=0, atol=1e-12)  # saved in float64: every digit kept
    # a name without an org, and a class's own from_pretrained
    gpt = numlm.GPT2LMHeadModel.from_pretrained("distilgpt2", dtype="float64")
    g = np.load(HF / "distilgpt2-tiny" / "reference.npz", allow_pickle=False)
    out = gpt(g["input_ids"], attention_mask=g["attention_mask"])
    assert np.abs(out.logits - g["logits"]).max() / np.abs(g["logits"]).max() < 1e-6  # saved in float32


def test_tokenizer_by_name_offline(hub):
    tok = Tokenizer.from_pretrained("numlm-test/roberta-tiny")
    assert tok.decode(tok.encode("a tiny corpus")) == "a tiny corpus"


def test_offline_and_not_cached_names_the_cache(hub):
    with pytest.raises(ValueError, match=r"not in the Hugging Face cache .*hub.* HF_HUB_OFFLINE") as e:
        numlm.from_pretrained("numlm-test/never-downloaded")
    assert str(hub / "hub") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="revision 'v9'"):
        numlm.from_pretrained("numlm-test/roberta-tiny", revision="v9")


def test_pickle_only_repository_is_refused_with_the_conversion(hub):
    with pytest.raises(ValueError, match="(?s)only as pickles.*pytorch_model.bin.*save_pretrained") as e:
        numlm.from_pretrained("numlm-test/pickled")
    assert "safe_serialization=True" in str(e.value)
    # the repository's own class (AutoModel would drop a task head), and its tokenizer beside it
    assert "AutoConfig.from_pretrained(n).architectures" in str(e.value) and "AutoTokenizer" in str(e.value)


def test_local_folders_win_and_bad_paths(hub, tmp_path):
    assert type(numlm.from_pretrained(HF / "roberta-tiny-mlm")) is numlm.RobertaForMaskedLM
    with pytest.raises(ValueError, match="does not exist"):
        numlm.from_pretrained(tmp_path / "no" / "such" / "folder")
    with pytest.raises(ValueError, match="local folder"):
        numlm.from_pretrained(HF / "roberta-tiny-mlm", revision="main")


TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 4


def cached_gpt(hub):
    """(tokenizer, folder) of a tiny GPT-2 with its tokenizer cached as numlm-test/gpt-words"""
    tok = Tokenizer.train_bpe_from_iterator(TEXTS, vocab_size=270, min_frequency=1)
    cfg = numlm.GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                           eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    gpt = snapshot(hub, "numlm-test/gpt-words", REV, "main")
    numlm.GPT2LMHeadModel(cfg, seed=2).save_pretrained(gpt)
    tok.save(gpt)
    return tok, gpt


def test_commands_take_names_offline(hub, capsys):
    """generate, fill-mask and gradcheck with a Hub name: the folder comes from the cache, offline."""
    from numlm.cli import main
    cached_gpt(hub)
    assert main(["generate", "numlm-test/gpt-words", "--prompt", "the cat", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    wp = Tokenizer.train_wordpiece_from_iterator(TEXTS, vocab_size=60, min_frequency=1)
    bert = snapshot(hub, "numlm-test/bert-words", REV, "main")
    numlm.BertForMaskedLM(numlm.BertConfig(vocab_size=wp.vocab_size, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=24, max_position_embeddings=32),
                          seed=1).save_pretrained(bert)
    wp.save(bert)
    assert main(["fill-mask", "numlm-test/bert-words", "the [MASK] sat on the mat", "--top-k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["gradcheck", "numlm-test/bert-words", "--params", "1"]) == 0
    capsys.readouterr()
    assert main(["generate", "numlm-test/not-cached", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache" in err and str(hub / "hub") in err


def test_unreachable_hub_falls_back_to_the_cache(hub):
    """HF_HUB_OFFLINE unset and the Hub unreachable (a refused port): a cached name loads from the cache
    at once, one that is not cached is one line naming the cache; no retries, no httpx traceback."""
    import os
    import subprocess
    import sys
    import time
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # huggingface_hub reads it at import: a fresh process
    code = ("import numlm\nm = numlm.from_pretrained('numlm-test/roberta-tiny')\nprint(type(m).__name__)\n"
            "try:\n    numlm.from_pretrained('numlm-test/never-downloaded')\nexcept ValueError as e:\n    print(e)\n")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "RobertaForMaskedLM" and len(lines) == 2
    assert "not in the Hugging Face cache" in lines[1] and "could not be reached" in lines[1]
    assert str(hub / "hub") in lines[1]
    assert time.perf_counter() - start < 20  # list_repo_files' five retries took ~25 s


def test_profile_and_adapter_bases_take_names(hub, tmp_path, capsys):
    """numlm profile with a Hub name; an adapter whose base is a Hub name (in adapter_config.json, or
    with --base) generates as the adapter on the cached model does."""
    from numlm import peft
    from numlm.cli import main
    from numlm.decoding import generate
    tok, gpt = cached_gpt(hub)
    assert main(["profile", "numlm-test/gpt-words", "--steps", "1", "--batch", "2", "--seq", "6"]) == 0
    assert "transformer.h.1" in capsys.readouterr().out
    assert main(["profile", "numlm-test/gpt-wrods"]) == 2
    err = capsys.readouterr().err
    assert "neither a workload" in err and "not in the Hugging Face cache" in err
    pm = peft.get_peft_model(numlm.from_pretrained(gpt), peft.LoraConfig(r=2, target_modules=["c_attn"],
                             task_type="CAUSAL_LM", init_lora_weights=False), seed=1)
    pm.peft_config.base_model_name_or_path = "numlm-test/gpt-words"
    pm.save_pretrained(tmp_path / "adapter")
    ids = tok.encode("the cat", add_special_tokens=False)
    new = generate(pm.eval(), [ids], max_new_tokens=4, eos_token_id=[])[0, len(ids):]
    want = "the cat" + tok.decode(new) + "\n"
    args = ["--prompt", "the cat", "--max-new-tokens", "4"]
    assert main(["generate", str(tmp_path / "adapter")] + args) == 0
    assert capsys.readouterr().out == want
    pm.peft_config.base_model_name_or_path = None
    pm.save_pretrained(tmp_path / "unnamed")
    assert main(["generate", str(tmp_path / "unnamed"), "--base", "numlm-test/gpt-words"] + args) == 0
    assert capsys.readouterr().out == want
    assert main(["generate", str(tmp_path / "unnamed")] + args) == 2
    assert "names no base model" in capsys.readouterr().err
