"""The Llama-style MoE decoder: attention, one decoder layer, the `nn.scan`ned stack, the LM.

Layer i: h = x + Attn(RMSNorm(x)); y = h + MoE(RMSNorm(h), router_state).
The layers are one `nn.scan` whose carry is `(hidden, router_state)`; per-layer params are
stacked on a leading `layers` axis. Parameters shared by every layer's router (the RMoE cell,
an S-proj projector) are created once outside the scan and broadcast into it.

Decoding (`MoETransformer(config, decode=True)`): every attention layer keeps a KV cache in the
flax `cache` collection (`cached_key`/`cached_value` `[batch, cache_len, kv_heads, head_dim]`,
stacked on the `layers` axis like the params, and a `cache_index`). `init` with inputs of shape
`[batch, cache_len]` creates an empty cache of that length; each later `apply(...,
mutable=['cache'])` appends its `seq` tokens at the cache index (positions continue from it)
and attends to everything cached so far. The router recurrence runs over layers within each
token, so it needs no state across decode steps. See `rmoe_jax/model/decode.py`.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rmoe_jax.model import gating
from rmoe_jax.model.attention_core import SPLASH_RESIDUALS, causal_attention
from rmoe_jax.model.moe import MoEBlock
from rmoe_jax.model.routers import ROUTER_RESIDUALS, SharedRouterParams, router_state_size
from rmoe_jax.parallel import constrain

ACTIVATION_AXES = ("batch", None, None)  # [batch, seq, d_model]

_names = jax.checkpoint_policies.save_only_these_names
_either = jax.checkpoint_policies.save_from_both_policies
# Every policy keeps the recurrent router's x' and state (ROUTER_RESIDUALS: 2 x [tokens, p]
# float32, ~20 MB per layer at 20,480 tokens and p = 128); redoing the projector and the cell
# instead moves ~5x that, and the cell on TPU is a Pallas call, which no dot policy saves.
# Stateless routers have no such values, so for them each policy is what its name says.
REMAT_POLICIES = {
    "full": _names(*ROUTER_RESIDUALS),  # recompute the whole layer but the router state
    # Matmul outputs; on TPU also the splash kernel's output and logsumexp (a Pallas call is
    # not a dot, so without its name the backward would rerun the attention forward).
    "dots": _either(jax.checkpoint_policies.checkpoint_dots,
                    _names(SPLASH_RESIDUALS, *ROUTER_RESIDUALS)),
    "dots_no_batch": _either(jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                             _names(*ROUTER_RESIDUALS)),
    "save_moe": _names("moe_expert_out", "router_logits", *ROUTER_RESIDUALS),
    # save_moe plus the splash residuals (TPU): recompute everything but attention and experts.
    "save_moe_attention": _names("moe_expert_out", "router_logits", SPLASH_RESIDUALS,
                                 *ROUTER_RESIDUALS),
}


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; param `scale` `[d]` starts at ones."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    """`[..., head_dim]` -> float32 `concat(-x[..., half:], x[..., :half])`."""
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def _rotate_half_matmul(x: jax.Array) -> jax.Array:
    """`_rotate_half` as a product with the signed permutation matrix (exact: each output is
    one input times +-1). On TPU the split and concatenate of a 64-wide head dim (half a
    128-lane tile) make XLA write float32 copies of q and k in every pass; as a matmul the
    rotation fuses into one pass: 20.7 against 24.5 GB per layer at the 0.91B shape on a v5p
    chip (forward and backward, AOT)."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    rotation = np.zeros((head_dim, head_dim), np.float32)
    rotation[np.arange(half) + half, np.arange(half)] = -1.0  # out[j < half] = -x[j + half]
    rotation[np.arange(half), np.arange(half) + half] = 1.0  # out[j >= half] = x[j - half]
    # HIGHEST keeps float32 inputs exact (TPU's default rounds matmul inputs to bfloat16).
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.einsum("...d,de->...e", x, jnp.asarray(rotation, x.dtype),
                      precision=precision, preferred_element_type=jnp.float32)


def _rope(x: jax.Array, angles: jax.Array, rotate_half: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """x * cos + rotate_half(x) * sin in float32, back in x's dtype. x `[batch, seq, heads,
    head_dim]`, angles `[batch, seq, 1, head_dim]`."""
    rotated = rotate_half(x)
    return (x.astype(jnp.float32) * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _rope_head_major(x: jax.Array, angles: jax.Array) -> jax.Array:
    """`_rope` computed on `[batch, heads, seq, head_dim]`, the layout the splash kernel reads
    (`attention_core._local_splash` transposes q and k to it; the transposes cancel). In the
    token-major form XLA:TPU wrote float32 copies of q and k to change their layout, four per
    layer and pass; head-major it writes none: the 0.91B attention block's forward and
    backward on a v6e chip moves 4.60 against 5.51 GB (AOT, 5 x 4096 tokens)."""
    heads_first = (0, 2, 1, 3)
    return _rope(x.transpose(heads_first), angles.transpose(heads_first),
                 _rotate_half_matmul).transpose(heads_first)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """RoPE in HF Llama's `rotate_half` layout (pairs dim j with j + head_dim/2), in float32.

    Args: x `[batch, seq, heads, head_dim]`, positions `[batch, seq]` int.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, s, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jax.lax.platform_dependent(x, angles, tpu=_rope_head_major,
                                      default=functools.partial(_rope, rotate_half=_rotate_half))


class Attention(nn.Module):
    """Causal multi-head attention with RoPE and grouped-query heads (no biases)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02
    decode: bool = False  # KV-cache mode (see the module docstring)
    chunk: int = 0  # query rows per chunk (`causal_attention`); 0 = one fused attention

    @nn.compact
    def __call__(self, x, positions):
        """x `[batch, seq, d]`, positions `[batch, seq]` -> `[batch, seq, d]`.

        With `decode`, `positions` is ignored: the tokens sit at `cache_index + arange(seq)`.
        """

        def proj(heads, name):
            return nn.DenseGeneral((heads, self.head_dim), use_bias=False, dtype=self.dtype,
                                   param_dtype=self.param_dtype,
                                   kernel_init=nn.initializers.normal(self.init_std), name=name)

        if self.decode:
            return self._decode(x, proj)
        query = rotary_embedding(proj(self.num_heads, "query")(x), positions, self.rope_theta)
        key = rotary_embedding(proj(self.num_kv_heads, "key")(x), positions, self.rope_theta)
        value = proj(self.num_kv_heads, "value")(x)
        attended = causal_attention(query, key, value, self.chunk)
        out = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernel_init=nn.initializers.normal(self.init_std), name="out")
        return out(attended)

    def _decode(self, x, proj):
        """Append this call's keys/values to the cache, attend to the whole cache (causally)."""
        batch, seq, d_model = x.shape
        initialized = self.has_variable("cache", "cached_key")
        kv_shape = (batch, seq, self.num_kv_heads, self.head_dim)
        # Created by `init`: its input length is the cache length.
        cached_key = self.variable("cache", "cached_key", jnp.zeros, kv_shape, self.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, kv_shape, self.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        index = cache_index.value if initialized else jnp.zeros((), jnp.int32)
        positions = jnp.broadcast_to(index + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        query = rotary_embedding(proj(self.num_heads, "query")(x), positions, self.rope_theta)
        key = rotary_embedding(proj(self.num_kv_heads, "key")(x), positions, self.rope_theta)
        value = proj(self.num_kv_heads, "value")(x)
        if initialized:
            start = (0, index, 0, 0)
            cached_key.value = jax.lax.dynamic_update_slice(
                cached_key.value, key.astype(cached_key.value.dtype), start)
            cached_value.value = jax.lax.dynamic_update_slice(
                cached_value.value, value.astype(cached_value.value.dtype), start)
            cache_index.value = index + seq
            key, value = cached_key.value, cached_value.value
            # Query at position index + t sees cache slots 0 .. index + t (later ones are empty).
            mask = jnp.arange(key.shape[1])[None, :] <= positions[0][:, None]  # [seq, cache_len]
            attended = jax.nn.dot_product_attention(query, key.astype(query.dtype),
                                                    value.astype(query.dtype),
                                                    mask=mask[None, None])
        else:
            attended = causal_attention(query, key, value, self.chunk)
        out = nn.DenseGeneral(d_model, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernel_init=nn.initializers.normal(self.init_std), name="out")
        return out(attended)


class DecoderLayer(nn.Module):
    """One pre-norm layer. Scanned: carry `(hidden, router_state)`, output this layer's aux."""

    config: ml_collections.FrozenConfigDict  # the model sub-config
    decode: bool = False

    @nn.compact
    def __call__(self, carry, shared, positions, deterministic):
        cfg = self.config
        hidden, router_state = carry
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name=name)  # noqa: E731
        head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
        attention = Attention(cfg.num_heads, cfg.num_kv_heads, head_dim, cfg.rope_theta, dtype,
                              param_dtype, cfg.init_std, self.decode,
                              int(cfg.attention_chunk), name="attention")
        dropout = nn.Dropout(cfg.dropout_rate)

        hidden = constrain(hidden, ACTIVATION_AXES)
        attended = attention(norm("attention_norm")(hidden), positions)
        hidden = hidden + dropout(attended, deterministic=deterministic)
        moe = MoEBlock(cfg.moe, cfg.router, dtype, param_dtype, cfg.init_std, name="moe")
        moe_out, router_state, layer_aux = moe(norm("moe_norm")(hidden), router_state, shared)
        hidden = hidden + dropout(moe_out, deterministic=deterministic)
        return (constrain(hidden, ACTIVATION_AXES), router_state), layer_aux


def _layer_stack(config: ml_collections.FrozenConfigDict, decode: bool = False):
    layer = DecoderLayer
    unroll = int(config.get("scan_unroll", 1))
    if config.remat_policy != "none" and not decode:  # decoding computes no gradients
        # Inside a layer loop the forward and the backward are separate loops, so XLA cannot
        # merge a layer's recomputation with its forward; with every layer unrolled they are
        # one program, and without the barriers prevent_cse adds XLA does merge them (on TPU,
        # a 1-layer 0.91B cost variant counted 17.24 TFLOP against the looped step's 17.45).
        layer = nn.remat(layer, policy=REMAT_POLICIES[config.remat_policy],
                         prevent_cse=unroll >= config.num_layers, static_argnums=(4,))
    variable_axes = {"params": 0, "intermediates": 0}
    if decode:
        variable_axes["cache"] = 0  # one KV cache per layer, stacked like the params
    return nn.scan(
        layer,
        variable_axes=variable_axes,
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=config.num_layers,
        unroll=unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def aggregate_aux(layer_aux: dict, moe: ml_collections.FrozenConfigDict) -> dict:
    """Combine per-layer outputs (leading axis L) into the losses and stats the trainer logs.

    balance_aggregation: 'sum' over layers (the enwik8 code), 'mean', or 'concat' (the
    official HF port: f and P pooled over all layers' tokens, then one loss).
    """
    per_layer = gating.load_balance_loss(layer_aux["fractions"], layer_aux["mean_probs"])
    if moe.balance_aggregation == "sum":
        balance = jnp.sum(per_layer)
    elif moe.balance_aggregation == "mean":
        balance = jnp.mean(per_layer)
    else:
        balance = gating.load_balance_loss(jnp.mean(layer_aux["fractions"], axis=0),
                                           jnp.mean(layer_aux["mean_probs"], axis=0))
    z = jnp.mean(layer_aux["z_loss"])
    stats = {
        "expert_load": layer_aux["fractions"],
        "balance_loss_per_layer": per_layer,
        **{name: layer_aux[name] for name in
           ("gate_entropy", "top1_top2_ratio", "topk_weight_sum", "dropped_fraction",
            "exchange_dropped", "z_loss")},
    }
    return {
        "aux_loss": moe.balance_coef * balance + moe.z_loss_coef * z,
        "balance_loss": balance,
        "z_loss": z,
        "stats": stats,
    }


class MoETransformer(nn.Module):
    """Decoder-only MoE LM.

    __call__(inputs `[batch, seq]` int32, deterministic) ->
      (logits `[batch, seq, vocab]` float32, aux) with aux = {'aux_loss' (coefficient-weighted,
      add to the LM loss), 'balance_loss', 'z_loss', 'stats' (per-layer arrays `[L, ...]`)}.

    With `decode=True` the attention layers read and extend a KV cache (module docstring);
    call `apply(..., mutable=['cache'])`. `positions` is then ignored.
    """

    config: ml_collections.FrozenConfigDict  # the model sub-config
    decode: bool = False

    @nn.compact
    def __call__(self, inputs, deterministic: bool = True, positions=None):
        cfg = self.config
        batch, seq = inputs.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                         embedding_init=nn.initializers.normal(cfg.init_std), name="embed")
        hidden = nn.Dropout(cfg.dropout_rate)(embed(inputs), deterministic=deterministic)
        hidden = constrain(hidden, ACTIVATION_AXES)

        shared = {}
        if cfg.router.name == "recurrent":
            shared = SharedRouterParams(cfg.router, cfg.d_model, cfg.init_std, name="router_shared")()
        router_state = jnp.zeros((batch * seq, router_state_size(cfg.router)), jnp.float32)

        stack = _layer_stack(cfg, self.decode)(cfg, self.decode, name="layers")
        (hidden, _), layer_aux = stack((hidden, router_state), shared, positions, deterministic)

        hidden = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="final_norm")(hidden)
        if cfg.tie_embeddings:
            logits = embed.attend(hidden)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=nn.initializers.normal(cfg.init_std), name="lm_head")(hidden)
        return logits.astype(jnp.float32), aggregate_aux(layer_aux, cfg.moe)
