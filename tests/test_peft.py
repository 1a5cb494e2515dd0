"""numlm.peft against peft 0.21 and AdapterHub 1.3 (tests/fixtures/peft, float64 references), whole
adapted models checked by central differences (BERT, GPT-2, GPT-1; every method), merging, freezing,
files both ways and every refused input."""
import json
import shutil
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import numlm
from numlm import peft
from numlm.optim import AdamW
from numlm.peft.layers import DoraLinear

from conftest import FIXTURES

PEFT = FIXTURES / "peft"
CASES = {  # fixture -> (base model fixture, class, task)
    "lora-bert-tiny-seqcls": ("bert-tiny-seqcls", numlm.BertForSequenceClassification),
    "lora-gpt2-tiny": ("gpt2-tiny", numlm.GPT2LMHeadModel),
    "prompt-gpt2-tiny": ("gpt2-tiny", numlm.GPT2LMHeadModel),
    "prefix-gpt2-tiny": ("gpt2-tiny", numlm.GPT2LMHeadModel),
    "adapter-bert-tiny-seqcls": ("bert-tiny-seqcls", numlm.BertForSequenceClassification),
    "adapter-gpt2-tiny-lmhead": ("gpt2-tiny", numlm.GPT2LMHeadModel),
}
# the variants (peft 0.21, transformers 5.23: every loss and gradient float64), on both base models
VARIANTS = [f"{v}-{m}" for v in ("rslora", "lora-bias-lora-only", "lora-bias-all", "dora", "ia3")
            for m in ("bert-tiny-seqcls", "gpt2-tiny")]
CASES.update({name: ("bert-tiny-seqcls", numlm.BertForSequenceClassification) if "bert" in name
              else ("gpt2-tiny", numlm.GPT2LMHeadModel) for name in VARIANTS})


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def base(name, dtype="float64"):
    hf, cls = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a head newly initialised: the adapter file brings it
        return cls.from_pretrained(FIXTURES / "hf" / hf, dtype=dtype)


def load(name, dtype="float64"):
    return peft.PeftModel.from_pretrained(base(name, dtype), PEFT / name / "adapter", is_trainable=True)


def causal_ce(logits, labels):
    """Independent float64 causal-LM loss: mean over t of -log softmax(logits[t])[labels[t + 1]]."""
    x, t = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = t != -100
    x, t = x[keep], t[keep]
    m = x.max(-1, keepdims=True)
    return float(np.mean(np.log(np.exp(x - m).sum(-1)) + m[:, 0] - x[np.arange(len(t)), t]))


# ---------------------------------------------------------------------------------------- the five references

def grad_error(got, want, scale):
    """max |got - want| relative to the tensor's largest reference entry, or to 1e-3 of the largest
    gradient of any tensor when that is larger: a gradient that is zero in exact arithmetic (BERT's key
    bias, under softmax's shift invariance) is rounding noise in both, ~1e-17, and compares as such."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-3 * scale))


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_float64(name):
    """Logits, loss and every trainable gradient, keyed as in the adapter file, to 1e-10 (float32
    rounding anywhere, 6e-8, fails; a gradient zero in exact arithmetic compares as noise, grad_error).
    The causal-LM losses are also checked against an independent float64 cross-entropy of the
    reference logits."""
    ref = np.load(PEFT / name / "reference.npz")
    pm = load(name)
    out = pm(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], labels=ref["labels"])
    assert out.logits.shape == ref["logits"].shape
    assert rel(out.logits, ref["logits"]) < 1e-10
    pm.backward()
    grads = pm.gradients()
    want = {k[len("grad/"):] for k in ref.files if k.startswith("grad/")}
    assert set(grads) == want
    if "gpt2" in name:
        labels = ref["labels"]
        n = out.logits.shape[1] - labels.shape[1]  # prompt tuning: n virtual positions, labels -100
        labels = np.concatenate([np.full((labels.shape[0], n), -100), labels], 1)
        assert rel(ref["loss"], causal_ce(ref["logits"], labels)) < 1e-12  # the reference itself is float64
    assert rel(out.loss, ref["loss"]) < 1e-10
    scale = max(np.abs(ref["grad/" + k]).max() for k in want)
    for k in want:
        assert grads[k].shape == ref["grad/" + k].shape, k
        assert grad_error(grads[k], ref["grad/" + k], scale) < 1e-10, k


@pytest.mark.parametrize("name", ["lora-bert-tiny-seqcls", "lora-gpt2-tiny"] + VARIANTS)
def test_reference_merged_weights(name):
    """merge_and_unload as peft's, every changed tensor to 1e-12: LoRA W + s B A (nn.Linear) or its
    transpose (Conv1D), rsLoRA with s = alpha / sqrt(r), DoRA (m / ||W + s B A||) (W + s B A), IA3 W and b
    rescaled, trained biases kept; the merged plain model gives the adapted logits to 1e-12."""
    ref = np.load(PEFT / name / "reference.npz")
    pm = load(name)
    out = pm(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])
    merged = pm.merge_and_unload()
    assert type(merged) is CASES[name][1]
    sd = merged.state_dict()
    keys = [k for k in ref.files if k.startswith("merged/")]
    assert keys
    for k in keys:
        assert rel(sd[k[len("merged/"):]], ref[k]) < 1e-12, k
    assert not any("lora" in k or "ia3" in k for k in sd)
    out2 = merged(ref["input_ids"], attention_mask=ref["attention_mask"])
    assert rel(out2.logits, out.logits) < 1e-12


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_float32(name):
    ref = np.load(PEFT / name / "reference.npz")
    pm = load(name, "float32")
    out = pm(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], labels=ref["labels"])
    assert out.logits.dtype == np.float32
    assert rel(out.logits, ref["logits"]) < 1e-5
    assert rel(out.loss, ref["loss"]) < 1e-5
    pm.backward()
    grads = pm.gradients()
    for k in grads:
        assert grads[k].dtype == np.float32
        scale = max(np.abs(ref[f]).max() for f in ref.files if f.startswith("grad/"))
        assert grad_error(grads[k], ref["grad/" + k], scale) < 1e-4, k  # a sum over B*T float32 products


# ---------------------------------------------------------------------------------------- files both ways

@pytest.mark.parametrize("name", sorted(CASES))
def test_save_in_the_librarys_files(name, tmp_path):
    """save_pretrained writes the library's own files with its key names and shapes (those of the
    library-saved fixture folder) and its config fields; loading them back gives the same logits."""
    ref = np.load(PEFT / name / "reference.npz")
    pm = load(name)
    out = pm(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])
    pm.save_pretrained(tmp_path)
    theirs = sorted(p.name for p in (PEFT / name / "adapter").iterdir() if p.name != "README.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == theirs
    from safetensors.numpy import load_file
    for f in theirs:
        if f.endswith(".safetensors"):
            a, b = load_file(str(tmp_path / f)), load_file(str(PEFT / name / "adapter" / f))
            assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])  # float64 model: saved as float64, unchanged
        else:
            mine, lib = json.loads((tmp_path / f).read_text()), json.loads((PEFT / name / "adapter" / f).read_text())
            cfg_mine, cfg_lib = mine.get("config", mine), lib.get("config", lib)
            if isinstance(cfg_lib, dict):
                assert set(cfg_mine) == set(cfg_lib)
                for k in ("r", "lora_alpha", "target_modules", "fan_in_fan_out", "peft_type", "task_type",
                          "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                          "reduction_factor", "non_linearity", "mh_adapter", "output_adapter",
                          "original_ln_before", "original_ln_after", "residual_before_ln", "scaling"):
                    if k in cfg_lib:
                        assert cfg_mine[k] == cfg_lib[k], k
    pm2 = peft.PeftModel.from_pretrained(base(name), tmp_path)
    out2 = pm2(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])
    np.testing.assert_array_equal(out2.logits, out.logits)
    assert pm2.gradients() == {}  # loaded for inference, as peft (is_trainable=False)


def test_float32_model_saves_float32(tmp_path):
    pm = load("lora-bert-tiny-seqcls", "float32")
    pm.save_pretrained(tmp_path)
    from safetensors.numpy import load_file
    assert {v.dtype for v in load_file(str(tmp_path / "adapter_model.safetensors")).values()} == {np.dtype("float32")}


@pytest.mark.parametrize("fails", ["adapter.safetensors", "model_head.safetensors"])
def test_an_adapter_save_that_fails_part_way_leaves_the_folder_as_it_was(tmp_path, monkeypatch, fails):
    """A peft save over an AdapterHub folder removes the other library's files in the step that renames
    the new ones in: a removal that fails (a permission error) puts every file back. Before, the peft
    files were in and the AdapterHub files partly left: a folder of both libraries."""
    from pathlib import Path
    load("adapter-bert-tiny-seqcls").save_pretrained(tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    lora, unlink = load("lora-bert-tiny-seqcls"), Path.unlink

    def failing(self, *args, **kw):
        if self.name == fails:
            raise PermissionError(13, "Permission denied")
        return unlink(self, *args, **kw)
    monkeypatch.setattr(Path, "unlink", failing)
    with pytest.raises(PermissionError):
        lora.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    lora.save_pretrained(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_pickle_only_folders_refused_with_how_to_convert(tmp_path):
    for pickle in ("adapter_model.bin", "pytorch_adapter.bin"):
        d = tmp_path / pickle.split(".")[0]
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
        (d / pickle).write_bytes(b"\x80\x04K\x01.")
        with pytest.raises(ValueError, match=rf"(?s)only a pickle \({pickle}\).*never unpickles.*save_file"):
            peft.PeftModel.from_pretrained(base("lora-bert-tiny-seqcls"), d)


# ---------------------------------------------------------------------------------------- training: frozen stays frozen

def _train(pm, ids, mask, labels, steps=3):
    opt = AdamW(pm.parameters(), lr=1e-2)
    pm.train()
    for _ in range(steps):
        pm.zero_grad()
        pm(input_ids=ids, attention_mask=mask, labels=labels)
        pm.backward()
        opt.step(pm.grad_arrays())
    return opt


@pytest.mark.parametrize("name", sorted(CASES))
def test_frozen_tensors_bit_identical_and_no_moments(name, monkeypatch):
    """After AdamW steps every base tensor is bit-identical, only trainable tensors changed and have
    optimizer moments, and no layer computed a weight gradient for a frozen tensor."""
    ref = np.load(PEFT / name / "reference.npz")
    pm = load(name)
    before = {k: v.copy() for k, v in pm.base_model.parameters().items()}
    adapter_before = {k: v.copy() for k, v in pm.parameters().items()}
    calls = []
    import numlm.nn.layers as layers
    fwd, orig = layers.OPS["linear"]

    def spy(dy, cache, need_dw=True, need_db=True):
        calls.append((cache[1].shape, need_dw))
        return orig(dy, cache, need_dw, need_db)
    monkeypatch.setitem(layers.OPS, "linear", (fwd, spy))
    opt = _train(pm, ref["input_ids"], ref["attention_mask"], ref["labels"])
    trainable = pm.parameters()
    ids = {id(a) for a in trainable.values()}
    for k, v in pm.base_model.parameters().items():
        if not any(np.shares_memory(v, a) for a in trainable.values()):
            np.testing.assert_array_equal(v, before[k], err_msg=k)
    for k, v in trainable.items():
        assert not np.array_equal(v, adapter_before[k]), k
    assert set(opt.exp_avg) == set(trainable) == set(pm.grad_arrays())
    assert ids and calls
    for shape, need in calls:  # only a trained head's Linear computes a weight gradient
        assert not need or (name.endswith("seqcls") and shape == (32, 3)), shape
    grads_base = pm.base_model.grad_arrays()
    assert set(grads_base) <= {k for k in pm.base_model.parameters()} and len(grads_base) == (
        len(trainable) - (1 if pm.prompt is not None else 0))


def test_fan_in_fan_out_follows_the_layer_as_peft():
    with pytest.warns(UserWarning, match="is a Conv1D .* setting fan_in_fan_out=True"):
        pm = peft.get_peft_model(tiny("gpt2"), peft.LoraConfig(target_modules=["c_attn"]))
    assert pm.peft_config.fan_in_fan_out is True
    with pytest.warns(UserWarning, match="is an nn.Linear: setting fan_in_fan_out=False"):
        pm = peft.get_peft_model(tiny("bert"), peft.LoraConfig(target_modules=["query"], fan_in_fan_out=True))
    assert pm.peft_config.fan_in_fan_out is False


def test_print_trainable_parameters(capsys):
    pm = load("lora-bert-tiny-seqcls")
    pm.print_trainable_parameters()
    t = 2 * 2 * (4 * 32 + 32 * 4) + 3 * 32 + 3
    total = sum(v.size for v in pm.base_model.parameters().values())
    assert capsys.readouterr().out == (f"trainable params: {t:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * t / total:.4f}\n")


# ---------------------------------------------------------------------------------------- beyond the fixtures

ENCODERS = ("bert", "roberta", "distilbert")


def tiny(kind, dtype="float64", **extra):
    if kind in ("bert", "roberta"):
        cls = (numlm.BertConfig, numlm.BertForSequenceClassification) if kind == "bert" else \
            (numlm.RobertaConfig, numlm.RobertaForSequenceClassification)
        cfg = cls[0](vocab_size=40, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=20, max_position_embeddings=24, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=3, **extra)
        return cls[1](cfg, seed=1, dtype=dtype)
    if kind == "distilbert":
        cfg = numlm.DistilBertConfig(vocab_size=40, dim=12, n_layers=2, n_heads=3, hidden_dim=20,
                                     max_position_embeddings=24, dropout=0.0, attention_dropout=0.0,
                                     seq_classif_dropout=0.0, num_labels=3, **extra)
        return numlm.DistilBertForSequenceClassification(cfg, seed=1, dtype=dtype)
    cls = {"gpt2": (numlm.GPT2Config, numlm.GPT2LMHeadModel), "openai-gpt": (numlm.OpenAIGPTConfig,
                                                                              numlm.OpenAIGPTLMHeadModel)}[kind]
    cfg = cls[0](vocab_size=40, n_embd=12, n_layer=2, n_head=3, n_positions=24, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0, **extra)
    return cls[1](cfg, seed=1, dtype=dtype)


def make(kind, method, r=2, n=3):
    model = tiny(kind)
    task = "SEQ_CLS" if kind in ENCODERS else "CAUSAL_LM"
    targets = {"bert": ["query", "value", "dense"], "roberta": ["query", "value", "dense"],
               "distilbert": ["q_lin", "v_lin", "lin1"], "gpt2": ["c_attn", "c_fc"], "openai-gpt": ["c_attn", "c_proj"]}
    lora = dict(r=r, lora_alpha=2 * r + 1, target_modules=targets[kind], task_type=task,
                fan_in_fan_out=kind not in ENCODERS)
    cfg = {"lora": lambda: peft.LoraConfig(**lora),
           "rslora": lambda: peft.LoraConfig(**lora, use_rslora=True),
           "dora": lambda: peft.LoraConfig(**lora, use_dora=True, bias="lora_only"),
           "lora-bias-all": lambda: peft.LoraConfig(**lora, bias="all"),
           "ia3": lambda: peft.IA3Config(task_type=task),  # peft's default targets and feed-forward modules
           "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=n, task_type=task),
           "prefix": lambda: peft.PrefixTuningConfig(num_virtual_tokens=n, task_type=task),
           "houlsby": lambda: peft.DoubleSeqBnConfig(reduction_factor=2),
           "pfeiffer": lambda: peft.SeqBnConfig(reduction_factor=3)}[method]()
    pm = peft.get_peft_model(model, cfg, seed=3)
    rng = np.random.default_rng(5)
    for k, v in pm.parameters().items():  # not a no-op adapter
        v[...] = rng.normal(0, 0.3, v.shape)
    return pm


def inputs(kind, B, T, pad, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 40, (B, T))
    mask = np.ones((B, T), dtype=np.int64)
    if pad:
        mask[-1, T - pad:] = 0
    labels = rng.integers(0, 3, B) if kind in ENCODERS else np.where(mask == 1, ids, -100)
    return ids, mask, labels


def numeric_check(pm, ids, mask, labels, entries=3, eps=1e-6, seed=0):
    """Central differences of the loss for a few random entries of every trainable tensor: the worst
    |numeric - analytic| / (largest analytic entry of that tensor + 1e-3); the 1e-3 keeps the ~1e-10
    rounding noise of a central difference from dominating a tensor whose gradients are all tiny.
    DoRA's norms are held at their values here, as its backward holds them (peft detaches them)."""
    for _, m in pm.base_model.modules():
        if isinstance(m, DoraLinear):
            m.fixed_norm = m.norm()
    pm.zero_grad()
    pm(input_ids=ids, attention_mask=mask, labels=labels)
    pm.backward()
    grads = {k: g.copy() for k, g in pm.grad_arrays().items()}
    rng = np.random.default_rng(seed)
    worst = 0.0
    for k, p in pm.parameters().items():
        flat, g = p.reshape(-1), grads[k].reshape(-1)
        for i in rng.choice(flat.size, min(entries, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + eps
            fp = float(pm(input_ids=ids, attention_mask=mask, labels=labels).loss)
            flat[i] = old - eps
            fm = float(pm(input_ids=ids, attention_mask=mask, labels=labels).loss)
            flat[i] = old
            num = (fp - fm) / (2 * eps)
            worst = max(worst, abs(num - g[i]) / (np.abs(grads[k]).max() + 1e-3))
    return worst


METHODS = ["lora", "prompt", "prefix", "houlsby", "pfeiffer", "rslora", "dora", "lora-bias-all", "ia3"]


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "gpt2", "openai-gpt"])
@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=3, deadline=None)
@given(r=st.integers(1, 3), n=st.integers(1, 4), B=st.integers(1, 2), T=st.integers(2, 5), pad=st.integers(0, 1),
       seed=st.integers(0, 2**31))
def test_whole_model_gradcheck(kind, method, r, n, B, T, pad, seed):
    """Every method on BERT, RoBERTa, DistilBERT, GPT-2 and GPT-1 (other sizes, targets, ranks, token counts than the
    references): the trainable gradients of the loss agree with float64 central differences."""
    pm = make(kind, method, r, n)
    ids, mask, labels = inputs(kind, B, T, pad, seed)
    assert numeric_check(pm, ids, mask, labels) < 1e-6


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "gpt2", "openai-gpt"])
def test_numlm_gradcheck_holds_doras_norm_as_its_backward_does(kind):
    """numlm.gradcheck of a DoRA model failed (errors ~1 on lora_A and lora_B): its central differences
    moved the weight norm n the backward holds constant (peft detaches it). The check now holds n
    (Module.detached), and the model is as before after it: n recomputed by the next forward."""
    pm = make(kind, "dora")
    ids, mask, labels = inputs(kind, 2, 4, 1, 0)
    errors = numlm.gradcheck(pm, {"input_ids": ids, "attention_mask": mask, "labels": labels}, max_entries=4, eps=1e-5)
    assert max(errors.values()) < 1e-5, errors
    assert any(".lora_A." in k for k in errors) and any("lora_magnitude_vector" in k for k in errors)
    dora = [m for _, m in pm.base_model.modules() if isinstance(m, DoraLinear)]
    assert dora and all(m.fixed_norm is None for m in dora)


def test_check_model_holds_doras_norm_as_gradcheck_does():
    """inspect.check_model of a DoRA-adapted model (a PeftModel's base_model) failed with errors ~1 on
    lora_A and lora_B: the norm was held by numlm.gradcheck only, not by the check both share."""
    from numlm.inspect import check_model
    pm = make("gpt2", "dora")
    res = check_model(pm.base_model, np.array([[3, 7, 11, 5]]), params=2)
    assert res.passed and any(".lora_B." in r.name for r in res.rows), res.table()
    assert all(m.fixed_norm is None for _, m in pm.base_model.modules() if isinstance(m, DoraLinear))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "openai-gpt"])
@pytest.mark.parametrize("method", METHODS)
def test_no_grad_forward_equals_the_forward_and_training_goes_on(kind, method):
    """Under numlm.no_grad() (evaluation between training steps) every method gives the same loss and
    logits, and the next training step's gradients equal those of a model that never evaluated."""
    pm, fresh = make(kind, method), make(kind, method)
    ids, mask, labels = inputs(kind, 2, 5, 1, 0)
    want = pm(input_ids=ids, attention_mask=mask, labels=labels)
    with numlm.no_grad():
        got = pm(input_ids=ids, attention_mask=mask, labels=labels)
    np.testing.assert_array_equal(got.logits, want.logits)
    assert float(got.loss) == float(want.loss)
    for m in (pm, fresh):
        m.zero_grad()
        m(input_ids=ids, attention_mask=mask, labels=labels)
        m.backward()
    for k, g in fresh.grad_arrays().items():
        np.testing.assert_array_equal(pm.grad_arrays()[k], g)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "openai-gpt"])
def test_merged_equals_unmerged(kind):
    pm = make(kind, "lora", r=3)
    ids, mask, _ = inputs(kind, 2, 5, 1, 0)
    out = pm(input_ids=ids, attention_mask=mask).logits
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, peft.model.LoraLinear) for _, m in merged.modules())
    assert rel(merged(ids, attention_mask=mask).logits, out) < 1e-12
    assert merged.grad_arrays()  # the plain model trains as a whole again


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer", "prompt", "prefix"])
def test_unload_restores_the_base_model(method):
    model = tiny("gpt2")
    ids, mask, _ = inputs("gpt2", 2, 4, 1, 0)
    want = model(ids, attention_mask=mask).logits
    pm = peft.get_peft_model(model, make("gpt2", method).peft_config.__class__(
        **({"num_virtual_tokens": 2} if method in ("prompt", "prefix") else {"reduction_factor": 2})))
    plain = pm.unload()
    np.testing.assert_array_equal(plain(ids, attention_mask=mask).logits, want)
    assert sorted(plain.parameters()) == sorted(tiny("gpt2").parameters())


def test_prompt_semantics_bert_pools_first_virtual_token():
    """BERT SEQ_CLS: the pooler reads position 0, the first virtual token (peft does not move [CLS]);
    token types get n zeros; positions run 0 .. n+T-1."""
    pm = make("bert", "prompt", n=2)
    ids, mask, _ = inputs("bert", 2, 4, 1, 0)
    out = pm(input_ids=ids, attention_mask=mask, token_type_ids=np.ones_like(ids), output_hidden_states=True)
    m = pm.base_model
    P = pm.prompt.params["prompt_embeddings"]
    emb = m.bert.embeddings
    W = emb.word_embeddings.params["weight"]
    e = np.concatenate([np.broadcast_to(P, (2,) + P.shape), W[ids]], 1)
    e = e + emb.position_embeddings.params["weight"][:6]
    e = e + emb.token_type_embeddings.params["weight"][np.concatenate([np.zeros((2, 2), int), np.ones_like(ids)], 1)]
    mu, var = e.mean(-1, keepdims=True), e.var(-1, keepdims=True)
    h0 = (e - mu) / np.sqrt(var + m.config.layer_norm_eps) * emb.LayerNorm.params["weight"] + emb.LayerNorm.params["bias"]
    assert rel(out.hidden_states[0], h0) < 1e-12
    assert out.logits.shape == (2, 3)


def test_prefix_positions_start_at_n():
    """GPT-2 prefix tuning: the real tokens' positions are n .. n+T-1 and logits cover T positions;
    a zero prefix value with keys that no query prefers changes nothing else."""
    pm = make("gpt2", "prefix", n=3)
    ids, mask, _ = inputs("gpt2", 1, 4, 0, 1)
    out = pm(input_ids=ids)
    assert out.logits.shape == (1, 4, 40)
    # the same model without adapter, fed the prefix as its own past keys/values
    c = pm.base_model.config
    past, _ = peft.ops.prefix_forward(pm.prompt.params["prompt_embeddings"], 1, c.n_layer, c.n_head)
    plain = pm.unload()
    want = plain(ids, past_key_values=tuple((np.ascontiguousarray(k), np.ascontiguousarray(v)) for k, v in past),
                 attention_mask=np.ones((1, 7), dtype=np.int64))
    assert rel(out.logits, want.logits) < 1e-12


# ---------------------------------------------------------------------------------------- bad input

def test_bad_configs():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        peft.LoraConfig(r=0)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        peft.LoraConfig(r=-2)
    with pytest.raises(ValueError, match="lora_alpha must be a finite number > 0"):
        peft.LoraConfig(lora_alpha=0)
    with pytest.raises(ValueError, match="lora_alpha must be a finite number > 0"):
        peft.LoraConfig(lora_alpha=-1.0)
    for cls in (peft.PromptTuningConfig, peft.PrefixTuningConfig):
        with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
            cls(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="task_type 'SEQ2SEQ_LM' is not supported"):
        peft.LoraConfig(task_type="SEQ2SEQ_LM")


def _refused(match, call):
    """`call` raises one ValueError line matching `match`."""
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value), str(e.value)


def test_variant_bad_configs():
    _refused(r"use_rslora scales by lora_alpha / sqrt\(r\): r must be a positive integer, got 0",
             lambda: peft.LoraConfig(r=0, use_rslora=True))
    _refused(r"LoRA bias='some' is not supported; peft's are \('none', 'lora_only', 'all'\)",
             lambda: peft.LoraConfig(bias="some"))
    _refused("use_dora must be True or False, got 'yes'", lambda: peft.LoraConfig(use_dora="yes"))
    _refused(r"feedforward_modules \['output.dense'\] are not in target_modules \['key'\]: peft requires",
             lambda: peft.IA3Config(target_modules=["key"], feedforward_modules=["output.dense"]))
    _refused("init_ia3_weights must be True or False", lambda: peft.IA3Config(init_ia3_weights="ones"))


@pytest.mark.parametrize("kind, config, match", [
    ("bert", peft.LoraConfig(target_modules=["LayerNorm"], use_dora=True),
     r"match bert.embeddings.LayerNorm \(LayerNorm\), not a Linear: LORA adapts only Linear modules"),
    ("gpt2", peft.LoraConfig(target_modules=["wte", "c_attn"], use_dora=True),
     r"match transformer.wte \(Embedding\), not a Linear: LORA adapts only Linear"),
    ("gpt2", peft.IA3Config(target_modules=["wte"], feedforward_modules=[]),
     r"match transformer.wte \(Embedding\), not a Linear: IA3 adapts only Linear"),
    ("bert", peft.IA3Config(target_modules=["attention"], feedforward_modules=[]),
     r"match bert.encoder.layer.0.attention \(BertAttention\), not a Linear: IA3 adapts only Linear"),
    ("bert", peft.IA3Config(target_modules=["qkv"]), r"target_modules \['qkv'\] match no Linear module"),
])
def test_targets_peft_refuses_leave_the_model_as_it_was(kind, config, match):
    """A DoRA or IA3 target that is not a Linear is refused as peft refuses it (peft: "Target module ...
    is not supported"), in one line, and the model keeps its modules, values and trainable tensors."""
    model = tiny(kind)
    before = {k: v.copy() for k, v in model.parameters().items()}
    trainable = set(model.grad_arrays())
    _refused(match, lambda: peft.get_peft_model(model, config))
    assert set(model.grad_arrays()) == trainable and getattr(model, "_peft", None) is None
    assert before.keys() == model.parameters().keys()
    for k, v in model.parameters().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("method", ["rslora", "dora", "lora-bias-all", "ia3"])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_new_methods_round_trip_from_scratch(method, kind, tmp_path):
    """get_peft_model, train a step, save_pretrained: the folder loads back onto a fresh base with the
    same logits and every trainable tensor bit-identical, and holds peft's keys for the method."""
    pm = make(kind, method)
    ids, mask, labels = inputs(kind, 2, 5, 1, 0)
    _train(pm, ids, mask, labels, steps=1)
    pm.eval()
    want = pm(input_ids=ids, attention_mask=mask).logits
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("IA3" if method == "ia3" else "LORA")
    back = peft.PeftModel.from_pretrained(tiny(kind), tmp_path)
    np.testing.assert_array_equal(back(input_ids=ids, attention_mask=mask).logits, want)
    got = back.state_dict()
    for k, v in pm.state_dict().items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    suffix = {"rslora": ".lora_B.weight", "dora": ".lora_magnitude_vector", "lora-bias-all": "LayerNorm.bias"
              if kind == "bert" else "ln_f.bias", "ia3": ".ia3_l"}[method]
    assert any(k.endswith(suffix) for k in got)


def test_bias_all_head_keys_as_peft():
    """bias="all" with a trained classifier: peft saves its bias three times (classifier.bias and
    classifier.modules_to_save.bias, the same tensor; classifier.original_module.bias, the base model's);
    numlm writes all three, and a file whose two copies differ is refused by name."""
    pm = load("lora-bias-all-bert-tiny-seqcls")
    sd, base_bias = pm.state_dict(), base("lora-bias-all-bert-tiny-seqcls").classifier.params["bias"]
    np.testing.assert_array_equal(sd["base_model.model.classifier.modules_to_save.bias"],
                                  sd["base_model.model.classifier.bias"])
    np.testing.assert_array_equal(sd["base_model.model.classifier.original_module.bias"], base_bias)
    assert "base_model.model.classifier.modules_to_save.bias" not in pm.parameters()  # trained once
    state = {**sd, "base_model.model.classifier.modules_to_save.bias": np.zeros(3)}
    _refused(r"'base_model.model.classifier.modules_to_save.bias' differs from 'base_model.model.classifier.bias'",
             lambda: pm.load_state_dict(state))


def test_adapterhub_lm_head_tied_accepted_different_refused(tmp_path):
    """adapters' save_adapter(with_head=True) on GPT2LMHeadModel writes lm_head.weight, tied to wte:
    equal to numlm's embedding, it is accepted (the logits those of `adapters`, and saved again); a
    different one is refused by its key, and the model stays as it was."""
    from safetensors.numpy import load_file, save_file
    name = "adapter-gpt2-tiny-lmhead"
    ref = np.load(PEFT / name / "reference.npz")
    pm = load(name)
    out = pm(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])
    assert rel(out.logits, ref["logits"]) < 1e-10
    assert rel(ref["logits"], ref["base_logits"]) > 1e-2  # the adapter is not a no-op
    pm.save_pretrained(tmp_path / "again")
    head = load_file(str(tmp_path / "again" / "model_head.safetensors"))
    np.testing.assert_array_equal(head["lm_head.weight"], load_file(str(PEFT / name / "adapter" /
                                                                        "model_head.safetensors"))["lm_head.weight"])
    d = _copy(name, tmp_path)
    f = d / "model_head.safetensors"
    w = load_file(str(f))["lm_head.weight"]
    save_file({"lm_head.weight": w + 1e-3}, str(f))
    model = base(name)
    before = {k: v.copy() for k, v in model.parameters().items()}
    _refused(r"model_head.safetensors holds 'lm_head.weight', which differs from the base model's "
             r"'transformer.wte.weight' it is tied to", lambda: peft.PeftModel.from_pretrained(model, d))
    assert before.keys() == model.parameters().keys() and getattr(model, "_peft", None) is None
    for k, v in model.parameters().items():
        np.testing.assert_array_equal(v, before[k])


def test_adapterhub_head_tensor_numlm_holds_untied_is_loaded(tmp_path):
    """A head file's tensor that numlm holds in a slot of its own (not tied) and that differs from the
    base model's is loaded there, not dropped, and saved again with the adapter; the tied lm_head, equal
    to the embedding, is kept as it is."""
    from safetensors.numpy import save_file
    pm = make("gpt2", "houlsby")
    pm.save_pretrained(tmp_path)
    model = tiny("gpt2")
    head = {"lm_head.weight": model.state_dict()["lm_head.weight"], "transformer.ln_f.bias": np.arange(12.0)}
    save_file(head, str(tmp_path / "model_head.safetensors"))
    (tmp_path / "head_config.json").write_text(json.dumps({"config": None, "model_class": "GPT2LMHeadModel"}))
    back = peft.PeftModel.from_pretrained(model, tmp_path)
    np.testing.assert_array_equal(model.transformer.ln_f.params["bias"], np.arange(12.0))
    ids, mask, _ = inputs("gpt2", 2, 4, 1, 0)
    back.save_pretrained(tmp_path / "again")
    again = peft.PeftModel.from_pretrained(tiny("gpt2"), tmp_path / "again")
    np.testing.assert_array_equal(again(input_ids=ids, attention_mask=mask).logits,
                                  back(input_ids=ids, attention_mask=mask).logits)
    assert json.loads((tmp_path / "again" / "head_config.json").read_text())["model_class"] == "GPT2LMHeadModel"


def test_target_modules_matching_nothing():
    with pytest.raises(ValueError, match=r"target_modules \['qkv'\] match no Linear module.*'query'"):
        peft.get_peft_model(tiny("bert"), peft.LoraConfig(target_modules=["qkv"]))


def test_virtual_plus_real_tokens_above_the_position_table():
    for method in ("prompt", "prefix"):
        pm = make("gpt2", method, n=4)
        with pytest.raises(ValueError, match=r"num_virtual_tokens 4 \+ 21 tokens = 25 exceed the position table \(24"):
            pm(input_ids=np.ones((1, 21), dtype=np.int64))
    with pytest.raises(ValueError, match="leaves no room in the position table"):
        peft.get_peft_model(tiny("bert"), peft.PromptTuningConfig(num_virtual_tokens=24))


def test_reduction_factor_not_dividing_hidden_size():
    with pytest.raises(ValueError, match="reduction_factor 5 does not divide the hidden size 12"):
        peft.get_peft_model(tiny("bert"), peft.DoubleSeqBnConfig(reduction_factor=5))
    with pytest.raises(ValueError, match="reduction_factor must be a positive number"):
        peft.SeqBnConfig(reduction_factor=0)


def _copy(name, tmp_path):
    d = tmp_path / name
    shutil.copytree(PEFT / name / "adapter", d)
    return d


def test_unknown_peft_type_or_config(tmp_path):
    d = _copy("lora-bert-tiny-seqcls", tmp_path)
    orig = json.loads((d / "adapter_config.json").read_text())
    for change, msg in (({"peft_type": "VERA"}, "peft_type 'VERA' is not supported"),
                        ({"lora_bias": True}, "lora_bias"),
                        ({"rank_pattern": {"query": 8}}, "rank_pattern"),
                        ({"layer_replication": [[0, 1]]}, r"options \['layer_replication'\]")):
        (d / "adapter_config.json").write_text(json.dumps({**orig, **change}))
        with pytest.raises(ValueError, match=msg):
            peft.PeftModel.from_pretrained(base("lora-bert-tiny-seqcls"), d)
    h = _copy("adapter-bert-tiny-seqcls", tmp_path)
    cfg = json.loads((h / "adapter_config.json").read_text())
    cfg["config"]["use_gating"] = True
    (h / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"\['use_gating'\] are not supported"):
        peft.PeftModel.from_pretrained(base("adapter-bert-tiny-seqcls"), h)
    cfg["config"].update(use_gating=False, architecture="prefix_tuning")
    (h / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture 'prefix_tuning' is not supported"):
        peft.PeftModel.from_pretrained(base("adapter-bert-tiny-seqcls"), h)


def test_adapter_not_fitting_the_base_model(tmp_path):
    from safetensors.numpy import load_file, save_file
    d = _copy("lora-bert-tiny-seqcls", tmp_path)
    f = d / "adapter_model.safetensors"
    state = load_file(str(f))
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    save_file({**state, key: np.zeros((31, 4))}, str(f))
    with pytest.raises(ValueError, match=rf"{key}' has shape \(31, 4\), but the base model needs \(32, 4\)"):
        peft.PeftModel.from_pretrained(base("lora-bert-tiny-seqcls"), d)
    bad = "base_model.model.bert.encoder.layer.7.attention.self.query.lora_A.weight"
    save_file({**state, bad: np.zeros((4, 32))}, str(f))
    with pytest.raises(ValueError, match=rf"key '{bad}' does not fit"):
        peft.PeftModel.from_pretrained(base("lora-bert-tiny-seqcls"), d)
    # a GPT-2 adapter onto a GPT-2 of another width
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.lora_A.weight' has shape \(4, 32\), but the "
                                         r"base model needs \(4, 12\)"):
        peft.PeftModel.from_pretrained(tiny("gpt2"), PEFT / "lora-gpt2-tiny" / "adapter")
    with pytest.raises(ValueError, match=r"PROMPT_TUNING config does not fit GPT2LMHeadModel: token_dim 32 \(the "
                                         r"model's 12\), num_attention_heads 4 \(the model's 3\)"):
        peft.PeftModel.from_pretrained(tiny("gpt2"), PEFT / "prompt-gpt2-tiny" / "adapter")
    # a prefix over the same number of numbers, L * 2 * C, but another shape (the table's width alone fits)
    tall = numlm.GPT2LMHeadModel(numlm.GPT2Config(vocab_size=99, n_positions=64, n_embd=64, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match=r"PREFIX_TUNING config does not fit GPT2LMHeadModel: token_dim 32 \(the "
                                         r"model's 64\), num_layers 2 \(the model's 1\)"):
        peft.PeftModel.from_pretrained(tall, PEFT / "prefix-gpt2-tiny" / "adapter")
    assert len(tall.trainable_parameters()) == len(tall.parameters())  # refused before anything froze
    with pytest.raises(ValueError, match="an adapter for model type 'bert', the base model is 'gpt2'"):
        peft.PeftModel.from_pretrained(tiny("gpt2"), PEFT / "adapter-bert-tiny-seqcls" / "adapter")


def test_merge_and_unload_needs_lora():
    for method in ("prompt", "prefix", "houlsby"):
        with pytest.raises(ValueError, match="merge_and_unload needs a LoRA or IA3 adapter"):
            make("gpt2", method).merge_and_unload()


def test_failed_load_leaves_the_base_model_untouched(tmp_path):
    from safetensors.numpy import load_file, save_file
    model = base("lora-bert-tiny-seqcls")
    want = {k: v.copy() for k, v in model.parameters().items()}
    with pytest.raises(ValueError, match="task_type CAUSAL_LM needs a \\*LMHeadModel model, got BertForSequence"):
        peft.PeftModel.from_pretrained(model, PEFT / "prompt-gpt2-tiny" / "adapter")
    d = _copy("lora-bert-tiny-seqcls", tmp_path)
    state = load_file(str(d / "adapter_model.safetensors"))
    state["base_model.model.classifier.weight"] = np.zeros((2, 32))
    save_file(state, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="classifier.weight' has shape"):
        peft.PeftModel.from_pretrained(model, d)  # fails after the LoRA linears went in: they come out again
    assert sorted(model.parameters()) == sorted(want)
    assert model.grad_arrays().keys() == want.keys()
    pm = peft.PeftModel.from_pretrained(model, PEFT / "lora-bert-tiny-seqcls" / "adapter")  # still usable
    assert pm.kind == "LORA"


def test_prompt_tuning_token_labels_and_gpt2_classifier_pooling():
    """Per-token labels (masked LM) get n times -100 in front; GPT-2's sequence classifier, which
    transformers feeds inputs_embeds under peft, pools the last position whatever the padding."""
    cfg = numlm.BertConfig(vocab_size=40, hidden_size=12, num_hidden_layers=1, num_attention_heads=3,
                           intermediate_size=20, max_position_embeddings=24)
    pm = peft.get_peft_model(numlm.BertForMaskedLM(cfg, seed=1, dtype="float64").eval(),
                             peft.PromptTuningConfig(num_virtual_tokens=2))
    ids, mask, _ = inputs("bert", 2, 5, 1, 0)
    labels = np.where(mask == 1, ids, -100)
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 7, 40)
    x, t = out.logits[:, 2:].reshape(-1, 40), labels.reshape(-1)
    x, t = x[t != -100], t[t != -100]
    m = x.max(-1, keepdims=True)
    assert rel(out.loss, np.mean(np.log(np.exp(x - m).sum(-1)) + m[:, 0] - x[np.arange(len(t)), t])) < 1e-12
    g = numlm.GPT2Config(vocab_size=40, n_embd=12, n_layer=1, n_head=3, n_positions=24, pad_token_id=0, num_labels=3)
    pm = peft.get_peft_model(numlm.GPT2ForSequenceClassification(g, seed=1, dtype="float64").eval(),
                             peft.PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"))
    out = pm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    W = pm.base_model.score.params["weight"]  # (C, K)
    np.testing.assert_allclose(out.logits, out.hidden_states[-1][:, -1] @ W, rtol=1e-12)
    assert numeric_check(pm, ids, mask, np.array([0, 2])) < 1e-6


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_trainer_trains_and_resumes_a_peft_model_bit_exactly(method, tmp_path):
    """The Trainer takes a PeftModel: its checkpoints hold the adapter in the library's files (plus
    the optimizer's moments of the trainable tensors), and an interrupted run resumes bit-exactly."""
    from numlm.train import Trainer, TrainConfig
    from numlm.data.pretrain import TokenStream
    import sys
    sys.path.insert(0, str(FIXTURES.parent))
    from test_train import Interrupting

    def pm(seed=0):
        model = numlm.GPT2LMHeadModel(numlm.GPT2Config(vocab_size=40, n_embd=12, n_layer=2, n_head=3, n_positions=24),
                                      seed=0)  # the same base model; dropout 0.1: its generator is checkpointed
        model.set_seed(seed)
        cfg = (peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True) if method == "lora"
               else peft.PrefixTuningConfig(num_virtual_tokens=3))
        return peft.get_peft_model(model, cfg, seed=seed)

    def stream(seed=0):
        return TokenStream(np.random.default_rng(1).integers(0, 40, 500), 6, 3, rng=np.random.default_rng(seed))

    def config(d):
        return TrainConfig(out_dir=str(d), max_steps=6, lr=1e-2, warmup=1, save_every=2, eval_every=10,
                           log_every=1, progress=False)

    full = Trainer(pm(), stream(), config(tmp_path / "full"))
    full.run()
    cut = Trainer(pm(), Interrupting(stream(), at=4), config(tmp_path / "cut"))
    assert cut.run()["interrupted"]
    ckpt = sorted((tmp_path / "cut" / "checkpoints").iterdir())[-1]
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    again = Trainer(pm(seed=5), stream(seed=9), config(tmp_path / "cut"))  # another adapter init and dropout
    assert again.resume() == 3
    again.run()
    a, b = full.model.parameters(), again.model.parameters()
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in full.optimizer.exp_avg:
        np.testing.assert_array_equal(full.optimizer.exp_avg[k], again.optimizer.exp_avg[k])


@pytest.mark.parametrize("side", ["right", "left"])
def test_prompt_tuned_gpt2_classifier_pools_where_peft_pools(side):
    """peft hands GPT2ForSequenceClassification inputs_embeds without input_ids, so transformers cannot
    see the padding and pools the last position, n + T - 1, of every row: a pad position for a
    right-padded row. numlm's prompt tuning goes through the same inputs_embeds hook and must give the
    same logits, loss and gradients on either padding side (reference: peft 0.21 on transformers)."""
    ref = np.load(PEFT / "prompt-gpt2-tiny-seqcls" / "reference.npz")
    r = (lambda k: ref[k]) if side == "right" else (lambda k: ref["left/" + k])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the score head comes from the adapter file
        model = numlm.GPT2ForSequenceClassification.from_pretrained(FIXTURES / "hf" / "gpt2-tiny-seqcls",
                                                                    dtype="float64")
    pm = peft.PeftModel.from_pretrained(model, PEFT / "prompt-gpt2-tiny-seqcls" / "adapter", is_trainable=True)
    out = pm(input_ids=r("input_ids"), attention_mask=r("attention_mask"), labels=r("labels"))
    assert rel(out.logits, r("logits")) < 1e-10
    assert abs(out.loss - r("loss")) / abs(r("loss")) < 1e-10
    if side == "right":  # the last real token would give other logits: the check can fail
        assert rel(r("logits_at_last_real_token"), r("logits")) > 1e-3
    pm.zero_grad()
    pm.backward()
    grads = pm.gradients()
    for k in ("prompt_embeddings", "base_model.score.weight"):
        assert rel(grads[k], r("grad/" + k)) < 1e-10, k


@pytest.mark.parametrize("method", ["prompt", "prefix", "lora"])
def test_gpt1_l3_classification_through_an_adapter(method):
    """GPT2ForSequenceClassification with lm_labels (L3 = loss + lm_coef * lm_loss) under an adapter:
    prompt tuning's virtual tokens predict nothing (their LM labels are -100), and the objective's
    trainable gradients agree with float64 central differences of pm.objective."""
    cfg = numlm.GPT2Config(vocab_size=30, n_positions=16, n_embd=8, n_layer=2, n_head=2, pad_token_id=0,
                           num_labels=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = {"prompt": peft.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"),
              "prefix": peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"),
              "lora": peft.LoraConfig(r=2, target_modules=["c_attn"], task_type="SEQ_CLS", init_lora_weights=False)}
    pm = peft.get_peft_model(numlm.GPT2ForSequenceClassification(cfg, seed=1, dtype="float64"), config[method])
    ids = np.array([[5, 9, 14, 3, 0], [7, 2, 8, 11, 6]])
    kw = dict(input_ids=ids, attention_mask=(ids != 0).astype(np.int64), labels=np.array([1, 0]), lm_labels=ids,
              lm_coef=0.5)
    out = pm(**kw)
    assert pm.objective(out) == pytest.approx(out.loss + 0.5 * out.lm_loss, rel=1e-12)
    plain = pm(**{k: v for k, v in kw.items() if k not in ("lm_labels", "lm_coef")})
    assert out.loss == pytest.approx(plain.loss, rel=1e-12) and out.lm_loss > 1.0
    pm.zero_grad()
    pm(**kw)
    pm.backward()
    grads = {k: g.copy() for k, g in pm.grad_arrays().items()}
    eps, worst = 1e-6, 0.0
    for k, p in pm.parameters().items():
        flat = p.reshape(-1)
        for i in np.random.default_rng(0).choice(flat.size, min(4, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + eps
            fp = pm.objective(pm(**kw))
            flat[i] = old - eps
            fm = pm.objective(pm(**kw))
            flat[i] = old
            worst = max(worst, abs((fp - fm) / (2 * eps) - grads[k].reshape(-1)[i]) / np.abs(grads[k]).max())
    assert worst < 1e-6


def _state(model):
    return ([id(m) for _, m in model.modules()], sorted(model.grad_arrays()),
            {k: v.copy() for k, v in model.parameters().items()})


@pytest.mark.parametrize("config, match", [
    (lambda: peft.LoraConfig(target_modules=["nope"], task_type="SEQ_CLS"), "match no"),
    (lambda: peft.LoraConfig(target_modules=["query", "nope"], task_type="SEQ_CLS"), r"\['nope'\] match no module"),
    (lambda: peft.LoraConfig(target_modules=r"x.*y", task_type="SEQ_CLS"), "match no"),
    (lambda: peft.PromptTuningConfig(num_virtual_tokens=16, task_type="SEQ_CLS"), "no room"),
    (lambda: peft.PrefixTuningConfig(num_virtual_tokens=16, task_type="SEQ_CLS"), "no room"),
])
def test_a_failed_get_peft_model_leaves_the_model_as_it_was(config, match):
    """Before, a refusal left every parameter frozen (the next full training changed nothing) and the
    matching LoRA linears in place; now modules, trainable set and values are as they were."""
    cfg = numlm.BertConfig(vocab_size=40, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                           intermediate_size=16, max_position_embeddings=16, num_labels=2)
    model = numlm.BertForSequenceClassification(cfg, seed=0)
    model.freeze(["bert.embeddings.word_embeddings.weight"])  # a trainable set that is not "everything"
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        peft.get_peft_model(model, config())
    after = _state(model)
    assert after[:2] == before[:2]
    for k, v in before[2].items():
        np.testing.assert_array_equal(after[2][k], v)
    assert len(peft.get_peft_model(model, peft.LoraConfig(target_modules=["query"], task_type="SEQ_CLS")).parameters())


def test_a_failed_adapter_load_leaves_the_head_as_it_was(tmp_path):
    """An adapter file whose classifier does not fit: refused before anything is copied (the head used to
    be overwritten by the tensors read before the bad one), and the model keeps no adapter."""
    name = "lora-bert-tiny-seqcls"
    folder = tmp_path / "adapter"
    import shutil
    shutil.copytree(PEFT / name / "adapter", folder)
    from safetensors.numpy import load_file, save_file
    state = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in state if "lora_A" in k)
    state[key] = np.zeros((state[key].shape[0] + 1, state[key].shape[1]), state[key].dtype)  # a later key breaks
    save_file(state, folder / "adapter_model.safetensors")
    model = base(name)
    before = _state(model)
    with pytest.raises(ValueError, match="has shape"):
        peft.PeftModel.from_pretrained(model, folder, is_trainable=True)
    after = _state(model)
    assert after[:2] == before[:2]
    for k, v in before[2].items():
        np.testing.assert_array_equal(after[2][k], v)


def test_lora_alpha_must_be_finite():
    for alpha in (float("inf"), float("nan"), 0, -1):
        with pytest.raises(ValueError, match="lora_alpha must be a finite number > 0"):
            peft.LoraConfig(lora_alpha=alpha)


@pytest.mark.parametrize("name", [v for v in VARIANTS if "gpt2" in v])
def test_generate_from_a_variant_equals_its_merged_model(name):
    """numlm.generate on a GPT-2 with rsLoRA, DoRA, trained biases or IA3 (KV cache, each step's
    forward through the adapted linears) writes the tokens its merged plain model writes."""
    ids = np.load(PEFT / name / "reference.npz")["input_ids"][:1, :5]
    got = numlm.generate(load(name), ids, max_new_tokens=6)
    want = numlm.generate(load(name).merge_and_unload(), ids, max_new_tokens=6)
    assert got.shape == (1, 11)
    np.testing.assert_array_equal(got, want)
