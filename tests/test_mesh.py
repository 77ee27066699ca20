"""Sharded over 8 fake CPU devices == single device, for loss and gradients."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rmoe_jax import parallel
from rmoe_jax.config import mesh_config
from rmoe_jax.model import build_model

from helpers import random_params, small_model
from test_moe import numpy_kept

MESHES = {  # (data, fsdp, expert, tensor)
    "data8": (8, 1, 1, 1),
    "data2_expert4": (2, 1, 4, 1),
    "fsdp2_expert4": (1, 2, 4, 1),
    "data2_fsdp2_expert2": (2, 2, 2, 1),
    "expert4_tensor2": (1, 1, 4, 2),
}
# The default suite covers every mesh, router and strategy; `-m slow` runs the full grid.
DEFAULT_CASES = [
    ("data8", "recurrent", "dropless"),
    ("data2_expert4", "linear", "capacity"),
    ("fsdp2_expert4", "recurrent", "capacity"),
    ("data2_fsdp2_expert2", "linear", "dropless"),
    ("expert4_tensor2", "recurrent", "dropless"),
]
ALL_CASES = [case for case in itertools.product(MESHES, ("recurrent", "linear"), ("dropless", "capacity"))
             if case not in DEFAULT_CASES]


def make_mesh(shape):
    config = mesh_config()
    config.data, config.fsdp, config.expert, config.tensor = shape
    return parallel.make_mesh(config)


def loss_and_dropped(model, params, tokens):
    """(CE + aux loss, per-layer dropped fraction `[L]` from aux['stats'])."""
    logits, aux = model.apply({"params": params}, tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + aux["aux_loss"], aux["stats"]["dropped_fraction"]


def loss_fn(model, params, tokens):
    return loss_and_dropped(model, params, tokens)[0]


def sharded_loss_and_grads(mesh, model, params, tokens):
    """-> loss, dropped fraction `[L]`, grads, compiled HLO text, the placed params."""
    rules = parallel.DEFAULT_RULES
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), parallel.param_specs(params, rules),
                             is_leaf=lambda x: isinstance(x, P))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(jax.value_and_grad(lambda p, t: loss_and_dropped(model, p, t), has_aux=True),
                       in_shardings=(shardings, parallel.batch_sharding(mesh)))
        compiled = step.lower(params, tokens).compile()
        placed = jax.device_put(params, shardings)
        (loss, dropped), grads = compiled(placed, jax.device_put(tokens, parallel.batch_sharding(mesh)))
    return loss, dropped, grads, compiled.as_text(), placed


def check_placement(mesh, cfg, hlo, placed):
    expert_shards = mesh.shape["expert"]
    if expert_shards > 1:
        assert "all-to-all" in hlo  # tokens travel to their experts' devices
    w1 = placed["layers"]["moe"]["w1"]  # [L, E, d, f]
    local = w1.addressable_shards[0].data.shape
    assert local[1] == cfg.moe.num_experts // expert_shards
    assert local[3] == cfg.moe.expert_hidden // mesh.shape["tensor"]


def check_case(mesh_name, router, dispatch):
    cfg = small_model(router, **{"moe.dispatch": dispatch, "moe.capacity_factor": 4.0})
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 9), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])["params"]
    expected_loss, expected_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(model, p, tokens)))(params)
    mesh = make_mesh(MESHES[mesh_name])
    loss, dropped, grads, hlo, placed = sharded_loss_and_grads(mesh, model, params, tokens)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_array_equal(dropped, 0.0)  # capacity_factor 4: nothing is dropped
    for ours, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)
    check_placement(mesh, cfg, hlo, placed)


@pytest.mark.parametrize("mesh_name,router,dispatch", DEFAULT_CASES)
def test_sharded_step_equals_single_device(mesh_name, router, dispatch):
    check_case(mesh_name, router, dispatch)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name,router,dispatch", ALL_CASES)
def test_sharded_step_equals_single_device_full_grid(mesh_name, router, dispatch):
    check_case(mesh_name, router, dispatch)


# Skewed routing: random params (router logits of order 1, so no two experts are near-tied) and a
# gate bias of SKEW_BIAS on expert 0 (0 on the others) send most first choices there; with
# capacity dispatch and capacity factor 0.5 over half the assignments are dropped.
SKEWED_CASES = [
    ("data2_expert4", "linear", "capacity"),
    ("data2_fsdp2_expert2", "recurrent", "capacity"),
    ("expert4_tensor2", "linear", "dropless"),  # dropless stays exact however skewed
]
SKEW_BIAS = {"linear": 4.0, "recurrent": 1.0}
SMALL_CAPACITY_FACTOR = 0.5


def skewed_params(cfg, seed=0):
    params = random_params(cfg, seed=seed, scale=0.3)
    gate = params["layers"]["moe"]["router"]["gate"]
    gate["bias"] = jnp.zeros_like(gate["bias"]).at[:, 0].set(SKEW_BIAS[cfg.router.name])  # [L, E]
    return params


def numpy_dropped_fraction(router_logits, num_sequences, top_k, capacity_factor):
    """Per layer, the fraction of (token, choice) assignments capacity dispatch drops: each
    sequence is a group with ceil(k * seq * capacity_factor / E) slots per expert, filled
    first choices first, in token order (`numpy_kept`). router_logits `[L, B*S, E]`."""
    layers, tokens, num_experts = router_logits.shape
    seq = tokens // num_sequences
    capacity = math.ceil(top_k * seq * capacity_factor / num_experts)
    choices = np.argsort(-router_logits, axis=-1, kind="stable")[..., :top_k]  # softmax keeps the order
    return np.array([1.0 - numpy_kept(choices[layer].reshape(num_sequences, seq, top_k), capacity,
                                      num_experts).mean() for layer in range(layers)])


@pytest.mark.parametrize("mesh_name,router,dispatch", SKEWED_CASES)
def test_sharded_step_equals_single_device_under_skewed_routing(mesh_name, router, dispatch):
    cfg = small_model(router, **{"router.bias": True, "moe.dispatch": dispatch,
                                 "moe.capacity_factor": SMALL_CAPACITY_FACTOR})
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 9), 0, cfg.vocab_size)
    params = skewed_params(cfg)
    (expected_loss, expected_dropped), expected_grads = jax.jit(jax.value_and_grad(
        lambda p: loss_and_dropped(model, p, tokens), has_aux=True))(params)
    _, variables = jax.jit(lambda p: model.apply({"params": p}, tokens[:, :-1],
                                                 mutable=["intermediates"]))(params)
    router_logits = np.asarray(variables["intermediates"]["layers"]["moe"]["router_logits"][0])  # [L,B*S,E]
    first_choice = router_logits.argmax(-1)
    assert np.all(np.mean(first_choice == 0, axis=1) >= 0.7)  # skewed in every layer ...
    assert np.any(first_choice != 0)  # ... but not all on one expert

    mesh = make_mesh(MESHES[mesh_name])
    loss, dropped, grads, hlo, placed = sharded_loss_and_grads(mesh, model, params, tokens)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for ours, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        # Random params make larger gradients than init's; float32 reorderings scale with them.
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=2e-5 * float(np.abs(expected).max()))
    if dispatch == "capacity":
        want = numpy_dropped_fraction(router_logits, tokens.shape[0], cfg.moe.top_k,
                                      SMALL_CAPACITY_FACTOR)
        assert np.all(want > 0.5) and np.all(want < 1)  # 0.5: the least capacity factor 0.5 drops
        np.testing.assert_allclose(expected_dropped, want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(dropped, want, rtol=0, atol=1e-6)  # one drop = 1/128 of a layer
    else:
        np.testing.assert_array_equal(dropped, 0.0)
        np.testing.assert_array_equal(expected_dropped, 0.0)
    check_placement(mesh, cfg, hlo, placed)


def test_mesh_that_does_not_fit_names_both_numbers():
    config = mesh_config()
    config.data, config.expert = 3, 2
    with pytest.raises(ValueError, match=r"need 6 devices, but 8 are available"):
        parallel.make_mesh(config)
    config.data = -1
    config.expert = 3
    with pytest.raises(ValueError, match=r"use 3 devices, which does not divide the 8 devices"):
        parallel.make_mesh(config)
    mesh = make_mesh((2, 1, 4, 1))
    problems = parallel.fit_problems(mesh, num_experts=6, global_batch=12)
    assert "model.moe.num_experts=6 is not divisible by the expert axis (mesh.expert=4)" in problems[0]
    assert "train.batch_size=12 (micro-batch 12) is not divisible by the batch shards data*fsdp*expert=8" in problems[1]


def test_every_param_has_logical_axes():
    for router, extra in [("recurrent", {"router.shared_projector": True, "router.projector_bias": True}),
                          ("hyper", {"moe.shared_expert": True}), ("mlp", {"tie_embeddings": True}),
                          ("xmoe", {}), ("random", {}), ("cosine", {})]:
        cfg = small_model(router, **extra)
        params = jax.eval_shape(build_model(cfg).init, jax.random.key(0), jax.numpy.zeros((1, 4), "int32"))
        axes = parallel.param_logical_axes(params["params"])
        for names, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                               jax.tree.leaves(params["params"])):
            assert len(names) == len(leaf.shape)
