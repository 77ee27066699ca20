"""Chunked causal attention against the softmax-attention equations in NumPy and against
`jax.nn.dot_product_attention`, values and gradients, with grouped-query heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmoe_jax.model.attention_core import causal_attention
from rmoe_jax.model import build_model
from tests.helpers import small_model


def numpy_causal_attention(query, key, value):
    """softmax(q k^T / sqrt(hd) + causal mask) v per head; kv head j serves query heads
    j*g .. j*g + g - 1. Shapes as `causal_attention`."""
    batch, seq, heads, head_dim = query.shape
    groups = heads // key.shape[2]
    out = np.zeros(query.shape, np.float64)
    for b in range(batch):
        for h in range(heads):
            q, k, v = (a[b, :, i].astype(np.float64) for a, i in
                       ((query, h), (key, h // groups), (value, h // groups)))
            scores = q @ k.T / np.sqrt(head_dim)
            scores[np.triu_indices(seq, 1)] = -np.inf
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, :, h] = (probs / probs.sum(-1, keepdims=True)) @ v
    return out


def _inputs(seq=12, heads=4, kv_heads=2, head_dim=6, seed=0):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(2, seq, heads, head_dim)).astype(np.float32)
    key, value = (rng.normal(size=(2, seq, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    return query, key, value


@pytest.mark.parametrize("chunk", [0, 1, 4, 5, 12, 64])
def test_matches_the_equations(chunk):
    query, key, value = _inputs()
    ours = causal_attention(jnp.asarray(query), jnp.asarray(key), jnp.asarray(value), chunk)
    np.testing.assert_allclose(ours, numpy_causal_attention(query, key, value), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gradients_match_dot_product_attention(kv_heads):
    query, key, value = _inputs(kv_heads=kv_heads, seed=kv_heads)
    probe = np.random.default_rng(9).normal(size=query.shape).astype(np.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * probe)

    chunked = jax.grad(loss(lambda q, k, v: causal_attention(q, k, v, 5)), argnums=(0, 1, 2))
    fused = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)),
                     argnums=(0, 1, 2))
    for ours, reference in zip(chunked(query, key, value), fused(query, key, value)):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_keep_float32_scores():
    query, key, value = _inputs(seq=16)
    ours = causal_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (query, key, value)), 4)
    assert ours.dtype == jnp.bfloat16
    reference = numpy_causal_attention(*(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32)
                                         for a in (query, key, value)))
    np.testing.assert_allclose(np.asarray(ours, np.float32), reference, rtol=0.05, atol=0.03)


def test_model_logits_do_not_depend_on_the_chunk():
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 16)), jnp.int32)
    params, logits = None, []
    for chunk in (0, 4, 16):
        model = build_model(small_model(attention_chunk=chunk))
        params = params or model.init(jax.random.key(0), tokens)["params"]  # same params for all
        logits.append(model.apply({"params": params}, tokens)[0])
    for other in logits[1:]:
        np.testing.assert_allclose(other, logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_both_rotate_half_forms_equal_numpy_exactly(dtype):
    """The TPU form (a signed-permutation matmul) and the CPU form (split and concatenate)
    both give HF Llama's rotate_half, bit for bit: each output is one input times +-1."""
    from rmoe_jax.model.transformer import _rotate_half, _rotate_half_matmul
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 3, 64), jnp.float32).astype(dtype)
    x32 = np.asarray(x.astype(jnp.float32))
    expected = np.concatenate([-x32[..., 32:], x32[..., :32]], axis=-1)
    for form in (_rotate_half, _rotate_half_matmul):
        got = np.asarray(form(x))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected, err_msg=form.__name__)


@pytest.mark.parametrize("form", ["token_major", "head_major"])
def test_rope_forms_equal_the_equations(form):
    """Both RoPE forms (token-major with split and concatenate: CPU and GPU; head-major with
    the rotation matmul: TPU) give x_j cos(p w_j) + rotate_half(x)_j sin(p w_j), computed here
    in NumPy from HF Llama's definition (w_j = theta^(-2j/d), j paired with j + d/2)."""
    import functools

    from rmoe_jax.model.transformer import _rope, _rope_head_major, _rotate_half
    batch, seq, heads, head_dim, theta = 2, 7, 3, 64, 500.0
    x = np.random.default_rng(5).standard_normal((batch, seq, heads, head_dim)).astype(np.float32)
    positions = np.stack([np.arange(seq), np.arange(seq) + 11])  # [batch, seq]
    freq = theta ** (-np.arange(0, head_dim, 2) / head_dim)
    angle = positions[..., None] * np.concatenate([freq, freq])  # [batch, seq, head_dim]
    rotated = np.concatenate([-x[..., head_dim // 2:], x[..., :head_dim // 2]], axis=-1)
    expected = x * np.cos(angle)[:, :, None] + rotated * np.sin(angle)[:, :, None]
    rope = (_rope_head_major if form == "head_major"
            else functools.partial(_rope, rotate_half=_rotate_half))
    got = rope(jnp.asarray(x), jnp.asarray(angle[:, :, None, :], jnp.float32))
    assert got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
