"""Gating, aux losses and both dispatch strategies against NumPy / per-token references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmoe_jax.model import gating
from rmoe_jax.model.dispatch import (blocked_matmul, capacity_dispatch, dropless_dispatch, expert_capacity,
                                     grouped_matmul)

import numpy_reference as ref

E, K, D, F = 5, 2, 6, 7


def test_top_k_gating_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(9, E)).astype(np.float32) * 3
    probs, weights, indices = gating.top_k_gating(jnp.asarray(logits, jnp.bfloat16), K)
    assert probs.dtype == jnp.float32  # float32 whatever the compute dtype
    bf16_logits = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    expected_probs = ref.softmax(bf16_logits)
    expected_idx = np.argsort(-expected_probs, axis=-1)[:, :K]
    expected_w = np.take_along_axis(expected_probs, expected_idx, axis=-1)
    np.testing.assert_allclose(probs, expected_probs, rtol=1e-5)
    np.testing.assert_array_equal(indices, expected_idx)
    np.testing.assert_allclose(weights, expected_w / expected_w.sum(-1, keepdims=True), rtol=1e-5)
    _, raw, _ = gating.top_k_gating(jnp.asarray(bf16_logits), K, renormalize=False)
    np.testing.assert_allclose(raw, expected_w, rtol=1e-5)


def test_load_balance_and_z_loss_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(11, E)).astype(np.float32)
    probs, _, indices = gating.top_k_gating(jnp.asarray(logits), K)
    counts = np.zeros(E)
    for row in np.asarray(indices):
        for e in row:
            counts[e] += 1
    f = counts / (11 * K)
    p = ref.softmax(logits).mean(0)
    loss = gating.load_balance_loss(gating.expert_fractions(indices, E), jnp.mean(probs, 0))
    np.testing.assert_allclose(loss, E * np.sum(f * p), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(gating.z_loss(jnp.asarray(logits)), np.mean(lse**2), rtol=1e-5)


def test_perfectly_balanced_routing_gives_one():
    # Every expert chosen equally often and uniform probabilities: E * sum (1/E)(1/E) = 1.
    indices = jnp.asarray([[e, (e + 1) % E] for e in range(E)], jnp.int32)
    fractions = gating.expert_fractions(indices, E)
    np.testing.assert_allclose(fractions, np.full(E, 1 / E))
    np.testing.assert_allclose(gating.load_balance_loss(fractions, jnp.full((E,), 1 / E)), 1.0, rtol=1e-6)


def test_routing_stats_match_numpy():
    logits = np.random.default_rng(2).normal(size=(13, E)).astype(np.float32) * 2
    probs = ref.softmax(logits)
    stats = gating.routing_stats(jnp.asarray(probs), K)
    np.testing.assert_allclose(stats["gate_entropy"], np.mean(-(probs * np.log(probs)).sum(-1)), rtol=1e-5)
    top = -np.sort(-probs, axis=-1)
    np.testing.assert_allclose(stats["top1_top2_ratio"], np.median(top[:, 0] / top[:, 1]), rtol=1e-5)
    np.testing.assert_allclose(stats["topk_weight_sum"], np.mean(top[:, :K].sum(-1)), rtol=1e-5)
    uniform = gating.routing_stats(jnp.full((4, E), 1 / E), K)
    np.testing.assert_allclose(uniform["gate_entropy"], np.log(E), rtol=1e-6)


def _problem(groups=3, seq=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(groups, seq, D)).astype(np.float32)
    logits = rng.normal(size=(groups * seq, E)).astype(np.float32)
    _, weights, indices = gating.top_k_gating(jnp.asarray(logits), K)
    experts = tuple(jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.3)
                    for s in [(E, D, F), (E, D, F), (E, F, D)])
    return jnp.asarray(x), weights.reshape(groups, seq, K), indices.reshape(groups, seq, K), experts


def per_token_reference(x, weights, indices, experts):
    """y_n = sum_j w_nj * w2_e(silu(w1_e x_n) * w3_e x_n), e = idx_nj; one token at a time."""
    w1, w3, w2 = experts

    def token(x_n, w_n, idx_n):
        h = jax.nn.silu(jnp.einsum("d,kdf->kf", x_n, w1[idx_n])) * jnp.einsum("d,kdf->kf", x_n, w3[idx_n])
        return jnp.einsum("kf,kfd,k->d", h, w2[idx_n], w_n)

    return jax.vmap(token)(x.reshape(-1, D), weights.reshape(-1, K), indices.reshape(-1, K))


def test_dispatch_strategies_agree_with_reference_outputs_and_grads():
    x, weights, indices, experts = _problem()
    groups, seq, _ = x.shape
    no_drop_capacity = seq * K  # every slot fits

    def losses(x, weights, experts):
        probe = jnp.sin(jnp.arange(groups * seq * D, dtype=jnp.float32)).reshape(-1, D)
        capacity_y, kept = capacity_dispatch(x, weights, indices, experts, no_drop_capacity)
        dropless_y = dropless_dispatch(x.reshape(-1, D), weights.reshape(-1, K), indices.reshape(-1, K), experts)
        reference_y = per_token_reference(x, weights, indices, experts)
        return [jnp.sum(y.reshape(-1, D) * probe) for y in (capacity_y, dropless_y, reference_y)], kept

    (values, kept) = losses(x, weights, experts)
    assert bool(jnp.all(kept))
    np.testing.assert_allclose(values[0], values[2], rtol=1e-5)
    np.testing.assert_allclose(values[1], values[2], rtol=1e-5)
    grads = [jax.grad(lambda *a, i=i: losses(*a)[0][i], argnums=(0, 1, 2))(x, weights, experts)
             for i in range(3)]
    for strategy in (0, 1):
        for ours, expected in zip(jax.tree.leaves(grads[strategy]), jax.tree.leaves(grads[2])):
            np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def numpy_kept(indices, capacity):
    """GShard priority: all first choices (in token order), then all second choices, ..."""
    groups, seq, k = indices.shape
    kept = np.zeros(indices.shape, bool)
    for g in range(groups):
        load = np.zeros(E, int)
        for slot in range(k):
            for s in range(seq):
                e = indices[g, s, slot]
                if load[e] < capacity:
                    kept[g, s, slot] = True
                    load[e] += 1
    return kept


def test_small_capacity_drops_what_numpy_counts():
    x, weights, indices, experts = _problem(groups=2, seq=16, seed=3)
    capacity = expert_capacity(16, E, K, capacity_factor=0.5)
    assert capacity == 4
    y, kept = capacity_dispatch(x, weights, indices, experts, capacity)
    expected_kept = numpy_kept(np.asarray(indices), capacity)
    np.testing.assert_array_equal(np.asarray(kept), expected_kept)
    assert 0 < (~expected_kept).sum() < expected_kept.size
    # Dropped assignments contribute nothing: the reference with their weights zeroed matches.
    reference = per_token_reference(x, weights * expected_kept, indices, experts)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_size,expected", [(512, 80), (8, 2), (3, 1)])
def test_expert_capacity(group_size, expected):
    assert expert_capacity(group_size, 16, 2, 1.25) == expected


@pytest.mark.parametrize("group_sizes", [[5, 0, 7, 3], [0, 0, 0, 40], [9, 9, 9, 9], [1, 2, 3, 0]])
def test_grouped_matmul_matches_a_per_group_loop(group_sizes):
    rng = np.random.default_rng(4)
    rows = 40  # more rows than sum(group_sizes) in some cases: those give zeros
    lhs = rng.normal(size=(rows, 6)).astype(np.float32)
    rhs = rng.normal(size=(4, 6, 5)).astype(np.float32)
    expected = np.zeros((rows, 5), np.float32)
    start = 0
    for group, size in enumerate(group_sizes):
        expected[start:start + size] = lhs[start:start + size] @ rhs[group]
        start += size
    sizes = jnp.asarray(group_sizes, jnp.int32)
    for fn in (grouped_matmul, blocked_matmul, jax.lax.ragged_dot):
        np.testing.assert_allclose(fn(jnp.asarray(lhs), jnp.asarray(rhs), sizes), expected, rtol=1e-5, atol=1e-5)
    probe = rng.normal(size=(rows, 5)).astype(np.float32)
    grads = [jax.grad(lambda l, r, f=f: jnp.sum(f(l, r, sizes) * probe), argnums=(0, 1))(lhs, rhs)
             for f in (blocked_matmul, jax.lax.ragged_dot)]
    for ours, reference in zip(*grads):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
