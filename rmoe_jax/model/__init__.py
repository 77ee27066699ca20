"""The MoE language model: build it from the model config, mask its params, count them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rmoe_jax.config import validate_model
from rmoe_jax.model.routers import FROZEN_PREFIX
from rmoe_jax.model.transformer import MoETransformer

__all__ = ["MoETransformer", "build_model", "count_params", "decay_mask", "frozen_mask"]


def build_model(model_config: ml_collections.ConfigDict) -> MoETransformer:
    """Validate the model sub-config (all problems at once) and build the LM."""
    validate_model(model_config)
    return MoETransformer(ml_collections.FrozenConfigDict(model_config))


def _path_names(path) -> list[str]:
    return [str(getattr(entry, "key", entry)) for entry in path]


def frozen_mask(params) -> object:
    """Pytree of bools, True where a param must never be updated (e.g. the random router)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(name.startswith(FROZEN_PREFIX) for name in _path_names(path)), params)


def decay_mask(params) -> object:
    """Pytree of bools, True where weight decay applies: not norm scales, biases or temperatures."""

    def decays(path, _):
        leaf = _path_names(path)[-1]
        return not (leaf == "scale" or "bias" in leaf or leaf == "logit_scale")

    return jax.tree_util.tree_map_with_path(decays, params)


def _size(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def count_params(model_config: ml_collections.ConfigDict) -> dict[str, int]:
    """Parameter counts without allocating anything.

    Returns total, active per token (top_k of num_experts routed experts), router (every
    router parameter: per-layer routers and the shared cell/projector), embedding, experts.
    """
    model = build_model(model_config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
    layers = params["layers"]
    experts = _size({name: layers["moe"][name] for name in ("w1", "w2", "w3")})
    moe = model_config.moe
    inactive = experts * (moe.num_experts - moe.top_k) // moe.num_experts
    router = _size(layers["moe"]["router"]) + _size(params.get("router_shared", {}))
    embedding = _size(params["embed"]) + _size(params.get("lm_head", {}))
    total = _size(params)
    return {
        "total": total,
        "active": total - inactive,
        "router": router,
        "embedding": embedding,
        "experts": experts,
        "non_embedding": total - embedding,
    }
