"""The MoE FFN block: router -> float32 gating -> dispatch to SwiGLU experts -> combine.

Experts are stacked arrays (`w1`, `w3`: `[E, d, f]`, `w2`: `[E, f, d]`); no per-expert loop.
Two interchangeable dispatch strategies (`moe.dispatch`):
  capacity  GShard/Switch one-hot dispatch/combine einsums; each sequence is a group with
            capacity C = ceil(k * seq * capacity_factor / E) slots per expert; slots are filled
            top-1 choices first, then top-2, ... in token order; the rest are dropped.
  dropless  sort the N*k (token, expert) assignments by expert, grouped matmul with
            `jax.lax.ragged_dot`, unsort. Nothing is dropped.
With a capacity large enough to drop nothing both give the same outputs and gradients.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from rmoe_jax.model import gating
from rmoe_jax.model.routers import build_router

ExpertWeights = tuple[jax.Array, jax.Array, jax.Array]  # w1 [E,d,f], w3 [E,d,f], w2 [E,f,d]


def expert_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert per group of `group_size` tokens."""
    return max(1, math.ceil(top_k * group_size * capacity_factor / num_experts))


def capacity_dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array,
                      experts: ExpertWeights, capacity: int) -> tuple[jax.Array, jax.Array]:
    """One-hot dispatch/combine with a fixed capacity per expert and group.

    Args: x `[G, S, d]` (G groups of S tokens), weights/indices `[G, S, k]`.
    Returns: y `[G, S, d]`, kept `[G, S, k]` bool (False = dropped for lack of capacity).
    """
    w1, w3, w2 = experts
    num_groups, group_size, top_k = indices.shape
    num_experts = w1.shape[0]
    expert_mask = jax.nn.one_hot(indices, num_experts, dtype=jnp.int32)  # [G,S,k,E]
    # Slot-major order: every token's first choice is served before any second choice.
    slot_major = expert_mask.transpose(0, 2, 1, 3).reshape(num_groups, top_k * group_size, -1)
    position = (jnp.cumsum(slot_major, axis=1) - 1) * slot_major
    position = position.reshape(num_groups, top_k, group_size, -1).transpose(0, 2, 1, 3).sum(-1)
    kept = position < capacity  # [G,S,k]
    slot = jax.nn.one_hot(position, capacity, dtype=x.dtype) * kept[..., None].astype(x.dtype)
    mask = expert_mask.astype(x.dtype)
    dispatch = jnp.einsum("gske,gskc->gsec", mask, slot)
    combine = jnp.einsum("gske,gskc,gsk->gsec", mask, slot, weights.astype(x.dtype))
    expert_in = jnp.einsum("gsec,gsd->egcd", dispatch, x)
    expert_in = expert_in.reshape(num_experts, num_groups * capacity, -1)
    hidden = nn.silu(jnp.einsum("end,edf->enf", expert_in, w1)) * jnp.einsum(
        "end,edf->enf", expert_in, w3)
    expert_out = jnp.einsum("enf,efd->end", hidden, w2)
    expert_out = checkpoint_name(expert_out, "moe_expert_out")
    expert_out = expert_out.reshape(num_experts, num_groups, capacity, -1)
    return jnp.einsum("gsec,egcd->gsd", combine, expert_out), kept


def dropless_dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array,
                      experts: ExpertWeights) -> jax.Array:
    """Sort by expert, grouped matmuls with `ragged_dot`, unsort.

    Args: x `[N, d]`, weights/indices `[N, k]`. Returns y `[N, d]`.
    """
    w1, w3, w2 = experts
    num_tokens, top_k = indices.shape
    num_experts = w1.shape[0]
    flat_expert = indices.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    sorted_x = jnp.take(x, order // top_k, axis=0)  # [N*k, d]
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
    hidden = nn.silu(jax.lax.ragged_dot(sorted_x, w1, group_sizes)) * jax.lax.ragged_dot(
        sorted_x, w3, group_sizes)
    sorted_out = jax.lax.ragged_dot(hidden, w2, group_sizes)
    sorted_out = checkpoint_name(sorted_out, "moe_expert_out")
    out = jnp.zeros_like(sorted_out).at[order].set(sorted_out, unique_indices=True)
    out = out.reshape(num_tokens, top_k, -1)
    return jnp.einsum("nkd,nk->nd", out, weights.astype(out.dtype))


class SwiGLU(nn.Module):
    """A dense SwiGLU FFN w2(silu(w1 x) * w3 x): the shared (always-on) expert."""

    hidden: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x):
        def proj(features, name):
            return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=nn.initializers.normal(self.init_std), name=name)

        return proj(x.shape[-1], "w2")(nn.silu(proj(self.hidden, "w1")(x)) * proj(self.hidden, "w3")(x))


class MoEBlock(nn.Module):
    """Router + gating + experts for one layer.

    __call__(x `[B, S, d]`, router_state `[B*S, state]`, shared) ->
      (y `[B, S, d]`, new_router_state, layer_aux) where layer_aux holds this layer's
      f `[E]`, P `[E]`, z-loss, routing statistics and the dropped fraction.
    """

    moe: ml_collections.FrozenConfigDict
    router: ml_collections.FrozenConfigDict
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x, router_state, shared):
        cfg = self.moe
        batch, seq, d_model = x.shape
        tokens = x.reshape(batch * seq, d_model)
        self.sow("intermediates", "moe_input", tokens)
        logits, new_state = build_router(self.router, cfg.num_experts, self.init_std)(
            tokens, router_state, shared)
        logits = checkpoint_name(logits, "router_logits")
        probs, weights, indices = gating.top_k_gating(logits, cfg.top_k, cfg.renormalize)
        self.sow("intermediates", "router_probs", probs)
        self.sow("intermediates", "router_logits", logits)

        experts = self._expert_weights(d_model)
        if cfg.dispatch == "capacity":
            capacity = expert_capacity(seq, cfg.num_experts, cfg.top_k, cfg.capacity_factor)
            y, kept = capacity_dispatch(x, weights.reshape(batch, seq, -1),
                                        indices.reshape(batch, seq, -1), experts, capacity)
            dropped_fraction = 1.0 - jnp.mean(kept.astype(jnp.float32))
        else:
            y = dropless_dispatch(tokens, weights, indices, experts).reshape(batch, seq, d_model)
            dropped_fraction = jnp.zeros((), jnp.float32)

        if cfg.shared_expert:
            shared_hidden = cfg.shared_expert_hidden or cfg.expert_hidden
            shared_out = SwiGLU(shared_hidden, self.dtype, self.param_dtype, self.init_std,
                                name="shared_expert")(x)
            y = cfg.routed_weight * y + cfg.shared_weight * shared_out

        layer_aux = {
            "fractions": gating.expert_fractions(indices, cfg.num_experts),
            "mean_probs": jnp.mean(probs, axis=0),
            "z_loss": gating.z_loss(logits),
            "dropped_fraction": dropped_fraction,
            **gating.routing_stats(probs, cfg.top_k),
        }
        return y.astype(x.dtype), new_state, layer_aux

    def _expert_weights(self, d_model: int) -> ExpertWeights:
        cfg = self.moe
        init = nn.initializers.normal(self.init_std)
        up_shape = (cfg.num_experts, d_model, cfg.expert_hidden)
        w1 = self.param("w1", init, up_shape, self.param_dtype)
        w3 = self.param("w3", init, up_shape, self.param_dtype)
        w2 = self.param("w2", init, (cfg.num_experts, cfg.expert_hidden, d_model), self.param_dtype)
        return w1.astype(self.dtype), w3.astype(self.dtype), w2.astype(self.dtype)
