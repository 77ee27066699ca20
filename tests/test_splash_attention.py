"""The Pallas splash attention path (`attention_core.splash_attention`, TPU) run by the Pallas
interpreter on CPU, against the softmax-attention equations: outputs and gradients, with
grouped-query and multi-query heads, on one device and inside the shard_map under an 8-device
mesh; and how `causal_attention` picks it (TPU only, static shape checks)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rmoe_jax import parallel
from rmoe_jax.config import default_config
from rmoe_jax.model import attention_core
from rmoe_jax.model.attention_core import (SPLASH_RESIDUALS, causal_attention, splash_attention,
                                           splash_block, splash_supported)

SEQ, HEAD_DIM = 256, 64  # two 128-row blocks: the causal mask has a full, a partial, an empty block


def numpy_attention(query, key, value):
    """out[b, t, h] = sum_s softmax_s(q[b,t,h] . k[b,s,j] / sqrt(d), s <= t) v[b,s,j] with
    j = h // (heads / kv_heads), in float64."""
    batch, seq, heads, head_dim = query.shape
    groups = heads // key.shape[2]
    out = np.zeros(query.shape, np.float64)
    for b in range(batch):
        for h in range(heads):
            q = query[b, :, h].astype(np.float64)
            k, v = (a[b, :, h // groups].astype(np.float64) for a in (key, value))
            scores = q @ k.T / np.sqrt(head_dim)
            scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, :, h] = weights / weights.sum(-1, keepdims=True) @ v
    return out


def jnp_attention(query, key, value):
    """The same equations in jnp (differentiable): the reference for the gradients."""
    head_dim = query.shape[-1]
    groups = query.shape[2] // key.shape[2]
    key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", query, key, precision="highest") / np.sqrt(head_dim)
    causal = np.tril(np.ones((query.shape[1],) * 2, bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, value, precision="highest")


def _inputs(batch=2, heads=4, kv_heads=2, seq=SEQ, head_dim=HEAD_DIM, seed=0):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, seq, heads, head_dim)).astype(np.float32)
    key, value = (rng.normal(size=(batch, seq, kv_heads, head_dim)).astype(np.float32)
                  for _ in range(2))
    return query, key, value


def _splash(query, key, value):
    return splash_attention(query, key, value, interpret=True)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA (2 query heads per kv head), MQA
def test_matches_the_equations(kv_heads):
    query, key, value = _inputs(kv_heads=kv_heads, seed=kv_heads)
    ours = jax.jit(_splash)(query, key, value)
    assert ours.shape == query.shape and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, numpy_attention(query, key, value), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_gradients_match_the_equations(kv_heads):
    query, key, value = _inputs(kv_heads=kv_heads, seed=10 + kv_heads)
    probe = np.random.default_rng(9).normal(size=query.shape).astype(np.float32)

    def grads(attention):
        loss = lambda q, k, v: jnp.sum(attention(q, k, v) * probe)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(query, key, value)

    for name, ours, reference in zip("qkv", grads(_splash), grads(jnp_attention)):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_bfloat16_inputs():
    query, key, value = _inputs(batch=1, seed=4)
    ours = jax.jit(_splash)(*(jnp.asarray(a, jnp.bfloat16) for a in (query, key, value)))
    assert ours.dtype == jnp.bfloat16
    reference = numpy_attention(*(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32)
                                  for a in (query, key, value)))
    np.testing.assert_allclose(np.asarray(ours, np.float32), reference, rtol=0.05, atol=0.03)


def test_under_an_eight_device_mesh():
    """Batch over data x expert (4 shards), heads over tensor (2): the kernel runs in a
    shard_map on each device's 1 sequence x 2 query heads / 1 kv head; outputs and
    gradients as on one device."""
    config = default_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = 2, 1, 2, 2
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:8])
    query, key, value = _inputs(batch=4, heads=4, kv_heads=2, seed=7)
    probe = np.random.default_rng(8).normal(size=query.shape).astype(np.float32)
    spec = NamedSharding(mesh, P(parallel.BATCH_AXES, None, "tensor", None))

    def loss(q, k, v):
        out = _splash(q, k, v)
        return jnp.sum(out * probe), out

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        assert "shard_map" in str(jax.make_jaxpr(_splash)(query, key, value))
        (dq, dk, dv), out = step(*(jax.device_put(a, spec) for a in (query, key, value)))
    np.testing.assert_allclose(out, numpy_attention(query, key, value), rtol=1e-5, atol=1e-5)
    reference = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp_attention(q, k, v) * probe),
                                 argnums=(0, 1, 2)))(query, key, value)
    for name, ours, ref in zip("qkv", (dq, dk, dv), reference):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_block_sizes_and_supported_shapes():
    assert [splash_block(s) for s in (128, 256, 384, 512, 640, 768, 4096, 100, 64, 200)] == [
        128, 256, 128, 512, 128, 256, 512, 0, 0, 0]
    assert splash_supported((8, 4096, 20, 64), (8, 4096, 20, 64))  # configs/llama_0p91b.py
    assert splash_supported((8, 512, 8, 44), (8, 512, 8, 44))  # configs/enwik8_medium.py
    assert splash_supported((2, 256, 4, 64), (2, 256, 1, 64))
    assert not splash_supported((2, 100, 4, 64), (2, 100, 4, 64))  # seq: no 128-multiple block
    assert not splash_supported((2, 16, 4, 8), (2, 16, 2, 8))  # tests/helpers.small_model
    assert not splash_supported((2, 256, 4, 64), (2, 256, 3, 64))  # heads % kv_heads


def _primitives(jaxpr, found=None):
    """Names of every primitive in a jaxpr, sub-jaxprs (cond branches, shard_map) included."""
    found = set() if found is None else found
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive.name)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            _primitives(sub, found)
    return found


def test_causal_attention_picks_splash_for_tpu_only():
    """Supported shapes: a platform-dependent choice whose TPU branch is the Pallas kernel; on
    CPU the result is bit-for-bit the existing path's. Unsupported shapes: no kernel at all."""
    query, key, value = _inputs(batch=1, seed=5)
    for chunk in (0, 128):
        jaxpr = jax.make_jaxpr(lambda q, k, v: causal_attention(q, k, v, chunk))(query, key, value)
        assert {"platform_index", "pallas_call"} <= _primitives(jaxpr.jaxpr)
        ours = jax.jit(lambda q, k, v: causal_attention(q, k, v, chunk))(query, key, value)
        existing = jax.jit(lambda q, k, v: attention_core._xla_attention(q, k, v, chunk))(
            query, key, value)
        np.testing.assert_array_equal(ours, existing)
    small = _inputs(batch=1, seq=96, seed=6)
    jaxpr = jax.make_jaxpr(lambda q, k, v: causal_attention(q, k, v, 32))(*small)
    assert not {"platform_index", "pallas_call"} & _primitives(jaxpr.jaxpr)


def test_residuals_are_saveable_by_name(capsys):
    """A remat policy that saves SPLASH_RESIDUALS keeps the kernel's output and logsumexp for
    the backward pass; one saving another name keeps only the inputs (it reruns the kernel)."""
    query, key, value = _inputs(batch=1, heads=2, kv_heads=2, seed=3)

    def saved(name):
        policy = jax.checkpoint_policies.save_only_these_names(name)
        remat = jax.checkpoint(lambda q, k, v: jnp.sum(_splash(q, k, v)), policy=policy)
        jax.ad_checkpoint.print_saved_residuals(remat, query, key, value)
        return [line.split()[0] for line in capsys.readouterr().out.splitlines()
                if "output of jitted function '_splash_attention'" in line]

    assert saved(SPLASH_RESIDUALS) == [f"f32[1,2,{SEQ},{HEAD_DIM}]", f"f32[1,2,{SEQ}]"]
    assert saved("moe_expert_out") == []


def test_a_batch_the_mesh_cannot_split_keeps_the_existing_path():
    """The shard_map needs the batch to divide over the batch shards (data x expert = 4 here);
    a batch of 2 (an eval batch, say) stays on the XLA path on TPU too, decided statically."""
    config = default_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = 2, 1, 2, 2
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:8])
    attention = lambda q, k, v: causal_attention(q, k, v, 128)  # noqa: E731
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        assert "pallas_call" not in _primitives(jax.make_jaxpr(attention)(*_inputs(batch=2)).jaxpr)
        assert "pallas_call" in _primitives(jax.make_jaxpr(attention)(*_inputs(batch=4)).jaxpr)
