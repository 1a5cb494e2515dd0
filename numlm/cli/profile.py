"""`numlm profile`: where a training step's (or a generation's) time goes, per op and per layer."""

import numpy as np


def cmd_profile(a):
    from ..profile import WORKLOADS, Profile, build_workload, profile_training
    if a.target in WORKLOADS and (a.batch is not None or (a.seq is not None and not a.generate)):
        raise ValueError(f"--batch and --seq size a model directory's batch; the workload {a.target} has its own")
    if a.generate and a.batch is not None:
        raise ValueError("--generate profiles one prompt (--seq sets its length); --batch sizes training batches")
    if a.target in WORKLOADS:
        model, batch = build_workload(a.target, dtype=a.dtype)
    else:
        from ..io.hub import resolve
        from ..models import from_pretrained
        try:
            folder = resolve(a.target)  # a folder, or a Hub name through the Hugging Face cache
        except ValueError as e:
            raise ValueError(f"{a.target!r} is neither a workload ({', '.join(WORKLOADS)}) nor a model: {e}") from None
        model = from_pretrained(folder, dtype=a.dtype).train()
        batch = None
    cfg = model.config
    V = cfg.vocab_size
    positions = cfg.max_tokens
    T = a.seq or (32 if a.generate else 128)
    if (batch is None or a.generate) and T > positions:
        raise ValueError(f"--seq {T}{' (the default)' if a.seq is None else ''} is above the model's {positions} "
                         f"positions; pass --seq {positions} or less")
    if a.generate:
        from ..decoding import generate
        ids = np.random.default_rng(0).integers(0, V, (1, T))
        model.eval()
        run = lambda: generate(model, ids, max_new_tokens=a.generate, eos_token_id=[])  # noqa: E731
        run()  # warm-up (compiles the kernels)
        with Profile(model, a.clock) as prof:
            for _ in range(a.steps):
                with prof.phase("generate"):
                    run()
        print(f"{type(model).__name__}: {ids.shape[1]}-token prompt + {a.generate} new tokens, greedy, KV cache")
    else:
        if batch is None:
            batch = _random_batch(model, a.batch or 8, T)
        from ..train import reuse_freed_memory
        reuse_freed_memory()  # as the Trainer: each step's activations are not page-faulted in again
        prof = profile_training(model, batch, steps=a.steps, warmup=a.warmup, clock=a.clock)
        B, T = np.shape(batch["input_ids"])
        print(f"{type(model).__name__} training step, batch {B} x {T}, {model.dtype}, "
              f"{model.num_parameters() / 1e6:.1f} M parameters")
    print(prof.table(steps=a.steps, top=a.top))
    return 0


def _random_batch(model, B, T):
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    ids = rng.integers(0, V, (B, T))
    name = type(model).__name__
    if name == "BertForPreTraining" or name.endswith("ForMaskedLM"):
        labels = np.where(rng.random((B, T)) < 0.15, ids, -100)
        batch = dict(input_ids=ids, labels=labels)
        if name == "BertForPreTraining":
            batch["next_sentence_label"] = rng.integers(0, 2, B)
        return batch
    if name.endswith("LMHeadModel"):
        return dict(input_ids=ids, labels=ids)
    raise ValueError(f"numlm profile trains LM models (BertForPreTraining, *ForMaskedLM, *LMHeadModel); "
                     f"got {name}")


def add_parser(sub):
    from .args import count
    p = sub.add_parser("profile", help="time per op and per layer of a training step (or of generation)")
    p.add_argument("target", help="a workload (gpt-mini, gpt-small, bert-mini), a model directory or a Hub name")
    p.add_argument("--steps", type=count(1), default=3, help="timed steps (default 3)")
    p.add_argument("--warmup", type=count(0), default=1, help="untimed steps first (default 1: compiles kernels)")
    p.add_argument("--batch", type=count(1), help="batch size for a model directory (default 8)")
    p.add_argument("--seq", type=count(1), help="sequence length (default 128; prompt length with --generate, 32)")
    p.add_argument("--generate", type=count(1), metavar="N", help="profile greedy generation of N tokens instead")
    p.add_argument("--top", type=count(1), help="show only the N largest op rows")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="elapsed time, or CPU time of this process (not inflated by other processes)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.set_defaults(fn=cmd_profile)
