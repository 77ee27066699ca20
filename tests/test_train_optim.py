"""Optimizer, schedules, masks, frozen params, gradient accumulation (the real model)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmoe_jax.config import default_config
from rmoe_jax.model import build_model, decay_mask, frozen_mask
from rmoe_jax.train import (TrainState, make_optimizer, make_schedule, make_train_step,
                            weighted_cross_entropy_sum)

from helpers import random_params, small_model


def small_model_config(router="recurrent", **router_options):
    return small_model(router, **{f"router.{key}": value for key, value in router_options.items()})


def train_config(**kw):
    t = default_config().train
    for k, v in kw.items():
        t[k] = v
    return t


def init_params(model, seq=16, seed=0):
    x = jnp.zeros((1, seq), jnp.int32)
    return model.init({"params": jax.random.key(seed), "dropout": jax.random.key(1)}, x,
                      deterministic=True)["params"]


def random_batch(rows, seq=16, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, seq + 1)).astype(np.int32)
    weights = (rng.random((rows, seq)) < 0.9).astype(np.float32)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "weights": jnp.asarray(weights)}


# -- schedules --------------------------------------------------------------------------------------

def test_warmup_constant_schedule_hand_values():
    s = make_schedule(train_config(learning_rate=1e-3, warmup_steps=4, schedule="constant", num_steps=100))
    got = [float(s(i)) for i in range(7)]
    want = [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_warmup_cosine_schedule_hand_values():
    s = make_schedule(train_config(learning_rate=1.0, final_learning_rate=0.1, warmup_steps=2,
                                   schedule="cosine", num_steps=12))
    # warmup 0.5, 1.0; then cosine over 10 steps from 1.0 to 0.1, flat at 0.1 afterwards.
    want = {0: 0.5, 1: 1.0, 2: 1.0, 7: 0.55, 12: 0.1, 30: 0.1,
            4: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)),
            11: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9))}
    for step, value in want.items():
        assert float(s(step)) == pytest.approx(value, rel=1e-5), step


def test_no_warmup_starts_at_peak():
    s = make_schedule(train_config(learning_rate=2e-3, warmup_steps=0, schedule="constant"))
    assert float(s(0)) == pytest.approx(2e-3)


# -- AdamW against a NumPy reference --------------------------------------------------------------

def numpy_adamw(params, grads_seq, *, lrs, b1, b2, eps, wd, clip, decay):
    """PyTorch-style AdamW with global-norm clipping, written from the formulas."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
        scale = min(1.0, clip / norm) if clip > 0 else 1.0
        lr = lrs[t - 1]
        for k in p:
            g = grads[k] * scale
            m[k] = b1 * m[k] + (1 - b1) * g
            v2[k] = b2 * v2[k] + (1 - b2) * g * g
            mhat, vhat = m[k] / (1 - b1 ** t), v2[k] / (1 - b2 ** t)
            update = mhat / (np.sqrt(vhat) + eps)
            if decay[k]:
                update = update + wd * p[k]
            p[k] = p[k] - lr * update
    return p


def test_adamw_matches_numpy_reference():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "bias": rng.normal(size=(4,)).astype(np.float32)}
    grads_seq = [{k: (5 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
                 for _ in range(5)]
    cfg = train_config(learning_rate=1e-2, warmup_steps=2, schedule="constant", beta1=0.8, beta2=0.95,
                       eps=1e-6, weight_decay=0.1, grad_clip_norm=1.0)
    decay = {"w": True, "bias": False}
    tx = make_optimizer(cfg, decay_mask=decay)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for grads in grads_seq:
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, p)
        p = optax.apply_updates(p, updates)
    lrs = [5e-3, 1e-2, 1e-2, 1e-2, 1e-2]
    want = numpy_adamw(params, grads_seq, lrs=lrs, b1=0.8, b2=0.95, eps=1e-6, wd=0.1, clip=1.0, decay=decay)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=1e-6)


def test_weight_decay_mask_excludes_norms_and_biases():
    model_cfg = small_model_config(bias=True, projector_bias=True)
    params = init_params(build_model(model_cfg))
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(path): m for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert not any(m for k, m in flat.items() if "scale" in k or "bias" in k), flat
    assert any("bias" in k for k in flat) and any("scale" in k for k in flat)
    # With zero gradients Adam's update is exactly 0, so only weight decay moves the params:
    # p <- p * (1 - lr * wd) where decayed, bitwise unchanged elsewhere.
    lr, wd = 0.1, 0.5
    tx = make_optimizer(train_config(learning_rate=lr, warmup_steps=0, weight_decay=wd, grad_clip_norm=0.0),
                        frozen_mask=frozen_mask(params), decay_mask=mask)

    @jax.jit
    def one_update(params):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = one_update(params)
    for (path, p), n, m in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new),
                               jax.tree.leaves(mask)):
        if m:
            np.testing.assert_allclose(np.asarray(n), np.asarray(p) * (1 - lr * wd), rtol=1e-6,
                                       err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(np.asarray(n), np.asarray(p), err_msg=jax.tree_util.keystr(path))


# -- the train step ---------------------------------------------------------------------------------

def _state(params, tx):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


@pytest.mark.parametrize("router", ["random", "hyper"])
def test_frozen_params_never_change(router):
    model_cfg = small_model_config(router)
    model = build_model(model_cfg)
    params = init_params(model)
    frozen = frozen_mask(params)
    assert any(jax.tree.leaves(frozen)), "the router should have frozen params"
    cfg = train_config(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)
    tx = make_optimizer(cfg, frozen_mask=frozen, decay_mask=decay_mask(params))
    step = jax.jit(make_train_step(model, tx, cfg, frozen_mask=frozen))
    state = _state(params, tx)
    for i in range(3):
        state, metrics = step(state, random_batch(4, seed=i))
        assert np.isfinite(metrics["loss"])
    for p, n, f in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), jax.tree.leaves(frozen)):
        if f:
            np.testing.assert_array_equal(np.asarray(p), np.asarray(n))
    moved = [not np.array_equal(p, n) for p, n, f in
             zip(jax.tree.leaves(params), jax.tree.leaves(state.params), jax.tree.leaves(frozen)) if not f]
    assert all(moved)


def test_loss_is_weighted_ce_plus_aux():
    model_cfg = small_model_config()
    model = build_model(model_cfg)
    params = init_params(model)
    batch = random_batch(4)
    cfg = train_config()
    tx = optax.sgd(0.0)
    _, metrics = jax.jit(make_train_step(model, tx, cfg))(_state(params, tx), batch)
    logits, aux = model.apply({"params": params}, batch["inputs"], deterministic=True)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(batch["targets"])[..., None], -1)[..., 0]
    w = np.asarray(batch["weights"], np.float64)
    want_ce = float(np.sum(nll * w) / np.sum(w))
    assert float(metrics["ce_loss"]) == pytest.approx(want_ce, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(want_ce + float(aux["aux_loss"]), rel=1e-5)
    assert float(aux["aux_loss"]) > 0


def test_grad_accumulation_equals_one_big_batch():
    model_cfg = small_model_config()
    model_cfg.moe.balance_coef = 0.0  # the balance loss is not additive over micro-batches
    model_cfg.moe.z_loss_coef = 0.0
    model = build_model(model_cfg)
    params = init_params(model)
    batch = random_batch(8, seed=3)
    tx = optax.sgd(1.0)  # new params = params - grads: compares the gradients themselves
    steps = {k: jax.jit(make_train_step(model, tx, train_config(grad_accum_steps=k, batch_size=8)))
             for k in (1, 4)}
    results = {k: step(_state(params, tx), batch) for k, step in steps.items()}
    (s1, m1), (s4, m4) = results[1], results[4]
    p1, p4 = s1.params, s4.params
    assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    assert float(m4["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-4)
    for a, b, p in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), jax.tree.leaves(params)):
        ga, gb = np.asarray(p) - np.asarray(a), np.asarray(p) - np.asarray(b)
        np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(ga).max())))
    # A sanity check that the comparison can fail: dropping one row's targets (weight 0) changes
    # the gradients by far more than the tolerance.
    other = dict(batch, weights=batch["weights"].at[0].set(0.0))
    s_other, _ = steps[1](_state(params, tx), other)
    assert not all(np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in
                   zip(jax.tree.leaves(p1), jax.tree.leaves(s_other.params)))


def gradient_recorder():
    """An 'optimizer' that moves nothing and keeps the step's gradients as its state (exactly,
    where p - sgd(1) update would lose bits to the subtraction)."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def test_grad_accumulation_averages_the_micro_batches_aux_losses():
    # step.py's documented semantics: the CE part is the one-big-batch loss (micro-batch CE sums
    # over the whole batch's weight); the aux part, not additive over tokens, is the mean of the k
    # micro-batch aux losses (micro-batch i = rows i, i + k, ...). The reference is built from
    # model.apply on each micro-batch (lax.map) and jax.grad, not from make_train_step.
    model_cfg = small_model_config()
    model_cfg.moe.balance_coef = 0.5  # large, so that the aux part weighs in the gradients
    model_cfg.moe.z_loss_coef = 0.05
    model = build_model(model_cfg)
    params = random_params(model_cfg, seed=2)  # router logits of order 1: no near-tied experts
    batch = random_batch(8, seed=5)
    k = 4
    micro_batches = {key: jnp.stack([value[i::k] for i in range(k)]) for key, value in batch.items()}

    def loss(params):
        """CE part + aux part (mean over micro-batches), with (CE part, aux part, each
        micro-batch's aux losses)."""

        def one(micro):
            logits, aux = model.apply({"params": params}, micro["inputs"], deterministic=True)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, micro["targets"])
            losses = {name: aux[name] for name in ("aux_loss", "balance_loss", "z_loss")}
            return jnp.sum(nll * micro["weights"]), losses

        ce_sums, aux = jax.lax.map(one, micro_batches)  # (vmap: ragged_dot has no batching rule)
        ce, aux_part = jnp.sum(ce_sums) / jnp.sum(batch["weights"]), jnp.mean(aux["aux_loss"])
        return ce + aux_part, (ce, aux_part, aux)

    @jax.jit
    def reference(params):
        (_, (ce, aux_part, per_micro)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        _, whole = model.apply({"params": params}, batch["inputs"], deterministic=True)
        return ce, aux_part, per_micro, grads, whole["balance_loss"]

    want_ce, want_aux, per_micro, want_grads, whole_balance = reference(params)
    tx = gradient_recorder()
    state, metrics = jax.jit(make_train_step(model, tx, train_config(grad_accum_steps=k, batch_size=8)))(
        _state(params, tx), batch)

    # The micro-batches' aux losses differ and their mean is not the whole batch's, so the test
    # tells "mean over micro-batches" from "one big batch" (and from a sum).
    balances = np.asarray(per_micro["balance_loss"])
    assert balances.max() - balances.min() > 1e-2
    assert abs(float(whole_balance) - float(np.mean(balances))) > 1e-3
    assert np.all(np.asarray(per_micro["z_loss"]) > 0.1)

    assert float(metrics["ce_loss"]) == pytest.approx(float(want_ce), rel=1e-5)
    for name in ("aux_loss", "balance_loss", "z_loss"):
        want = float(np.mean(np.asarray(per_micro[name])))
        assert float(metrics[name]) == pytest.approx(want, rel=1e-5), name
    assert float(metrics["aux_loss"]) == pytest.approx(float(want_aux), rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(float(want_ce + want_aux), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.global_norm(want_grads)), rel=1e-4)
    for (path, ours), expected in zip(jax.tree_util.tree_flatten_with_path(state.opt_state)[0],
                                      jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()),
                                   err_msg=jax.tree_util.keystr(path))


def test_weighted_cross_entropy_ignores_zero_weights():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
    targets = jnp.asarray([[0, 1, 2], [3, 4, 0]], jnp.int32)
    w = jnp.asarray([[1, 1, 0], [1, 0, 0]], jnp.float32)
    s, n = weighted_cross_entropy_sum(logits, targets, w)
    logp = jax.nn.log_softmax(logits)
    want = -(logp[0, 0, 0] + logp[0, 1, 1] + logp[1, 0, 3])
    assert float(n) == 3.0
    assert float(s) == pytest.approx(float(want), rel=1e-6)
