"""KV-cache decoding with the MoE LM: an empty cache, and one call that appends tokens to it.

    model = decode_model(model_config)                  # MoETransformer(..., decode=True)
    cache = init_cache(model, batch=2, cache_len=64)    # zeros; nothing is compiled
    logits, cache = extend(model, params, cache, prompt)      # [2, P] tokens at 0..P-1
    logits, cache = extend(model, params, cache, next_token)  # [2, 1] at position P, ...

`extend` is pure (jit it; the cache keeps one shape, so a one-token step compiles once). The
cache holds every layer's keys and values `[L, batch, cache_len, kv_heads, head_dim]` plus the
write index; the RMoE router recurrence runs over the layers of each token and needs no state
across steps. The caller keeps the total length within `cache_len` (`cache_index` says how
far it is filled); writing past it would be clamped by XLA, so `extend` callers check it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from rmoe_jax.model import build_model
from rmoe_jax.model.transformer import MoETransformer


def decode_model(model_config: ml_collections.ConfigDict) -> MoETransformer:
    """The LM of `model_config` in KV-cache mode (same params as `build_model`'s)."""
    model = build_model(model_config)  # validates
    return MoETransformer(model.config, decode=True)


def init_cache(model: MoETransformer, batch: int, cache_len: int):
    """An empty cache for `batch` rows of up to `cache_len` tokens (no compilation)."""
    if not model.decode:
        raise ValueError("init_cache needs a decode model (decode_model(config))")
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((batch, cache_len), jnp.int32)))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cache_index(cache) -> jax.Array:
    """How many positions of the cache are filled (the same in every layer)."""
    return cache["layers"]["attention"]["cache_index"][0]


def cache_length(cache) -> int:
    return int(cache["layers"]["attention"]["cached_key"].shape[2])


def extend(model: MoETransformer, params, cache, tokens: jax.Array):
    """Run `tokens` `[batch, seq]` at positions `index .. index+seq-1` of the cache.

    Returns (logits `[batch, seq, vocab]` float32, the updated cache).
    """
    (logits, _), mutated = model.apply({"params": params, "cache": cache}, tokens,
                                       deterministic=True, mutable=["cache"])
    return logits, mutated["cache"]
