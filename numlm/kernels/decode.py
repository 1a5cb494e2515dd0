"""A decoding step of a GPT-2 block in one compiled call (llama2.c's forward, a layer at a time).

    a = x + c_proj(Attn(q, [K; k], [V; v])),  [q | k | v] = c_attn(ln_1(x))
    y = a + c_proj(gelu(c_fc(ln_2(a))))

for one new token a row, k and v written after the t cached ones. The loops are the ones the block's
modules run, in their order (cols_gemv for every product, then + b; the serial LayerNorm and GELU;
attention_rows_kernel), so the numbers are theirs, bit for bit; what goes is the Python between them.
GPTBlock.steps says when a forward is such a step. On a 2-core Zen 1 EPYC, GPT-2 124M greedy decoding
took 32-35 ms a token through the modules (~25 of it the GEMVs) and 28.6-29.4 with this step.
"""
import numpy as np
from numba import njit

from .activations import _gelu_tanh_serial
from .layernorm import _layernorm_forward_serial
from .matmul import cols_gemv, COLS_PARTS
from .softmax import attention_rows_kernel


@njit(cache=True)
def linear_rows(x, w, b):
    """x (M, K) @ W (K, N) + b on cols_gemv, as matmul runs a decoding step's product"""
    out = np.empty((x.shape[0], w.shape[1]), w.dtype)
    cols_gemv(x, w, np.empty((COLS_PARTS, x.shape[0], w.shape[1]), w.dtype), out)
    out += b
    return out


@njit(cache=True)
def gpt2_block_step(x, ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj, k_room, v_room, t, n_head, eps, scale,
                    codes, lowest, gelu):
    """x (M, C), one new token a row -> y (M, C). ln_*: (gamma, beta); the linears: (W (K, N), b);
    k_room, v_room (M, H, T', D): the cache's buffers, keys 0 .. t-1 cached, the new one written at t;
    codes (M|1, H|1, 1, t + 1) int8 (ops.attention_allowed's); gelu: the tanh form's (0.5, 1, k, c)"""
    M, C = x.shape
    D = C // n_head
    # [q | k | v] = c_attn(ln_1(x)),  the new k and v after the t cached
    qkv = linear_rows(_layernorm_forward_serial(x, ln_1[0], ln_1[1], eps)[0], c_attn[0], c_attn[1])  # (M, 3C)
    q = np.empty((M, n_head, 1, D), x.dtype)
    for m in range(M):
        for h in range(n_head):
            q[m, h, 0] = qkv[m, h * D:(h + 1) * D]
            k_room[m, h, t] = qkv[m, C + h * D:C + (h + 1) * D]
            v_room[m, h, t] = qkv[m, 2 * C + h * D:2 * C + (h + 1) * D]
    # a = x + c_proj(softmax(q [K; k]^T scale + M) [V; v]),  heads merged: (M, H, 1, D) -> (M, C)
    heads, _ = attention_rows_kernel(q, k_room, v_room, t + 1, scale, codes, lowest, lowest)
    a = x + linear_rows(heads.reshape(M, C), attn_proj[0], attn_proj[1])
    # y = a + c_proj(gelu(c_fc(ln_2(a))))
    f = linear_rows(_layernorm_forward_serial(a, ln_2[0], ln_2[1], eps)[0], c_fc[0], c_fc[1])  # (M, I)
    g = _gelu_tanh_serial(f.reshape(-1), gelu[0], gelu[1], gelu[2], gelu[3]).reshape(f.shape)
    return a + linear_rows(g, mlp_proj[0], mlp_proj[1])
