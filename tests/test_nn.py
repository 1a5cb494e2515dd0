"""Layers as Modules: gradcheck of inputs and parameters, gradient accumulation, mirror keys, astype."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numlm.gradchecking import Uninformative, gradcheck
from numlm.kernels import set_numba
from numlm.nn import Attention, Embedding, LayerNorm, Linear, Module, merge_heads, split_heads

seeds = st.integers(0, 2**32 - 1)


@pytest.fixture(params=[True, False], ids=["numba", "numpy"])
def path(request):
    previous = set_numba(request.param)
    yield request.param
    set_numba(previous)


def randomize(module, rng):
    for k, p in module.parameters().items():
        p[...] = rng.standard_normal(p.shape)
    return module


@settings(max_examples=15, deadline=None)
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 3), c_in=st.integers(1, 4), c_out=st.integers(1, 4),
       bias=st.booleans())
def test_linear_module_gradcheck(seed, B, T, c_in, c_out, bias):
    rng = np.random.default_rng(seed)
    lin = randomize(Linear(c_in, c_out, bias=bias, dtype=np.float64), rng)
    err = gradcheck(lin, (rng.standard_normal((B, T, c_in)),))
    assert set(err) == {"x", "param:weight"} | ({"param:bias"} if bias else set())
    assert max(err.values()) < 1e-7, err


@settings(max_examples=15, deadline=None)
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 3), C=st.integers(3, 6))
def test_layernorm_module_gradcheck(seed, B, T, C):
    rng = np.random.default_rng(seed)
    ln = randomize(LayerNorm(C, eps=1e-5, dtype=np.float64), rng)
    for flag in (True, False):
        previous = set_numba(flag)
        try:
            err = gradcheck(ln, (rng.standard_normal((B, T, C)) + np.linspace(-1, 1, C),))
        finally:
            set_numba(previous)
        assert set(err) == {"x", "param:weight", "param:bias"} and max(err.values()) < 1e-7, err


@settings(max_examples=15, deadline=None)
@given(seed=seeds, V=st.integers(1, 6), C=st.integers(1, 3))
def test_embedding_module_gradcheck(seed, V, C):
    rng = np.random.default_rng(seed)
    emb = randomize(Embedding(V, C, dtype=np.float64), rng)
    err = gradcheck(emb, (rng.integers(0, V, (2, 3)),))
    assert set(err) == {"param:weight"} and err["param:weight"] < 1e-7


def test_embedding_padding_row_gets_no_gradient(path):
    rng = np.random.default_rng(0)
    emb = randomize(Embedding(5, 3, padding_idx=0, dtype=np.float64), rng)
    ids = np.array([[0, 1, 0, 4]])
    out = emb(ids)
    np.testing.assert_array_equal(out[0, 0], emb.params["weight"][0])  # the row's value is used
    emb.backward(rng.standard_normal(out.shape))
    assert np.all(emb.grads["weight"][0] == 0.0) and np.all(emb.grads["weight"][[1, 4]] != 0.0)


ATTN = [dict(), dict(causal=True), dict(causal=True, causal_fill=-1e4), dict(scale=0.7),
        dict(dropout_p=0.25), dict(causal=True, dropout_p=0.1, scale=0.3)]


@settings(max_examples=20, deadline=None)
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 4), H=st.integers(1, 2), D=st.integers(1, 2),
       cfg=st.sampled_from(range(len(ATTN))), pad=st.booleans())
def test_attention_module_gradcheck(seed, B, T, H, D, cfg, pad):
    rng = np.random.default_rng(seed)
    attn = Attention(H, **ATTN[cfg])
    attn.rng = np.random.default_rng(seed + 1)  # rewound by gradcheck before every forward
    q, k, v = (rng.standard_normal((B, T, H * D)) for _ in range(3))
    mask = (np.arange(T) >= rng.integers(0, T + 1, B)[:, None]).astype(np.int64) if pad else None
    err = gradcheck(attn, (q, k, v), kwargs={"attention_mask": mask})
    seen = (np.ones((B, T)) if mask is None else mask)[:, None, :] * (np.tri(T) if ATTN[cfg].get("causal") else 1)
    constant = {"q", "k"} if seen.sum(axis=-1).max() <= 1 else set()  # no query weighs two keys
    assert {n for n, e in err.items() if isinstance(e, Uninformative)} == constant, err
    assert set(err) == {"q", "k", "v"} and max(e for n, e in err.items() if n not in constant) < 1e-7, err


@pytest.mark.parametrize("frozen", [[], ["a.weight"], ["b.bias", "c.weight"], None])  # None: all
def test_joined_linears_give_each_its_own_gradients(frozen, path):
    """a(x, b, c) is [a(x) | b(x) | c(x)] in one product; its backward gives each Linear the gradients of
    its own columns, and none to a frozen parameter."""
    rng = np.random.default_rng(0)

    class Three(Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (randomize(Linear(3, n, dtype=np.float64), rng) for n in (4, 2, 4))

    x, dy = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 10))
    joined, separate = Three(), Three()
    for name, p in joined.parameters().items():
        separate.parameters()[name][...] = p
    if frozen != []:
        joined.freeze(frozen), separate.freeze(frozen)
    y = joined.a(x, joined.b, joined.c)
    np.testing.assert_allclose(y, np.concatenate([separate.a(x), separate.b(x), separate.c(x)], axis=-1), rtol=1e-14)
    dx = joined.a.backward(dy)
    want = separate.a.backward(dy[..., :4]) + separate.b.backward(dy[..., 4:6]) + separate.c.backward(dy[..., 6:])
    np.testing.assert_allclose(dx, want, rtol=1e-13)
    assert joined.grad_arrays().keys() == separate.grad_arrays().keys()
    for name, g in joined.grad_arrays().items():
        np.testing.assert_allclose(g, separate.grad_arrays()[name], rtol=1e-13, atol=1e-15)


def test_kv_cache_fed_back_grows_in_place_and_earlier_caches_stay():
    """A present fed back as the past is extended in a buffer with room (no copy of the cache per
    step); every cache handed out keeps its values, and a past fed twice (two continuations of one
    prefix) or not this layer's last present gives what the concatenation gives."""
    rng = np.random.default_rng(0)
    attn = Attention(2, causal=True).eval()
    x = [rng.standard_normal((1, 1, 8)) for _ in range(12)]
    attn(x[0], x[0], x[0])
    presents, outs = [attn.present], []
    for t in range(1, 12):
        outs.append(attn(x[t], x[t], x[t], past=presents[-1]))
        presents.append(attn.present)
    assert presents[-1][0].base is presents[-2][0].base  # written in place, not copied
    kv = split_heads(np.concatenate(x, axis=1), 2)
    for t, (k, v) in enumerate(presents):
        np.testing.assert_array_equal(k, kv[:, :, :t + 1])
        np.testing.assert_array_equal(v, kv[:, :, :t + 1])
    again = attn(x[5], x[5], x[5], past=presents[4])  # an earlier cache: concatenated
    np.testing.assert_array_equal(again, outs[4])
    other = attn(x[0], x[0], x[0], past=presents[4])  # the same past, another token
    fresh = Attention(2, causal=True).eval()
    np.testing.assert_array_equal(other, fresh(x[0], x[0], x[0], past=tuple(a.copy() for a in presents[4])))
    for t, (k, v) in enumerate(presents):
        np.testing.assert_array_equal(k, kv[:, :, :t + 1])


def test_a_kv_buffer_no_present_views_is_let_go():
    """The buffer a fed-back cache grows in stayed on the layer once no cache grew in it (a forward without
    a past, another past, a generate() ended): up to twice the longest cache per layer, held for good"""
    import numlm
    from conftest import FIXTURES
    rng = np.random.default_rng(0)
    attn = Attention(2, causal=True).eval()
    x = [rng.standard_normal((1, 1, 8)) for _ in range(4)]

    def grown():
        attn(x[0], x[0], x[0])
        for t in (1, 2):
            attn(x[t], x[t], x[t], past=attn.present)
        assert attn.room is not None and attn.present[0].base is attn.room[0]
        return attn.present
    grown()
    attn(x[3], x[3], x[3])  # no past
    assert attn.room is None
    kept = grown()
    attn(x[3], x[3], x[3], past=tuple(a.copy() for a in kept))  # a past that is not the last present
    assert attn.room is None
    np.testing.assert_array_equal(kept[0], split_heads(np.concatenate(x[:3], axis=1), 2))  # still whole
    model = numlm.from_pretrained(FIXTURES / "hf" / "gpt2-tiny")
    numlm.generate(model, [[1, 2, 3]], max_new_tokens=20, eos_token_id=[])
    model(np.array([[1, 2, 3]]))
    assert all(block.attn.core.room is None for block in model.transformer.h.items)

def test_split_merge_heads_roundtrip():
    x = np.arange(2 * 3 * 6.0).reshape(2, 3, 6)
    h = split_heads(x, 2)
    assert h.shape == (2, 2, 3, 3)
    np.testing.assert_array_equal(h[1, 1, 2], x[1, 2, 3:])  # head 1 = columns 3:6
    np.testing.assert_array_equal(merge_heads(h), x)


class Two(Module):
    def __init__(self):
        super().__init__()
        self.fc = Linear(3, 4, dtype=np.float64)
        self.ln = LayerNorm(4, dtype=np.float64)

    def forward(self, x):
        return self.ln(self.fc(x))

    def backward(self, dy):
        return self.fc.backward(self.ln.backward(dy))


def test_gradients_accumulate_and_zero_grad(path):
    rng = np.random.default_rng(1)
    m = randomize(Two(), rng)
    x1, x2 = rng.standard_normal((2, 3)), rng.standard_normal((5, 3))
    d1, d2 = rng.standard_normal((2, 4)), rng.standard_normal((5, 4))
    m(x1), m.backward(d1)
    g1 = {k: g.copy() for k, g in m.grad_arrays().items()}
    m.zero_grad()
    assert all(not g.any() for g in m.grad_arrays().values())
    m(x2), m.backward(d2)
    g2 = {k: g.copy() for k, g in m.grad_arrays().items()}
    m.zero_grad()
    m(x1), m.backward(d1)
    m(x2), m.backward(d2)  # a second backward adds to the first (+=)
    for k, g in m.grad_arrays().items():
        np.testing.assert_allclose(g, g1[k] + g2[k], rtol=1e-14, atol=1e-15)
    # and equals one backward over the concatenated batch
    m.zero_grad()
    m(np.concatenate([x1, x2])), m.backward(np.concatenate([d1, d2]))
    for k, g in m.grad_arrays().items():
        np.testing.assert_allclose(g, g1[k] + g2[k], rtol=1e-12, atol=1e-14)


def test_parameters_and_grads_mirror_keys():
    m = Two()
    params, grads = m.parameters(), m.grad_arrays()
    assert list(params) == list(grads) == ["fc.weight", "fc.bias", "ln.weight", "ln.bias"]
    for k in params:
        assert params[k].shape == grads[k].shape and params[k].dtype == grads[k].dtype
    assert params["fc.weight"].shape == (3, 4)  # numlm's (C_in, C_out) layout
    assert m.num_parameters() == 12 + 4 + 4 + 4


def test_astype_and_module_gradcheck_needs_float64():
    m = randomize(Two(), np.random.default_rng(2)).astype("float32")
    assert m.dtype == np.float32
    assert all(g.dtype == np.float32 for g in m.grad_arrays().values())
    assert m(np.ones((1, 3), np.float32)).dtype == np.float32
    with pytest.raises(ValueError, match=r"parameter fc.weight is float32"):
        gradcheck(m, (np.ones((1, 3)),))
    w32 = m.fc.params["weight"].copy()
    m.astype(np.float64)
    assert m.dtype == np.float64 and np.array_equal(m.fc.params["weight"], w32.astype(np.float64))
    with pytest.raises(ValueError, match=r"dtype must be float32 or float64"):
        m.astype(np.int32)
    err = gradcheck(m, (np.random.default_rng(3).standard_normal((2, 3)),))
    assert max(err.values()) < 1e-7


def test_max_entries_on_module_parameters():
    rng = np.random.default_rng(4)
    lin = randomize(Linear(30, 20, dtype=np.float64), rng)
    err = gradcheck(lin, (rng.standard_normal((2, 30)),), max_entries=15)
    assert max(err.values()) < 1e-7


def test_train_eval_propagates():
    m = Two().eval()
    assert not m.training and not m.fc.training and not m.ln.training
    m.train()
    assert m.ln.training
