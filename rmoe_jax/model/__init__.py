"""The MoE language model: build it from the model config, count its params.

The params' facts (axes, masks, groups, export names) are in `rmoe_jax.param_table`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rmoe_jax.config import validate_model
from rmoe_jax.param_table import decay_mask, frozen_mask, groups
from rmoe_jax.model.transformer import MoETransformer

__all__ = ["MoETransformer", "abstract_params", "build_model", "count_params", "decay_mask", "frozen_mask"]


def build_model(model_config: ml_collections.ConfigDict) -> MoETransformer:
    """Validate the model sub-config (all problems at once) and build the LM."""
    validate_model(model_config)
    return MoETransformer(ml_collections.FrozenConfigDict(model_config))


def count_params(model_config: ml_collections.ConfigDict) -> dict[str, int]:
    """Parameter counts without allocating anything.

    Returns total, active per token (top_k of num_experts routed experts), router (every
    router parameter: per-layer routers and the shared cell/projector), embedding, experts.
    """
    params = abstract_params(model_config)
    sizes: dict[str, int] = {}
    for group, leaf in zip(jax.tree.leaves(groups(params)), jax.tree.leaves(params)):
        sizes[group] = sizes.get(group, 0) + int(np.prod(leaf.shape))
    experts = sizes.get("experts", 0)
    moe = model_config.moe
    inactive = experts * (moe.num_experts - moe.top_k) // moe.num_experts
    total = sum(sizes.values())
    embedding = sizes.get("embedding", 0)
    return {
        "total": total,
        "active": total - inactive,
        "router": sizes.get("router", 0),
        "embedding": embedding,
        "experts": experts,
        "non_embedding": total - embedding,
    }


def abstract_params(model_config: ml_collections.ConfigDict):
    """The param tree of `model_config` as ShapeDtypeStructs (nothing allocated or compiled)."""
    model = build_model(model_config)
    # Everything inside the traced function: no concrete array is made (under an AOT mesh of
    # TPU topology devices there is no device to put one on).
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
