"""The pure train and eval steps.

Loss = (sum over tokens of weight * cross-entropy) / (sum of weights) + aux_loss, where
`aux_loss` is what the model returns (already coefficient-weighted). With gradient accumulation
over k micro-batches the cross-entropy part is exactly the one-big-batch loss (each micro-batch
contributes its weighted CE sum divided by the *whole* batch's weight); the aux loss, which is
not additive over tokens, is the mean of the k micro-batch aux losses (as in every
micro-batching trainer).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rmoe_jax.train.optim import make_schedule, trainable_global_norm
from rmoe_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, Any]


def weighted_cross_entropy_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """(sum of weight * CE, sum of weights), CE in float32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = weights.astype(jnp.float32)
    return jnp.sum(ce * weights), jnp.sum(weights)


def _aux_metrics(aux: dict) -> Metrics:
    out = {k: jnp.asarray(aux[k], jnp.float32) for k in ("aux_loss", "balance_loss", "z_loss") if k in aux}
    for k, v in aux.get("stats", {}).items():
        out[f"stats/{k}"] = jnp.asarray(v, jnp.float32)
    return out


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    train: ml_collections.ConfigDict,
    *,
    frozen_mask: Any = None,
    keep_state_on_exchange_overflow: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """A pure `step(state, batch) -> (state, metrics)` (not jitted: the caller jits it).

    `metrics['exchange_overflow']` counts the rows that bounded expert-parallel exchange blocks
    dropped (summed over layers and micro-batches). With `keep_state_on_exchange_overflow`
    (dropless with `moe.exchange_overflow=rerun`) a step that dropped any returns the state it
    was given, unchanged, so the caller can run the batch again with worst-case blocks.

    `batch` holds `inputs`, `targets` (int32 [b, seq]) and `weights` (float [b, seq]);
    with `train.grad_accum_steps = k` the batch is split into k micro-batches of b / k rows
    (micro-batch i = rows i, i + k, ...) that are run one after another (`lax.scan`) with their
    gradients summed.
    """
    accum = int(train.grad_accum_steps)
    seed = int(train.seed)
    schedule = make_schedule(train)
    nan_step = int(train.get("inject_nan_at_step", -1))

    def micro_loss(params, micro: Batch, key, total_weight):
        logits, aux = model.apply({"params": params}, micro["inputs"], deterministic=False,
                                  rngs={"dropout": key})
        ce_sum, weight_sum = weighted_cross_entropy_sum(logits, micro["targets"], micro["weights"])
        loss = ce_sum / total_weight + jnp.asarray(aux["aux_loss"], jnp.float32) / accum
        return loss, (ce_sum, weight_sum, _aux_metrics(aux))

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        step_key = jax.random.fold_in(jax.random.key(seed + 1), state.step)
        total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
        if accum == 1:
            grads, (ce_sum, weight_sum, aux) = grad_fn(state.params, batch, step_key, total_weight)
        else:
            # Micro-batch i takes rows i, i + k, i + 2k, ...: with the batch dimension sharded in
            # contiguous blocks, every device keeps an equal share of every micro-batch.
            micro_batches = jax.tree.map(
                lambda x: jnp.moveaxis(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 1, 0),
                batch)

            def body(carry, xs):
                grads_acc, ce_acc, w_acc, aux_acc = carry
                index, micro = xs
                g, (ce, w, aux) = grad_fn(state.params, micro, jax.random.fold_in(step_key, index),
                                          total_weight)
                grads_acc = jax.tree.map(jnp.add, grads_acc, g)
                aux_acc = jax.tree.map(lambda a, b: a + b / accum, aux_acc, aux)
                return (grads_acc, ce_acc + ce, w_acc + w, aux_acc), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            aux_shape = jax.eval_shape(
                lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro_batches), step_key,
                                total_weight)[1][2])
            aux_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), aux_zeros)
            (grads, ce_sum, weight_sum, aux), _ = jax.lax.scan(
                body, init, (jnp.arange(accum), micro_batches))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

        ce_loss = ce_sum / jnp.maximum(weight_sum, 1.0)
        loss = ce_loss + aux.get("aux_loss", 0.0)
        if nan_step >= 0:  # testing hook: poison the loss and every gradient at one step
            poison = jnp.where(state.step == nan_step, jnp.nan, 0.0)
            loss = loss + poison
            grads = jax.tree.map(lambda g: g + poison.astype(g.dtype), grads)
        grad_norm = trainable_global_norm(grads, frozen_mask)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        overflow = jnp.sum(aux.get("stats/exchange_dropped", jnp.zeros(()))) * accum
        if keep_state_on_exchange_overflow:
            new_state = jax.tree.map(lambda old, new: jnp.where(overflow > 0, old, new),
                                     state, new_state)
        metrics = dict(aux)
        metrics["exchange_overflow"] = overflow
        metrics.update(loss=loss, ce_loss=ce_loss, grad_norm=grad_norm,
                       learning_rate=schedule(state.step), tokens=weight_sum)
        return new_state, metrics

    return step


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], Metrics]:
    """`eval_step(params, batch) -> sums` to be added over batches (see `finish_eval`)."""

    def eval_step(params, batch: Batch) -> Metrics:
        logits, aux = model.apply({"params": params}, batch["inputs"], deterministic=True)
        ce_sum, weight_sum = weighted_cross_entropy_sum(logits, batch["targets"], batch["weights"])
        return {"ce_sum": ce_sum, "weight_sum": weight_sum,
                "aux_loss_sum": jnp.asarray(aux["aux_loss"], jnp.float32), "batches": jnp.ones(())}

    return eval_step


def finish_eval(sums: Metrics, *, byte_level: bool) -> dict[str, float]:
    """Mean loss per target token; bits per byte for byte tokens, perplexity otherwise."""
    import math

    weight = float(sums["weight_sum"])
    loss = float(sums["ce_sum"]) / max(weight, 1.0)
    out = {"loss": loss, "tokens": weight,
           "aux_loss": float(sums["aux_loss_sum"]) / max(float(sums["batches"]), 1.0)}
    if byte_level:
        out["bits_per_byte"] = loss / math.log(2.0)
    else:
        out["perplexity"] = math.exp(min(loss, 700.0))
    return out


def eval_sums(eval_fn: Callable[[Any, Batch], Metrics], params, batches: Iterable[Batch], *,
              split: str = "") -> Metrics:
    """THE eval loop: `eval_fn(params, batch)` summed over `batches` in float64.

    Batches come padded to one shape by `rmoe_jax.data.make_eval_batches` (weight-0 rows), so
    one compiled program serves them all. Returns the sums `finish_eval` takes.

    Raises:
      ValueError: there were no batches (naming `split`, when given).
    """
    totals = None
    for batch in batches:
        out = jax.device_get(eval_fn(params, batch))
        totals = ({k: np.float64(v) for k, v in out.items()} if totals is None
                  else {k: totals[k] + np.float64(out[k]) for k in totals})
    if totals is None:
        raise ValueError(f"no eval batches: split {split!r} is empty" if split
                         else "no eval batches: the split is empty")
    return totals
