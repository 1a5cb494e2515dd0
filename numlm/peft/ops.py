"""The math of parameter-efficient fine-tuning: one forward/backward pair per piece, pure NumPy.

Linear weights in numlm's (C_in, C_out) layout: LoRA's a = lora_A.weight^T (C_in, r) and
b = lora_B.weight^T (r, C_out); an adapter's wd = adapter_down.0.weight^T (C, m), wu (m, C).
Shape letters as in numlm.ops; r is the LoRA rank, m the adapter's bottleneck width, n the
number of virtual tokens.
"""
from typing import NamedTuple, Optional

import numpy as np

from ..ops import activation, layernorm_forward, layernorm_backward, linear_forward, linear_backward, sigmoid
from ..ops._check import float_array, same_dtype
from ..kernels.matmul import mm  # a @ b at one BLAS thread per core (numlm.ops.linear)


# ---------------------------------------------------------------------------------------- LoRA

def lora_forward(x, a, b, scaling):
    """delta = scaling * (x a) b       (peft: scaling * lora_B(lora_A(x)))
    x: (N, C_in)  a: (C_in, r)  b: (r, C_out)  ->  delta: (N, C_out)"""
    float_array("x", x)
    float_array("a", a, 2)
    float_array("b", b, 2)
    same_dtype(x=x, a=a, b=b)
    if x.shape[-1] != a.shape[0] or a.shape[1] != b.shape[0]:
        raise ValueError(f"LoRA shapes do not chain: x {x.shape}, a {a.shape}, b {b.shape}")
    x2 = x.reshape(-1, x.shape[-1])  # (N, C_in)
    u = mm(x2, a)  # (N, r)
    delta = mm(u, b) * x.dtype.type(scaling)  # (N, C_out)
    return delta.reshape(x.shape[:-1] + (b.shape[1],)), (x2, a, b, u, scaling, x.shape)


def lora_backward(ddelta, cache):
    """forward: u = x a;  delta = s u b.  so  du = s ddelta b^T,  db = s u^T ddelta,
    da = x^T du,  dx = du a^T.      ddelta: (N, C_out) -> dx (N, C_in), da (C_in, r), db (r, C_out)"""
    x2, a, b, u, s, xshape = cache
    s = x2.dtype.type(s)
    d2 = ddelta.reshape(-1, b.shape[1])  # (N, C_out)
    du = mm(d2, b.T) * s  # (N, r)
    db = mm(d2.T, u).T * s  # (r, C_out); as (C_out, N) @ (N, r): BLAS is ~7x slower on u^T (r, N) @ (N, C_out)
    da = mm(x2.T, du)  # (C_in, r)
    dx = mm(du, a.T).reshape(xshape)  # (N, C_in)
    return dx, da, db


def lora_linear_forward(x, w, bias, a, b, scaling, x_lora=None):
    """y = x W + bias + scaling * (x' a) b      (the LoRA linear; x' = x_lora, the LoRA branch's input,
    dropout(x) in training, x itself when None). Weights (C_in, C_out) as numlm keeps them.
    x: (N, C_in)  w: (C_in, C_out)  bias: (C_out,) or None  a: (C_in, r)  b: (r, C_out)  ->  y: (N, C_out)"""
    if np.shape(w) != (np.shape(a)[0], np.shape(b)[-1]):
        raise ValueError(f"LoRA a {np.shape(a)} and b {np.shape(b)} do not fit the weight {np.shape(w)}")
    y, lin = linear_forward(x, w, bias)  # (N, C_out)
    delta, lc = lora_forward(x if x_lora is None else x_lora, a, b, scaling)
    y += delta
    return y, (lin, lc, x_lora is not None)


def lora_linear_backward(dy, cache, weight_grad=True, bias_grad=True):
    """forward: y = x W + bias + delta(x').  so  dx = dy W^T (+ ddelta/dx' when x' is x),
    da, db from lora_backward;  dW = x^T dy and dbias = sum dy only when asked (a frozen W gets
    no weight gradient).  -> dx, dW (or None), dbias (or None), da, db [, dx' when x_lora was given]"""
    lin, lc, separate = cache
    dxl, da, db = lora_backward(dy, lc)
    dx, dw, dbias = linear_backward(dy, lin, weight_grad, bias_grad)  # y = x W + bias
    if separate:
        return dx, dw, dbias, da, db, dxl
    return dx + dxl, dw, dbias, da, db


# ---------------------------------------------------------------------------------------- DoRA

def dora_norm(w, a, b, scaling):
    """n = ||W + s a b|| per output feature    (peft's weight_norm: torch's (C_out, C_in) row norm, a
    column norm in numlm's (C_in, C_out) layout)      w: (C_in, C_out)  a: (C_in, r)  b: (r, C_out)  ->  n: (C_out,)
    DoRA treats n as a constant (peft detaches it), so no backward belongs to it."""
    v = w + mm(a, b) * w.dtype.type(scaling)  # (C_in, C_out)
    return np.sqrt((v * v).sum(axis=0))


class DoraCache(NamedTuple):
    lin: tuple              # linear_forward's cache of x W + bias
    lora: tuple             # lora_forward's cache of delta = s (x' a) b
    base: Optional[tuple]   # linear_forward's cache of x' W when x' is not x (dropout), else None
    g: np.ndarray           # (C_out,) m / n
    m: np.ndarray           # (C_out,)
    n: np.ndarray           # (C_out,)
    u: np.ndarray           # (N, C_out) x' W + delta, what g multiplies


def dora_linear_forward(x, w, bias, a, b, m, n, scaling, x_lora=None):
    """y = x W + bias + (g - 1) (x' W) + g s (x' a) b,   g = m / n        (peft's DoRA linear; n = dora_norm,
    x' = x_lora, dropout(x) in training, else x, and then y = g (x W + s x a b) + bias: the bias is not rescaled)
    x: (N, C_in)  w: (C_in, C_out)  bias: (C_out,) or None  a: (C_in, r)  b: (r, C_out)  m, n: (C_out,)  ->  y: (N, C_out)"""
    float_array("m", m, 1)
    float_array("n", n, 1)
    if m.shape != (np.shape(w)[1],) or n.shape != m.shape:
        raise ValueError(f"DoRA magnitude {m.shape} and norm {n.shape} must be ({np.shape(w)[1]},), one per output")
    g = m / n  # (C_out,)
    y, lin = linear_forward(x, w, bias)  # (N, C_out) x W + bias
    if x_lora is None:  # x' W is x W (peft: base_result - bias)
        p, base = (y - bias if bias is not None else y.copy()), None
    else:
        p, base = linear_forward(x_lora, w)  # (N, C_out) x' W
    delta, lc = lora_forward(x if x_lora is None else x_lora, a, b, scaling)  # (N, C_out)
    y += (g - 1) * p + g * delta
    return y, DoraCache(lin, lc, base, g, m, n, p + delta)


def dora_linear_backward(dy, cache, weight_grad=True, bias_grad=True):
    """forward: y = x W + bias + (g - 1) (x' W) + g delta,  g = m / n,  delta = s (x' a) b.  so
    dg = sum_N dy (x' W + delta);  dm = dg / n;  dn = -dg m / n^2 (what the detached norm would get);
    ddelta = g dy (into lora_backward);  d(x' W) = (g - 1) dy;  with x' = x both products of W are one:
    dx = (g dy) W^T + dx_lora,  dW = x^T (g dy);  dbias = sum_N dy.
    -> dx, dW (or None), dbias (or None), da, db, dm, dn [, dx' when x_lora was given]"""
    c = cache
    d2 = dy.reshape(-1, c.g.shape[0])  # (N, C_out)
    # y += (g - 1) * p + g * delta, g = m / n:  dg = sum_N dy (p + delta)
    dg = (d2 * c.u.reshape(d2.shape)).sum(axis=0)  # (C_out,)
    dm, dn = dg / c.n, -dg * c.m / (c.n * c.n)
    # delta = s (x' a) b, times g
    dxl, da, db = lora_backward(dy * c.g, c.lora)
    has_bias = c.lin[2]
    if c.base is None:  # y = x W + bias + (g - 1) x W + ...: x W counted g times
        dx, dw, _ = linear_backward(dy * c.g, c.lin, weight_grad, False)
        dbias = d2.sum(axis=0) if has_bias and bias_grad else None
        return dx + dxl, dw, dbias, da, db, dm, dn
    dx, dw, dbias = linear_backward(dy, c.lin, weight_grad, bias_grad)  # y = x W + bias + ...
    dxb, dwb, _ = linear_backward(dy * (c.g - 1), c.base, weight_grad, False)  # ... + (g - 1) x' W
    return dx, (None if dw is None else dw + dwb), dbias, da, db, dm, dn, dxl + dxb


# ---------------------------------------------------------------------------------------- IA3

class IA3Cache(NamedTuple):
    lin: tuple                # linear_forward's cache
    x: np.ndarray             # (N, C_in) the input (for dl of a feed-forward module)
    l: np.ndarray             # (C_out,) or (C_in,)
    h: Optional[np.ndarray]   # (N, C_out) x W + bias, what l scales (output scaling), else None
    feedforward: bool


def ia3_forward(x, w, bias, l, feedforward):
    """y = (x W + bias) * l, or y = (x * l) W + bias for a feed-forward module     ((IA)^3, peft's IA3 Linear)
    x: (N, C_in)  w: (C_in, C_out)  bias: (C_out,) or None  l: (C_out,) or, feed-forward, (C_in,)  ->  y: (N, C_out)"""
    float_array("l", l, 1)
    want = np.shape(w)[0] if feedforward else np.shape(w)[1]
    if l.shape != (want,):
        raise ValueError(f"IA3 vector has shape {l.shape}, the {'input' if feedforward else 'output'} needs ({want},)")
    if feedforward:
        xs = x * l  # (N, C_in)
        y, lin = linear_forward(xs, w, bias)
        return y, IA3Cache(lin, x, l, None, True)
    h, lin = linear_forward(x, w, bias)  # (N, C_out)
    return h * l, IA3Cache(lin, x, l, h, False)


def ia3_backward(dy, cache, weight_grad=True, bias_grad=True):
    """forward: y = h l, h = x W + bias.  so  dl = sum_N dy h,  dh = dy l,  then the linear's backward.
    forward (feed-forward): y = x' W + bias, x' = x l.  so  dx' = dy W^T,  dl = sum_N dx' x,  dx = dx' l.
    -> dx, dW (or None), dbias (or None), dl"""
    c = cache
    if c.feedforward:
        dxs, dw, dbias = linear_backward(dy, c.lin, weight_grad, bias_grad)  # (N, C_in)
        dl = (dxs * c.x).reshape(-1, c.l.shape[0]).sum(axis=0)
        return dxs * c.l, dw, dbias, dl
    dl = (dy * c.h).reshape(-1, c.l.shape[0]).sum(axis=0)
    dx, dw, dbias = linear_backward(dy * c.l, c.lin, weight_grad, bias_grad)
    return dx, dw, dbias, dl


# ---------------------------------------------------------------------------------------- activations

def swish_forward(x):
    """y = x * sigmoid(x)   (AdapterHub's "swish", torch's SiLU)    x: (N) -> y: (N)"""
    sig = sigmoid(x)
    return x * sig, (x, sig)


def swish_backward(dy, cache):
    """forward: y = x s, s = sigmoid(x).  so  dx = dy (s + x s (1 - s))"""
    x, sig = cache
    return dy * (sig * (1 + x * (1 - sig)))


def adapter_activation(name):
    """(forward, backward) for an AdapterHub non_linearity."""
    name = name.lower()
    if name in ("swish", "silu"):
        return swish_forward, swish_backward
    return activation(name)


# ---------------------------------------------------------------------------------------- bottleneck adapter

def bottleneck_forward(z, r, wd, bd, wu, bu, act="swish", scaling=1.0):
    """a = r + scaling * (act(z Wd + bd) Wu + bu)       (AdapterHub's Adapter: adapter_down, adapter_up)
    z, r: (N, C)  wd: (C, m)  bd: (m,)  wu: (m, C)  bu: (C,)  ->  a: (N, C)"""
    for name, t in (("z", z), ("r", r), ("wd", wd), ("bd", bd), ("wu", wu), ("bu", bu)):
        float_array(name, t)
    same_dtype(z=z, r=r, wd=wd, wu=wu)
    C, m = wd.shape
    if z.shape != r.shape or z.shape[-1] != C or wu.shape != (m, C) or bd.shape != (m,) or bu.shape != (C,):
        raise ValueError(f"adapter shapes do not fit: z {z.shape}, r {r.shape}, wd {wd.shape}, bd {bd.shape}, "
                         f"wu {wu.shape}, bu {bu.shape}")
    fwd, bwd = adapter_activation(act)
    z2 = z.reshape(-1, C)  # (N, C)
    p = mm(z2, wd) + bd  # (N, m)
    g, gc = fwd(p)  # (N, m)
    up = mm(g, wu) + bu  # (N, C)
    a = r + (up * z.dtype.type(scaling)).reshape(z.shape)
    return a, (z2, wd, wu, g, gc, bwd, scaling, z.shape)


def bottleneck_backward(da, cache):
    """forward: p = z Wd + bd;  g = act(p);  a = r + s (g Wu + bu).  so
    dr = da;  dup = s da;  dWu = g^T dup;  dbu = sum dup;  dg = dup Wu^T;  dp = act'(dg);
    dWd = z^T dp;  dbd = sum dp;  dz = dp Wd^T.      -> dz, dr, dwd, dbd, dwu, dbu"""
    z2, wd, wu, g, gc, bwd, s, zshape = cache
    C = wd.shape[0]
    dup = da.reshape(-1, C) * z2.dtype.type(s)  # (N, C)
    dwu = mm(dup.T, g).T  # (m, C); as (C, N) @ (N, m), the fast orientation for a small m
    dbu = dup.sum(axis=0)
    dp = bwd(mm(dup, wu.T), gc)  # (N, m)
    dwd = mm(z2.T, dp)  # (C, m)
    dbd = dp.sum(axis=0)
    dz = mm(dp, wd.T).reshape(zshape)  # (N, C)
    return dz, da.copy(), dwd, dbd, dwu, dbu


def adapter_block_forward(h, x, ln, params, cfg):
    """The sub-layer output with a bottleneck adapter, AdapterHub's order (pre_forward, adapter,
    post_forward); `ln` = (gamma, beta, eps) of the block's own LayerNorm, or None (pre-LN GPT-2):
        r = h                        if residual_before_ln
        z = LN(h + x) if original_ln_before else h
        r = z                        if not residual_before_ln
        a = r + scaling * up(act(down(z)))
        out = LN(a + x) if original_ln_after else a            (without ln: + instead of LN(+))
    h, x: (N, C)  params: wd, bd, wu, bu  ->  out: (N, C)"""
    c = {}
    if cfg.original_ln_before:
        s = h + x
        if ln is not None:
            z, c["ln_before"] = layernorm_forward(s, *ln)
        else:
            z = s
    else:
        z = h
    r = h if cfg.residual_before_ln else z
    a, c["bn"] = bottleneck_forward(z, r, params["wd"], params["bd"], params["wu"], params["bu"],
                                    cfg.non_linearity, cfg.scaling)
    if cfg.original_ln_after:
        if ln is not None:
            out, c["ln_after"] = layernorm_forward(a + x, *ln)
        else:
            out = a + x
    else:
        out = a
    return out, c


def adapter_block_backward(dout, cache, cfg):
    """Backward of adapter_block_forward, line by line from the bottom.
    -> dh, dx, {wd, bd, wu, bu}, (dgamma, dbeta) of the LayerNorm (summed over its uses) or None"""
    dgamma = dbeta = None

    def ln_back(d, key):
        nonlocal dgamma, dbeta
        dd, dg, db = layernorm_backward(d, cache[key])
        dgamma = dg if dgamma is None else dgamma + dg
        dbeta = db if dbeta is None else dbeta + db
        return dd

    # out = LN(a + x) (or a + x, or a):  da = LN'(dout),  dx = da
    if cfg.original_ln_after:
        da = ln_back(dout, "ln_after") if "ln_after" in cache else dout
        dx = da
    else:
        da, dx = dout, np.zeros_like(dout)
    # a = r + s up(act(down(z)))
    dz, dr, dwd, dbd, dwu, dbu = bottleneck_backward(da, cache["bn"])
    # r = h or r = z
    if cfg.residual_before_ln:
        dh = dr
    else:
        dz = dz + dr
        dh = 0
    # z = LN(h + x) (or h + x), or z = h
    if cfg.original_ln_before:
        ds = ln_back(dz, "ln_before") if "ln_before" in cache else dz
        dh = dh + ds
        dx = dx + ds
    else:
        dh = dh + dz
    grads = {"wd": dwd, "bd": dbd, "wu": dwu, "bu": dbu}
    return dh, dx, grads, (None if dgamma is None else (dgamma, dbeta))


# ---------------------------------------------------------------------------------------- prompts and prefixes

def prompt_forward(emb, prompt):
    """e' = [prompt; emb] along T   (peft: cat(prompt_embeddings, inputs_embeds))
    emb: (B, T, C)  prompt: (n, C)  ->  (B, n + T, C)"""
    float_array("emb", emb, 3)
    float_array("prompt", prompt, 2)
    same_dtype(emb=emb, prompt=prompt)
    B, T, C = emb.shape
    if prompt.shape[1] != C:
        raise ValueError(f"prompt has width {prompt.shape[1]}, the embeddings {C}")
    out = np.concatenate([np.broadcast_to(prompt, (B,) + prompt.shape), emb], axis=1)  # (B, n + T, C)
    return out, prompt.shape[0]


def prompt_backward(dout, n):
    """forward: e' = [prompt (repeated over B); emb].  so  dprompt = sum_B dout[:, :n],  demb = dout[:, n:]"""
    return dout[:, n:], dout[:, :n].sum(axis=0)


def prefix_forward(prompt, B, L, H):
    """past[l] = (k_l, v_l):  prompt (n, L*2*C) viewed (B, n, 2L, H, D), permuted to (2L, B, H, n, D);
    entry 2l is layer l's key, 2l+1 its value (peft's get_prompt for prefix tuning)."""
    float_array("prompt", prompt, 2)
    n, W = prompt.shape
    if W % (2 * L * H):
        raise ValueError(f"prefix width {W} is not 2 * layers {L} * heads {H} * head size")
    D = W // (2 * L * H)
    kv = np.broadcast_to(prompt.reshape(1, n, 2 * L, H, D), (B, n, 2 * L, H, D)).transpose(2, 0, 3, 1, 4)
    return [(kv[2 * l], kv[2 * l + 1]) for l in range(L)], (n, L, H, D)  # each (B, H, n, D)


def prefix_backward(dpast, cache):
    """forward: past = view(prompt).permute(2, 0, 3, 1, 4) repeated over B.
    so  dprompt = sum over B of the inverse permutation of the stacked (dk_l, dv_l)."""
    n, L, H, D = cache
    d = np.stack([t for kv in dpast for t in kv])  # (2L, B, H, n, D)
    return d.sum(axis=1).transpose(2, 0, 1, 3).reshape(n, 2 * L * H * D)  # (n, L*2*C)
