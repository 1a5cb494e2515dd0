"""`numlm finetune`: registered on the main parser by add_parsers(subparsers)."""
import json
import sys

from .args import count, number, path, positive
from ..finetune import FinetuneArgs, METHODS, TASKS
from ..io.hub import folder as resolve_model_dir


def cmd_finetune(a):
    from ..finetune import finetune
    from ..inspect import plots_line
    a.model_dir = resolve_model_dir(a.model_dir)  # a folder, or a Hub name through the Hugging Face cache
    args = FinetuneArgs(**{f: getattr(a, f) for f in FinetuneArgs.__dataclass_fields__})
    res = finetune(args)
    if res.get("interrupted"):
        print(f"{a._prog}: interrupted; --resume continues the run in {a.out}", file=sys.stderr)
        return 130
    keys = [k for k in res if k.startswith(("val_", "test_", "majority", "all_O", "first_speaker"))]
    print(json.dumps({k: res[k] for k in keys + ["trainable_params", "train_seconds", "peak_mb"] if k in res}, indent=1))
    print(f"best model and tokenizer saved to {a.out}/best; results in {a.out}/results.json")
    print(plots_line(a.out, res.get("plots")))
    return 0


def add_parsers(sub):
    f = sub.add_parser("finetune", help="fine-tune a pretrained BERT or GPT on a task",
                       description="Fine-tune MODEL_DIR (config.json, model.safetensors, tokenizer.json). "
                       "Defaults: AdamW, lr 5e-5 (1e-3 head, 5e-4 LoRA), 10%% linear warmup then linear "
                       "decay, clipping 1.0, batch 32, 2 epochs.")
    f.add_argument("model_dir", type=path)
    f.add_argument("--data", type=path, required=True, help="rotten-tomatoes, shakespeare-ner, shakespeare-qa, "
                   "shakespeare-mc, shakespeare (causal-lm), a .csv / .jsonl file (text,label or "
                   "text_a,text_b,label), or a .txt file (causal-lm: documents separated by blank lines)")
    f.add_argument("--task", choices=TASKS, default="seqcls")
    f.add_argument("--method", choices=METHODS, default="full")
    f.add_argument("--out", type=path, required=True)
    f.add_argument("--epochs", type=count(1), default=2)
    f.add_argument("--max-steps", type=count(1))
    f.add_argument("--batch-size", type=count(1), default=32)
    f.add_argument("--lr", type=positive)
    f.add_argument("--warmup", type=number(0, 1, low_open=False), default=0.1, help="fraction of the steps")
    f.add_argument("--weight-decay", type=number(0, low_open=False), default=0.01)
    f.add_argument("--max-length", type=count(1),
                   help="tokens per example (64 seqcls/tokcls, 256 qa, 128 multiple-choice and causal-lm's blocks)")
    f.add_argument("--seed", type=count(0), default=0)
    f.add_argument("--freeze-layers", type=count(0), help="freeze the embeddings and the first K layers")
    f.add_argument("--unfreeze", choices=["gradual"], help="unfreeze one layer more, top down, at equal intervals")
    f.add_argument("--r", type=count(1), help="LoRA rank (default 8)")
    f.add_argument("--alpha", type=positive, help="LoRA alpha (default 16)")
    f.add_argument("--target", help="LoRA target modules, comma-separated (default query,value for BERT, "
                   "c_attn for GPT)")
    f.add_argument("--num-virtual-tokens", type=count(1), help="prompt / prefix length (default 20)")
    f.add_argument("--reduction-factor", type=count(1), help="adapter bottleneck C / m (default 16)")
    f.add_argument("--lm-coef", type=number(0, low_open=False),
                   help="GPT: L3 = L2 + lm_coef * L1 (default 0.5; 0 turns it off)")
    f.add_argument("--num-labels", type=count(1))
    f.add_argument("--max-examples", type=count(1), help="use at most this many examples (causal-lm: blocks) per split")
    f.add_argument("--eval-batch-size", type=count(1), default=64)
    f.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    f.add_argument("--allow-changes", action="store_true", help="--resume although the data, tokenizer, batch "
                   "size, step count, --lr, --warmup or --weight-decay differ from the checkpoint's")
    f.add_argument("--overwrite", action="store_true", help="start again in an --out that holds a run")
    f.add_argument("--no-progress", dest="progress", action="store_false")
    f.set_defaults(fn=cmd_finetune, clip=1.0)
