"""Sort-based capacity dispatch == the GShard one-hot einsum reference, a NumPy loop and dropless.

`capacity_dispatch` (sort + gathers) must keep exactly the assignments the one-hot version keeps
(slot-major: every first choice before any second choice, in token order), give the same
outputs, and the same gradients w.r.t. x, the gate weights and the three expert weight stacks.
Routing is skewed towards expert 0 so that capacity factors 0.5, 1 and 1.25 really drop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmoe_jax.model import build_model, gating, moe
from rmoe_jax.model.dispatch import (capacity_dispatch, capacity_dispatch_einsum, dropless_dispatch,
                                     expert_capacity)

from helpers import random_params, small_model

E, D, F = 4, 8, 12
GROUPS, SEQ = 3, 16
FACTORS = (0.5, 1.0, 1.25, 4.0)


def skewed_problem(top_k, groups=GROUPS, seq=SEQ, skew=2.0, seed=0):
    """x `[G, S, D]`, gate weights and indices `[G, S, k]` (logits + `skew` on expert 0, so
    most first choices go there), and random expert stacks."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(groups, seq, D)).astype(np.float32)
    logits = rng.normal(size=(groups * seq, E)).astype(np.float32)
    logits[:, 0] += skew
    _, weights, indices = gating.top_k_gating(jnp.asarray(logits), top_k)
    experts = tuple(jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.3)
                    for s in [(E, D, F), (E, D, F), (E, F, D)])
    return (jnp.asarray(x), weights.reshape(groups, seq, top_k), indices.reshape(groups, seq, top_k),
            experts)


def probe_loss(dispatch, indices, capacity):
    """A loss that weighs every output element differently, as a function of the differentiable
    inputs (x, weights, (w1, w3, w2)); also returns the kept mask."""

    def loss(x, weights, experts):
        y, kept = dispatch(x, weights, indices, experts, capacity)
        probe = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y * probe), (y, kept)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def numpy_kept(indices, capacity, num_experts=E):
    """Plain loop in slot-major order: choice 0 of tokens 0..S-1, then choice 1, ...; an
    assignment is kept while its expert has fewer than `capacity` in this group."""
    groups, seq, top_k = indices.shape
    kept = np.zeros(indices.shape, bool)
    for g in range(groups):
        load = [0] * num_experts
        for j in range(top_k):
            for s in range(seq):
                e = int(indices[g, s, j])
                if load[e] < capacity:
                    load[e] += 1
                    kept[g, s, j] = True
    return kept


def numpy_outputs(x, weights, indices, experts, kept):
    """y[g, s] = sum_j kept * w * SwiGLU_e(x[g, s]), one token at a time in NumPy."""
    w1, w3, w2 = (np.asarray(w, np.float64) for w in experts)
    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    y = np.zeros_like(x)
    for g, s, j in np.ndindex(*indices.shape):
        if kept[g, s, j]:
            e = indices[g, s, j]
            up = x[g, s] @ w1[e]
            y[g, s] += weights[g, s, j] * ((up / (1 + np.exp(-up))) * (x[g, s] @ w3[e])) @ w2[e]
    return y


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("factor", FACTORS)
def test_sorted_equals_einsum_outputs_grads_and_kept(factor, top_k):
    x, weights, indices, experts = skewed_problem(top_k, seed=top_k)
    capacity = expert_capacity(SEQ, E, top_k, factor)
    (value, (y, kept)), grads = probe_loss(capacity_dispatch, indices, capacity)(x, weights, experts)
    (ref_value, (ref_y, ref_kept)), ref_grads = probe_loss(capacity_dispatch_einsum, indices, capacity)(
        x, weights, experts)
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(ref_kept))
    dropped = int((~np.asarray(kept)).sum())
    if factor < 4:
        assert dropped > 0  # the skew makes every factor below 4 drop
    else:
        assert dropped == 0  # capacity k * S: everything fits
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
    names = ["x", "weights", "w1", "w3", "w2"]
    for name, ours, expected in zip(names, jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        if name != "weights" or factor == 4:  # dropped choices' weights get no gradient
            assert np.abs(np.asarray(ours)).max() > 0, name


@pytest.mark.parametrize("top_k,factor", [(1, 0.5), (2, 0.5), (2, 1.0), (2, 1.25)])
def test_drops_match_a_numpy_loop(top_k, factor):
    x, weights, indices, experts = skewed_problem(top_k, skew=3.0, seed=10 + top_k)
    capacity = expert_capacity(SEQ, E, top_k, factor)
    y, kept = jax.jit(capacity_dispatch, static_argnums=4)(x, weights, indices, experts, capacity)
    expected = numpy_kept(np.asarray(indices), capacity)
    assert 0 < (~expected).sum() < expected.size
    np.testing.assert_array_equal(np.asarray(kept).sum(), expected.sum())  # the drop count ...
    np.testing.assert_array_equal(np.asarray(kept), expected)  # ... and which ones
    np.testing.assert_allclose(y, numpy_outputs(x, weights, np.asarray(indices), experts, expected),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_sorted_equals_dropless_when_nothing_drops(top_k):
    x, weights, indices, experts = skewed_problem(top_k, seed=20 + top_k)
    capacity = expert_capacity(SEQ, E, top_k, 4.0)  # = k * S: nothing can drop
    (_, (y, kept)), grads = probe_loss(capacity_dispatch, indices, capacity)(x, weights, experts)

    def dropless(x, weights, indices, experts, capacity):
        flat = dropless_dispatch(x.reshape(-1, D), weights.reshape(-1, top_k), indices.reshape(-1, top_k),
                                 experts)
        return flat.reshape(x.shape), jnp.ones(indices.shape, bool)

    (_, (ref_y, _)), ref_grads = probe_loss(dropless, indices, capacity)(x, weights, experts)
    assert bool(jnp.all(kept))
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    for ours, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def _model_loss_and_grads(cfg, params, tokens):
    model = build_model(cfg)

    def loss(p):
        logits, aux = model.apply({"params": p}, tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return ce + aux["aux_loss"], aux["stats"]["dropped_fraction"]

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def test_model_with_sorted_capacity_equals_the_einsum_reference(monkeypatch):
    """The whole model (skewed linear router, capacity factor 0.5): same loss, dropped fraction
    and grads with the model's dispatch as with the one-hot einsum reference plugged in."""
    cfg = small_model("linear", **{"router.bias": True, "moe.dispatch": "capacity",
                                   "moe.capacity_factor": 0.5})
    params = random_params(cfg, seed=0, scale=0.3)
    gate = params["layers"]["moe"]["router"]["gate"]
    gate["bias"] = jnp.zeros_like(gate["bias"]).at[:, 0].set(4.0)  # [L, E]: most go to expert 0
    tokens = jax.random.randint(jax.random.key(1), (4, 9), 0, cfg.vocab_size)
    (loss, dropped), grads = _model_loss_and_grads(cfg, params, tokens)
    monkeypatch.setattr(moe, "capacity_dispatch", capacity_dispatch_einsum)
    (ref_loss, ref_dropped), ref_grads = _model_loss_and_grads(cfg, params, tokens)
    assert np.all(np.asarray(ref_dropped) > 0.3)  # drops in every layer
    np.testing.assert_array_equal(np.asarray(dropped), np.asarray(ref_dropped))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    paths = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
    for (path, expected), ours in zip(paths, jax.tree.leaves(grads)):
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()),
                                   err_msg=jax.tree_util.keystr(path))
