"""The scanned decoder: every router variant trains, causality, aux aggregation, bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmoe_jax.config import ConfigError, model_config
from rmoe_jax.model import build_model, count_params, decay_mask, frozen_mask

from helpers import small_model

VARIANTS = {
    "linear": ("linear", {}),
    "linear_bias_capacity": ("linear", {"router.bias": True, "moe.dispatch": "capacity"}),
    "mlp": ("mlp", {}),
    "random": ("random", {}),
    "cosine": ("cosine", {}),
    "xmoe": ("xmoe", {}),
    "hyper": ("hyper", {}),
    "rmoe": ("recurrent", {"router.bias": True, "router.projector_bias": True}),
    "rmoe_lstm_sproj": ("recurrent", {"router.cell": "lstm", "router.shared_projector": True}),
    "rmoe_np_alpha": ("recurrent", {"router.no_recurrence": True, "router.residual_alpha": 1.0,
                                    "router.residual_detach": True}),
    "rmoe_detach_xmoe": ("recurrent", {"router.detach": True, "router.head": "xmoe",
                                       "moe.dispatch": "capacity"}),
    "rmoe_shared_expert_remat": ("recurrent", {"moe.shared_expert": True, "remat_policy": "save_moe",
                                               "moe.z_loss_coef": 0.001, "tie_embeddings": True}),
    "rmoe_bf16_dropout": ("recurrent", {"dtype": "bfloat16", "dropout_rate": 0.1,
                                        "remat_policy": "full", "moe.balance_aggregation": "concat"}),
}


def lm_loss(model, params, tokens, rng):
    logits, aux = model.apply({"params": params}, tokens[:, :-1], deterministic=False,
                              rngs={"dropout": rng})
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return nll + aux["aux_loss"], (nll, aux)


# Plain baseline routers' forward math is checked against NumPy (test_router_references.py) and
# their frozen params in test_train_optim.py; their one-step training runs with `-m slow`
# (one compile each). Every recurrent variant, capacity dispatch and cosine stay in the default suite.
SLOW_VARIANTS = {"linear", "mlp", "random", "xmoe", "hyper"}


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) if v in SLOW_VARIANTS
                                     else v for v in sorted(VARIANTS)])
def test_every_router_trains_one_step(variant):
    router, overrides = VARIANTS[variant]
    cfg = small_model(router, **overrides)
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)

    @jax.jit  # one compile per variant: init, loss, grads and an optimizer step together
    def init_and_step(key):
        params = model.init(key, tokens[:, :-1])["params"]
        labels = jax.tree.map(lambda frozen: "frozen" if frozen else "train", frozen_mask(params))
        optimizer = optax.multi_transform({"train": optax.adam(1e-2), "frozen": optax.set_to_zero()},
                                          labels)
        grads, (nll, aux) = jax.grad(lambda p: lm_loss(model, p, tokens, jax.random.key(2)),
                                     has_aux=True)(params)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return params, optax.apply_updates(params, updates), nll, aux, grads

    params, new_params, nll, aux, grads = init_and_step(jax.random.key(0))
    assert np.isfinite(float(nll)) and np.isfinite(float(aux["aux_loss"]))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    stats = aux["stats"]
    assert stats["expert_load"].shape == (cfg.num_layers, cfg.moe.num_experts)
    np.testing.assert_allclose(np.asarray(stats["expert_load"]).sum(-1), 1.0, rtol=1e-5)
    frozen = jax.tree.leaves(frozen_mask(params))
    for leaf, new_leaf, grad, is_frozen in zip(jax.tree.leaves(params), jax.tree.leaves(new_params),
                                               jax.tree.leaves(grads), frozen):
        changed = not np.array_equal(np.asarray(leaf), np.asarray(new_leaf))
        # Frozen params never move; every other param moves exactly when it has a gradient
        # (e.g. the GRU's hidden kernel has none under no_recurrence: it only ever sees h = 0).
        assert changed == (not is_frozen and bool(np.any(np.asarray(grad) != 0)))
    assert sum(frozen) == {"random": 1, "hyper": 2}.get(router, 0)


def test_causal_changing_token_t_leaves_earlier_logits():
    cfg = small_model("recurrent", **{"moe.dispatch": "dropless"})
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, cfg.vocab_size)
    params = model.init(jax.random.key(0), tokens)["params"]
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % cfg.vocab_size)
    logits_a, _ = model.apply({"params": params}, tokens)
    logits_b, _ = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(logits_a[:, :6]), np.asarray(logits_b[:, :6]))
    assert not np.allclose(np.asarray(logits_a[:, 6:]), np.asarray(logits_b[:, 6:]))


@pytest.mark.parametrize("aggregation", ["sum", "mean", "concat"])
def test_balance_aggregation_matches_numpy(aggregation):
    cfg = small_model("linear", **{"moe.balance_aggregation": aggregation, "moe.balance_coef": 0.1})
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, cfg.vocab_size)
    params = model.init(jax.random.key(0), tokens)["params"]
    (_, aux), state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    probs = np.asarray(state["intermediates"]["layers"]["moe"]["router_probs"][0])  # [L, N, E]
    num_experts = cfg.moe.num_experts
    top = np.argsort(-probs, axis=-1)[..., :cfg.moe.top_k]
    fractions = np.stack([np.bincount(t.ravel(), minlength=num_experts) / t.size for t in top])
    mean_probs = probs.mean(1)
    per_layer = num_experts * (fractions * mean_probs).sum(-1)
    expected = {"sum": per_layer.sum(), "mean": per_layer.mean(),
                "concat": num_experts * (fractions.mean(0) * mean_probs.mean(0)).sum()}[aggregation]
    np.testing.assert_allclose(aux["balance_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(aux["aux_loss"], 0.1 * expected, rtol=1e-5)


def test_masks_cover_the_right_params():
    cfg = small_model("random", **{"router.bias": True})
    params = build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    frozen = frozen_mask(params)
    assert frozen["layers"]["moe"]["router"]["frozen_kernel"] is True
    assert frozen["layers"]["moe"]["w1"] is False
    decay = decay_mask(params)
    assert decay["layers"]["attention_norm"]["scale"] is False
    assert decay["final_norm"]["scale"] is False
    assert decay["layers"]["moe"]["w2"] is True
    assert decay["embed"]["embedding"] is True


def test_bad_model_config_lists_every_problem():
    cfg = model_config()
    cfg.moe.top_k = 20
    cfg.num_heads = 7
    cfg.num_kv_heads = 3
    cfg.router.name = "banana"
    cfg.moe.dispatch = "magic"
    with pytest.raises(ConfigError) as error:
        build_model(cfg)
    message = str(error.value)
    for expected in ("model.moe.top_k: 20 is larger than num_experts=16",
                     "model.d_model: 352 is not divisible by num_heads=7",
                     "model.num_heads: 7 is not divisible by num_kv_heads=3",
                     "model.router.name: 'banana' is not one of",
                     "model.moe.dispatch: 'magic' is not one of"):
        assert expected in message, message
    cfg = model_config()
    cfg.router.hidden_size = 0
    cfg.router.cell = "transformer"
    with pytest.raises(ConfigError, match=r"(?s)router.cell: 'transformer'.*router.hidden_size: p must be > 0"):
        build_model(cfg)
    cfg = model_config()
    cfg.attention_chunk = -128
    with pytest.raises(ConfigError, match=r"model.attention_chunk: must be an integer >= 0 \(0 = unchunked\), got -128"):
        build_model(cfg)


def _paper_medium(router):
    cfg = model_config()  # d=352, 8 layers, 8 heads, 16 experts top-2, f=352, p=128
    cfg.router.name = router
    cfg.router.bias = cfg.router.projector_bias = True
    return cfg


def test_parameter_counts_match_hand_computation():
    d, layers, experts, p, vocab = 352, 8, 16, 128, 256
    rmoe = count_params(_paper_medium("recurrent"))
    gru = 2 * (3 * p * p) + 2 * 3 * p
    per_layer_router = (d * p + p) + (p * experts + experts)
    assert rmoe["router"] == layers * per_layer_router + gru == 477_056  # Table 1: 0.47M
    smoe = count_params(_paper_medium("linear"))
    assert smoe["router"] == layers * (d * experts + experts)
    attention = 4 * d * d
    norms = 2 * d
    expert_params = experts * 3 * d * 352
    total = 2 * vocab * d + d + layers * (attention + norms + expert_params + d * experts + experts)
    assert smoe["total"] == total
    assert smoe["active"] == total - layers * (experts - 2) * 3 * d * 352
    assert rmoe["total"] - smoe["total"] == rmoe["router"] - smoe["router"]
