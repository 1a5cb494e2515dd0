#!/usr/bin/env python
"""Training-step throughput of small GPT / BERT models in PyTorch on CPU (float32): the PyTorch twin of
numlm_side.py's gpt-mini, gpt-small and bert-mini (never imported by numlm; run it in a PyTorch venv).
numlm must run the SAME workloads. One training step = zero_grad + forward + loss + backward +
AdamW update. Inputs are random token ids made once, outside the timed region.

Workloads (--workload):
  gpt-mini  : pre-LN GPT-2 decoder, L=4, heads=4, d=256, d_ff=1024, T=128,
              V=8192, B=16, tied wte/lm_head, GELU-tanh, no dropout, biases on.
  gpt-small : same family, L=6, heads=6, d=384, d_ff=1536, T=256, V=8192, B=8.
  bert-mini : post-LN BERT encoder, L=4, H=256, A=4, I=1024, T=128, V=8192,
              type_vocab=2, B=16, GELU-erf, no padding (no attention mask).
              Loss = MLM CE over 19 (=15% of 128) masked positions per sequence
              + NSP CE. MLM head: dense+gelu+LN, decoder tied to word
              embeddings + bias. NSP head: pooler (dense+tanh on [CLS]) + Linear(H,2).

Implementations (--impl):
  torch : plain nn.Module written here (nanoGPT style, F.scaled_dot_product_attention).
  hf    : transformers GPT2LMHeadModel / BertForPreTraining with matching configs
          (default attn implementation = sdpa; GPT-2 uses HF's default
          activation "gelu_new", i.e. tanh-GELU written as elementwise ops).

BERT MLM head placement (--mlm-head, bert only):
  all    : (default, what HF BertForPreTraining does) head + decoder on all
           B*T positions, loss with ignore_index=-100 on unmasked positions.
  gather : (original-TF-BERT style, torch impl only) gather the 19 masked
           positions per sequence first, head + decoder only on those.

Optimizer: torch.optim.AdamW(lr=1e-4, weight_decay=0.01), PyTorch defaults
otherwise (on CPU this is the single-tensor for-loop implementation); --fused
switches to fused=True.

Measure: --warmup steps (default 3) untimed, then timed steps (time.perf_counter)
until --steps (default 12) *quiet* steps are collected or --max-steps (default
40) timed steps were run. A step is quiet when other processes used <= 5% of
the machine's CPU during it (see _benchutil.py; this VM is shared). tokens/s =
B*T / step_time; median, min, max reported over all timed steps and over the
quiet ones ("quiet" is the figure to quote).

FLOPs per step (analytic, matmuls only; biases, LayerNorm, softmax, GELU,
embedding lookup and optimizer ignored; backward = 2x forward):
  per token fwd, per layer: QKV 6d^2 + out-proj 2d^2 + MLP 4*d*d_ff
                           + attention QK^T 2*T*d + AV 2*T*d (full TxT, causal mask NOT halved)
  LM head / MLM decoder: 2*d*V per head position (+ 2*d^2 BERT MLM transform)
  BERT pooler+NSP: 2*(d^2 + 2d) per sequence
  => step FLOPs = 6*tokens*L*(4d^2 + 2 d d_ff) + 12*L*T*d*tokens
                  + 6*head_positions*(d*V [+ d^2 bert]) + 6*B*(d^2+2d) [bert]
  (Equivalently 6*N_matmul*tokens + 12*L*T*d*tokens, N_matmul = matmul weights
  incl. the tied output embedding, when the head runs on every token.)
MFU = (step FLOPs / quiet-median step time) / --peak-gflops (measured GEMM peak,
see gemm_peak.py); omitted when --peak-gflops is not given.

Run (each prints one JSON line; needs _benchutil.py next to it):
  python benchmarks/torch_train.py --workload gpt-mini  --impl torch
  python benchmarks/torch_train.py --workload gpt-small --impl hf --peak-gflops 190
  python benchmarks/torch_train.py --workload bert-mini --impl torch --mlm-head gather
"""
import argparse
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from _benchutil import Sample, summarize

CONFIGS = {
    "gpt-mini": dict(kind="gpt", L=4, heads=4, d=256, dff=1024, T=128, V=8192, B=16),
    "gpt-small": dict(kind="gpt", L=6, heads=6, d=384, dff=1536, T=256, V=8192, B=8),
    "bert-mini": dict(kind="bert", L=4, heads=4, d=256, dff=1024, T=128, V=8192, B=16,
                      type_vocab=2, mask_frac=0.15),
}


# --------------------------------------------------------------------------
# Plain PyTorch GPT (nanoGPT style, pre-LN)
# --------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.d = c["heads"], c["d"]
        self.c_attn = nn.Linear(self.d, 3 * self.d)
        self.c_proj = nn.Linear(self.d, self.d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class GPTBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c["d"], eps=1e-5)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c["d"], eps=1e-5)
        self.c_fc = nn.Linear(c["d"], c["dff"])
        self.c_proj = nn.Linear(c["dff"], c["d"])

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte = nn.Embedding(c["V"], c["d"])
        self.wpe = nn.Embedding(c["T"], c["d"])
        self.h = nn.ModuleList(GPTBlock(c) for _ in range(c["L"]))
        self.ln_f = nn.LayerNorm(c["d"], eps=1e-5)
        self.lm_head = nn.Linear(c["d"], c["V"], bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(_init)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for blk in self.h:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# --------------------------------------------------------------------------
# Plain PyTorch BERT (post-LN) with MLM + NSP heads
# --------------------------------------------------------------------------
class BertLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d"]
        self.h = c["heads"]
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=1e-12)
        self.inter = nn.Linear(d, c["dff"])
        self.out = nn.Linear(c["dff"], d)
        self.ln2 = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v)  # no padding -> no mask
        x = self.ln1(x + self.attn_out(a.transpose(1, 2).contiguous().view(B, T, C)))
        return self.ln2(x + self.out(F.gelu(self.inter(x))))  # erf GELU


class Bert(nn.Module):
    def __init__(self, c, gather):
        super().__init__()
        d = c["d"]
        self.gather = gather
        self.word = nn.Embedding(c["V"], d)
        self.pos = nn.Embedding(c["T"], d)
        self.typ = nn.Embedding(c["type_vocab"], d)
        self.ln_emb = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c["L"]))
        self.pooler = nn.Linear(d, d)
        self.nsp = nn.Linear(d, 2)
        self.mlm_dense = nn.Linear(d, d)
        self.mlm_ln = nn.LayerNorm(d, eps=1e-12)
        self.mlm_bias = nn.Parameter(torch.zeros(c["V"]))  # decoder weight = self.word.weight
        self.apply(_init)

    def forward(self, ids, types, mlm_pos, mlm_labels, mlm_labels_full, nsp_labels):
        B, T = ids.shape
        x = self.ln_emb(self.word(ids) + self.pos(torch.arange(T)) + self.typ(types))
        for lyr in self.layers:
            x = lyr(x)
        nsp_logits = self.nsp(torch.tanh(self.pooler(x[:, 0])))
        if self.gather:  # head only on the masked positions
            h = x.gather(1, mlm_pos.unsqueeze(-1).expand(-1, -1, x.size(-1)))
            labels = mlm_labels
        else:  # head on every position, unmasked labels = -100
            h, labels = x, mlm_labels_full
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        logits = F.linear(h, self.word.weight, self.mlm_bias)
        mlm = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                              ignore_index=-100)
        return mlm + F.cross_entropy(nsp_logits, nsp_labels)


def _init(m):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------
def build(c, impl, mlm_head):
    """Return (model, batch_kwargs_builder) where loss = fn()."""
    g = torch.Generator().manual_seed(0)
    B, T, V = c["B"], c["T"], c["V"]
    ids = torch.randint(0, V, (B, T), generator=g)
    if c["kind"] == "gpt":
        targets = torch.randint(0, V, (B, T), generator=g)
        if impl == "torch":
            model = GPT(c)
            return model, lambda: model(ids, targets)
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=c["d"], n_layer=c["L"],
                         n_head=c["heads"], n_inner=c["dff"], resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
        model = GPT2LMHeadModel(cfg)
        # HF shifts labels internally (loss over T-1 positions per sequence)
        return model, lambda: model(input_ids=ids, labels=ids).loss

    # ---- BERT
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, T // 2:] = 1
    k = int(c["mask_frac"] * T)  # 19 masked positions per sequence
    mlm_pos = torch.stack([torch.randperm(T - 1, generator=g)[:k] + 1 for _ in range(B)])
    mlm_pos, _ = mlm_pos.sort(dim=1)
    mlm_labels = torch.randint(0, V, (B, k), generator=g)
    full = torch.full((B, T), -100, dtype=torch.long)
    full.scatter_(1, mlm_pos, mlm_labels)
    nsp = torch.randint(0, 2, (B,), generator=g)
    if impl == "torch":
        model = Bert(c, gather=(mlm_head == "gather"))
        return model, lambda: model(ids, types, mlm_pos, mlm_labels, full, nsp)
    assert mlm_head == "all", "HF BertForPreTraining always runs the MLM head on all positions"
    from transformers import BertConfig, BertForPreTraining
    cfg = BertConfig(vocab_size=V, hidden_size=c["d"], num_hidden_layers=c["L"],
                     num_attention_heads=c["heads"], intermediate_size=c["dff"],
                     max_position_embeddings=T, type_vocab_size=c["type_vocab"],
                     hidden_act="gelu", hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
                     tie_word_embeddings=True)
    model = BertForPreTraining(cfg)
    return model, lambda: model(input_ids=ids, token_type_ids=types, labels=full,
                                next_sentence_label=nsp).loss


def step_flops(c, mlm_head):
    L, d, dff, T, V, B = c["L"], c["d"], c["dff"], c["T"], c["V"], c["B"]
    tokens = B * T
    body = 6 * tokens * L * (4 * d * d + 2 * d * dff)
    attn = 12 * L * T * d * tokens
    if c["kind"] == "gpt":
        head = 6 * tokens * d * V
        extra = 0
    else:
        head_pos = tokens if mlm_head == "all" else B * int(c["mask_frac"] * T)
        head = 6 * head_pos * (d * V + d * d)
        extra = 6 * B * (d * d + 2 * d)
    return {"total": body + attn + head + extra, "layers_matmul": body, "attention": attn,
            "head": head, "pooler_nsp": extra}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=list(CONFIGS), required=True)
    ap.add_argument("--impl", choices=["torch", "hf"], default="torch")
    ap.add_argument("--mlm-head", choices=["all", "gather"], default="all")
    ap.add_argument("--steps", type=int, default=12, help="quiet timed steps wanted")
    ap.add_argument("--max-steps", type=int, default=40, help="cap on timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fused", action="store_true", help="AdamW(fused=True)")
    ap.add_argument("--peak-gflops", type=float, default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = CONFIGS[args.workload]
    model, loss_fn = build(c, args.impl, args.mlm_head)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                            **({"fused": True} if args.fused else {}))

    times, foreign, losses = [], [], []
    i = 0
    while True:
        with Sample() as s:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            opt.step()
            lv = loss.item()
        i += 1
        if i <= args.warmup:
            continue
        times.append(s.dt)
        foreign.append(s.foreign)
        losses.append(lv)
        n_quiet = sum(1 for f in foreign if f is not None and f <= 0.05)
        if n_quiet >= args.steps or len(times) >= args.max_steps:
            break
        if foreign[-1] is None and len(times) >= args.steps:
            break

    tokens = c["B"] * c["T"]
    tps = [tokens / t for t in times]
    summ = summarize(tps, foreign)
    fl = step_flops(c, args.mlm_head)
    best = summ.get("quiet") or summ["all"]
    med_t = tokens / best["median"]
    res = {
        "script": "torch_train", "workload": args.workload, "impl": args.impl,
        "mlm_head": args.mlm_head if c["kind"] == "bert" else None,
        "fused_adamw": args.fused, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "params": n_params, "tokens_per_step": tokens,
        "warmup": args.warmup, "tokens_per_s": summ,
        "tokens_per_s_median": best["median"], "n_quiet": (summ.get("quiet") or {}).get("n", 0),
        "step_ms_median": 1e3 * med_t,
        "flops_per_step": fl, "achieved_gflops": fl["total"] / med_t / 1e9,
        "loss_first_last": [losses[0], losses[-1]],
    }
    if args.impl == "hf":
        res["hf_attn_impl"] = model.config._attn_implementation
    if args.peak_gflops:
        res["peak_gflops"] = args.peak_gflops
        res["mfu"] = res["achieved_gflops"] / args.peak_gflops
    assert all(math.isfinite(v) for v in losses)
    import resource
    res["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


if __name__ == "__main__":
    main()
