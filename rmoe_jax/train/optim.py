"""Learning-rate schedules and the optimizer (AdamW + clipping, masked).

Schedules are pure functions of the optimizer step count `s` (0 for the first update):

    warmup      lr(s) = peak * (s + 1) / warmup            for s < warmup
    constant    lr(s) = peak                               for s >= warmup
    cosine      lr(s) = final + (peak - final) * (1 + cos(pi * t)) / 2,
                t = min(1, (s - warmup) / max(1, num_steps - warmup))

The warmup reaches `peak` on the warmup-th update and never spends an update at lr 0.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

FROZEN = "frozen"
TRAINED = "trained"


def make_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate as a function of the update count, from the `train` sub-config."""
    peak = float(train.learning_rate)
    final = float(train.final_learning_rate)
    warmup = int(train.warmup_steps)
    num_steps = int(train.num_steps)
    kind = train.schedule

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        warm = peak * jnp.minimum(1.0, (s + 1.0) / max(warmup, 1)) if warmup > 0 else jnp.full_like(s, peak)
        if kind == "constant":
            after = jnp.full_like(s, peak)
        elif kind == "cosine":
            t = jnp.clip((s - warmup) / max(1, num_steps - warmup), 0.0, 1.0)
            after = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        else:
            raise ValueError(f"train.schedule: unknown schedule {kind!r}")
        return jnp.where(s < warmup, warm, after)

    return schedule


def make_optimizer(
    train: ml_collections.ConfigDict,
    *,
    frozen_mask: Any = None,
    decay_mask: Any = None,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; frozen params get an exactly-zero update.

    Args:
      train: the `train` sub-config (beta1, beta2, eps, weight_decay, grad_clip_norm, schedule).
      frozen_mask: pytree of bools like the params (True = never updated), or None.
      decay_mask: pytree of bools like the params (True = weight decay applies), or None (all).

    Clipping and Adam see only the trained params (the frozen ones are partitioned away with
    `optax.partition`, so they carry no optimizer state and their update is `set_to_zero`).
    Weight decay is decoupled (PyTorch AdamW: p -= lr * wd * p), masked by `decay_mask`.
    """
    schedule = make_schedule(train)
    parts = []
    if train.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(train.grad_clip_norm)))
    parts.append(
        optax.adamw(
            learning_rate=schedule,
            b1=float(train.beta1),
            b2=float(train.beta2),
            eps=float(train.eps),
            weight_decay=float(train.weight_decay),
            mask=decay_mask,
        )
    )
    inner = optax.chain(*parts)
    if frozen_mask is None:
        return inner
    labels = jax.tree.map(lambda frozen: FROZEN if frozen else TRAINED, frozen_mask)
    if FROZEN not in jax.tree.leaves(labels):
        return inner
    return optax.partition({TRAINED: inner, FROZEN: optax.set_to_zero()}, labels)


def trainable_global_norm(grads: Any, frozen_mask: Any = None) -> jax.Array:
    """Global L2 norm of the gradients of the trained (not frozen) params."""
    if frozen_mask is not None:
        grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen_mask)
    return optax.global_norm(grads)


def count_frozen(frozen_mask: Any, params: Any) -> int:
    """Number of scalar parameters marked frozen."""
    if frozen_mask is None:
        return 0
    return sum(int(p.size) for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen_mask)) if f)


Schedule = Callable[[Any], jax.Array]
