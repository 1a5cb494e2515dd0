#!/usr/bin/env python
"""BERT-base forward inference throughput, PyTorch on CPU (float32): the twin of
numlm_side.py --workload bert-base-infer.

Model: transformers BertModel(BertConfig()) -- default bert-base config
(L=12, H=768, A=12, I=3072, V=30522, max_pos=512, GELU-erf), random init
(seed 0), eval mode, includes the pooler. Batch 8, seq 128, random token ids,
token_type_ids all 0, no attention mask (no padding). Timed under
torch.no_grad(); sequences/s = 8 / forward wall time.
--warmup (default 3) untimed forwards, then timed forwards until --iters
(default 12) *quiet* ones (other processes used <= 5% of the machine, see
_benchutil.py) were collected or --max-iters (default 40) were run; median,
min, max reported over all and over quiet forwards ("quiet" = quote).

Forward FLOPs (matmuls only) = 2*tokens*L*(4H^2 + 2*H*I) + 4*L*T*H*tokens
+ 2*B*H^2 (pooler). MFU = achieved / --peak-gflops when given.

Run: python benchmarks/torch_bert_infer.py [--peak-gflops 190]   (prints one JSON line; needs _benchutil.py)
"""
import argparse
import json
import torch

from _benchutil import Sample, summarize


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=12, help="quiet timed forwards wanted")
    ap.add_argument("--max-iters", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak-gflops", type=float, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import BertConfig, BertModel
    cfg = BertConfig()
    model = BertModel(cfg).eval()
    B, T = args.batch, args.seq
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    types = torch.zeros_like(ids)

    times, foreign = [], []
    with torch.no_grad():
        i = 0
        while True:
            with Sample() as s:
                out = model(input_ids=ids, token_type_ids=types)
                _ = out.last_hidden_state[0, 0, 0].item()
            i += 1
            if i <= args.warmup:
                continue
            times.append(s.dt)
            foreign.append(s.foreign)
            nq = sum(1 for f in foreign if f is not None and f <= 0.05)
            if nq >= args.iters or len(times) >= args.max_iters or (
                    s.foreign is None and len(times) >= args.iters):
                break

    L, H, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    tokens = B * T
    flops = 2 * tokens * L * (4 * H * H + 2 * H * I) + 4 * L * T * H * tokens + 2 * B * H * H
    sps = [B / t for t in times]
    summ = summarize(sps, foreign)
    best = summ.get("quiet") or summ["all"]
    med = B / best["median"]
    res = {"script": "torch_bert_infer", "threads": torch.get_num_threads(),
           "torch": torch.__version__, "attn_impl": model.config._attn_implementation,
           "params": sum(p.numel() for p in model.parameters()), "batch": B, "seq": T,
           "warmup": args.warmup, "seq_per_s": summ, "seq_per_s_median": best["median"],
           "n_quiet": (summ.get("quiet") or {}).get("n", 0),
           "flops_per_fwd": flops, "achieved_gflops": flops / med / 1e9}
    if args.peak_gflops:
        res["peak_gflops"] = args.peak_gflops
        res["mfu"] = res["achieved_gflops"] / args.peak_gflops
    import resource
    res["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


if __name__ == "__main__":
    main()
