"""`numlm generate` / `numlm fill-mask` on small saved models with their tokenizers."""
import numpy as np
import pytest

from numlm.cli import main
from numlm.data.tokenizer import Tokenizer
from numlm.decoding import generate
from numlm.inference import fill_mask
from numlm.models import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, from_pretrained

TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the mat is on the floor",
         "dogs and cats sit on mats"] * 4


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt")
    tok = Tokenizer.train_bpe_from_iterator(TEXTS, vocab_size=280, min_frequency=1)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                     eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    GPT2LMHeadModel(cfg, seed=2, dtype="float32").save_pretrained(d)
    tok.save(d)
    return d


def test_generate_greedy_streams_the_decoded_text(gpt_dir, capsys):
    assert main(["generate", str(gpt_dir), "--prompt", "the cat", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    model, tok = from_pretrained(gpt_dir), Tokenizer.from_dir(gpt_dir)
    ids = tok.encode("the cat", add_special_tokens=False)
    out = generate(model, [ids], max_new_tokens=6, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    assert printed == "the cat" + tok.decode(out[0, len(ids):]) + "\n"


def test_generate_sampling_and_beams(gpt_dir, capsys):
    args = ["generate", str(gpt_dir), "--prompt", "a dog", "--max-new-tokens", "5"]
    assert main(args + ["--temperature", "0.8", "--top-k", "5", "--seed", "3"]) == 0
    a = capsys.readouterr().out
    assert main(args + ["--temperature", "0.8", "--top-k", "5", "--seed", "3"]) == 0
    assert capsys.readouterr().out == a  # same seed, same text
    model, tok = from_pretrained(gpt_dir), Tokenizer.from_dir(gpt_dir)
    ids = tok.encode("a dog", add_special_tokens=False)
    out = generate(model, [ids], max_new_tokens=5, do_sample=True, temperature=0.8, top_k=5, seed=3,
                   eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    assert a == "a dog" + tok.decode(out[0, len(ids):]) + "\n"
    assert main(args + ["--num-beams", "3"]) == 0
    out = generate(model, [ids], max_new_tokens=5, num_beams=3, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    assert capsys.readouterr().out == "a dog" + tok.decode(out[0, len(ids):]) + "\n"


def test_generate_bad_input_is_a_clear_error(gpt_dir, capsys):
    assert main(["generate", str(gpt_dir), "--prompt", "the cat", "--max-new-tokens", "100"]) == 2
    assert "position table" in capsys.readouterr().err
    assert main(["generate", str(gpt_dir), "--prompt", "the cat", "--top-p", "1.5"]) == 2
    assert "--top-p" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--num-beams", "2"]])
def test_a_temperature_that_overflows_is_one_error_line(gpt_dir, capsys, extra):
    """numpy's overflow warning of scores / temperature came out as a line before the error"""
    args = ["generate", str(gpt_dir), "--prompt", "the cat", "--max-new-tokens", "3", "--temperature", "1e-40"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "temperature=1e-40" in err[0]

def test_a_reader_that_goes_away_ends_generate_quietly(gpt_dir):
    """numlm generate ... | head printed 'error: Broken pipe' (exit 2) once head had its lines"""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-m", "numlm", "generate", str(gpt_dir), "--prompt", "the cat",
                          "--max-new-tokens", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before the command's first line: its first write finds no reader
    assert p.wait(timeout=120) == 141
    assert p.stderr.read() == b""


@pytest.mark.parametrize("penalty", ["1e300", "1e-300"])
def test_an_extreme_repetition_penalty_prints_no_numpy_warning(gpt_dir, capsys, penalty):
    """numpy's overflow warnings of s * penalty, s / penalty and their cast came out on stderr"""
    args = ["generate", str(gpt_dir), "--prompt", "the cat", "--max-new-tokens", "3", "--repetition-penalty", penalty]
    code = main(args)
    err = capsys.readouterr().err
    assert "Warning" not in err and "overflow" not in err
    assert code == 0 or len(err.splitlines()) == 1


def test_fill_mask_command(tmp_path, capsys):
    tok = Tokenizer.train_wordpiece_from_iterator(TEXTS, vocab_size=60, min_frequency=1)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32)
    BertForMaskedLM(cfg, seed=1, dtype="float32").save_pretrained(tmp_path)
    tok.save(tmp_path)
    assert main(["fill-mask", str(tmp_path), "the [MASK] sat on the mat", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    want = fill_mask(from_pretrained(tmp_path), tok, "the [MASK] sat on the mat", top_k=3)[0]
    assert len(lines) == 3
    for line, r in zip(lines, want):
        score, token = line.split()[:2]
        assert token == r["token"] and float(score) == pytest.approx(r["score"], abs=1e-4)
        assert line.endswith(r["sequence"])


@pytest.mark.parametrize("method", ["prefix", "prompt", "lora"])
def test_generate_from_an_adapter_folder(gpt_dir, tmp_path, capsys, method):
    """numlm generate ADAPTER_DIR: the base from adapter_config.json's base_model_name_or_path (or
    --base), the text numlm.generate gives on the PeftModel; a random adapter, so it is not the base's."""
    from numlm import peft
    config = {"prefix": peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
              "prompt": peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
              "lora": peft.LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM", init_lora_weights=False)}
    pm = peft.get_peft_model(from_pretrained(gpt_dir), config[method], seed=1)
    pm.peft_config.base_model_name_or_path = str(gpt_dir)
    for a in pm.parameters().values():
        a[...] = np.random.default_rng(5).standard_normal(a.shape)
    pm.save_pretrained(tmp_path / "adapter")
    tok = Tokenizer.from_dir(gpt_dir)
    ids = tok.encode("the cat", add_special_tokens=False)
    kw = dict(max_new_tokens=6, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    out = generate(pm.eval(), [ids], return_dict_in_generate=True, output_scores=True, **kw)
    want = "the cat" + tok.decode(out.sequences[0, len(ids):]) + "\n"
    plain = generate(from_pretrained(gpt_dir), [ids], return_dict_in_generate=True, output_scores=True, **kw)
    assert np.abs(out.scores[0] - plain.scores[0]).max() > 1e-3  # the adapter is in the numbers
    assert main(["generate", str(tmp_path / "adapter"), "--prompt", "the cat", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == want
    assert main(["generate", str(tmp_path / "adapter"), "--base", str(gpt_dir), "--prompt", "the cat",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == want
    assert main(["generate", str(tmp_path / "adapter"), "--base", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "give its base model folder or Hub name with --base" in capsys.readouterr().err


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_warn_on_load_and_do_not_generate(gpt_dir, tmp_path, capsys, value):
    """A diverged run saved NaN (or inf) weights: loading names the tensors, generate refuses with
    exit 2 instead of printing the prompt and exiting 0."""
    import shutil
    import warnings
    from numlm.io import NonFiniteWeightsWarning, load_safetensors, save_safetensors
    d = tmp_path / "bad"
    shutil.copytree(gpt_dir, d)
    state = load_safetensors(d)
    state["transformer.h.1.mlp.c_fc.weight"][0, 3] = value
    save_safetensors(state, d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_safetensors(d)
    assert [str(w.message) for w in caught if w.category is NonFiniteWeightsWarning] == [
        f"{str(d / 'model.safetensors')} holds NaN or inf in 1 tensor(s): transformer.h.1.mlp.c_fc.weight"]
    assert main(["generate", str(d), "--prompt", "the cat", "--max-new-tokens", "3"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == (
        f"numlm generate: error: the weights in {d} hold NaN or inf (transformer.h.1.mlp.c_fc.weight); they cannot run")
    assert "warning: " in err and "transformer.h.1.mlp.c_fc.weight" in err.splitlines()[0]
