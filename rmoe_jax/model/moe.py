"""The MoE FFN block: router -> float32 gating -> dispatch to SwiGLU experts -> combine.

Dispatch strategies (`moe.dispatch`: capacity | dropless) live in `dispatch.py` (one device)
and `expert_parallel.py` (experts sharded over a mesh).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from rmoe_jax.model import gating
from rmoe_jax.model.dispatch import ExpertWeights, capacity_dispatch, dropless_dispatch, expert_capacity
from rmoe_jax.model.expert_parallel import expert_parallel_dispatch
from rmoe_jax.model.routers import build_router
from rmoe_jax.parallel import active_mesh


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
            exchange_dropped = jnp.zeros((), jnp.float32)
        else:
            mesh = active_mesh()
            if mesh is None:
                y = dropless_dispatch(tokens, weights, indices, experts)
                exchange_dropped = jnp.zeros((), jnp.float32)
            else:
                y, dropped_rows = expert_parallel_dispatch(
                    mesh, tokens, weights, indices, experts, cfg.num_experts,
                    float(cfg.get("exchange_factor", 0.0)))
                exchange_dropped = dropped_rows.astype(jnp.float32)
            y = y.reshape(batch, seq, d_model)
            # Rows past a full exchange block (bounded blocks only; see expert_parallel.py).
            dropped_fraction = exchange_dropped / (batch * seq * cfg.top_k)

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
            "exchange_dropped": exchange_dropped,  # rows, over the whole batch
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
