"""Causal softmax attention over whole sequences: the Pallas splash kernel on TPU, elsewhere
XLA's fused attention or a query-chunked einsum version.

`jax.nn.dot_product_attention(is_causal=True)` (XLA) materializes the full `[seq, seq]` score
matrix per head and masks half of it. Cutting the queries into chunks that each read only the
keys up to their own last position skips most of the masked half: with n chunks the work is
(n + 1) / 2n of the full matrix (0.56 at n = 8), and so are the probabilities held for the
backward pass. On XLA:CPU this is ~2x faster for the enwik8-medium shape (see BENCHMARKS.md).

On TPU, where the shapes allow it (`splash_supported`), `causal_attention` lowers to the splash
attention kernel JAX ships (`jax.experimental.pallas.ops.tpu.splash_attention`): a flash
attention that keeps no `[seq, seq]` matrix in HBM and skips the key blocks above the
diagonal, with its own backward kernels. The choice is `jax.lax.platform_dependent`, as for
megablox `gmm` (`dispatch.grouped_matmul`), so CPU and GPU run exactly the paths they did.
A Pallas kernel cannot be partitioned by GSPMD: under a mesh it runs inside `shard_map`, each
device on its own sequences (batch axes) and, if they divide, heads (the `heads` rule's axis).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Names the splash kernel gives its residuals (output and logsumexp), so that a remat policy
# can save them: jax.checkpoint_policies.save_only_these_names(SPLASH_RESIDUALS, ...).
SPLASH_RESIDUALS = "splash_residuals"
SPLASH_MAX_BLOCK = 512  # query / key rows per kernel block (MaxText's default, min(512, seq))
SPLASH_MIN_BLOCK = 128  # the kernel's blocks are multiples of the 128 TPU lanes


def splash_block(seq: int) -> int:
    """Rows per splash block for `seq`: the largest of 512, 256, 128 that divides it; 0 when
    none does (the kernel needs seq to be a multiple of its block, the block of 128 lanes)."""
    block = SPLASH_MAX_BLOCK
    while block >= SPLASH_MIN_BLOCK:
        if seq % block == 0:
            return block
        block //= 2
    return 0


def splash_supported(query_shape: tuple, key_shape: tuple) -> bool:
    """Whether the splash kernel takes these `[batch, seq, heads, head_dim]` shapes (static)."""
    _, seq, heads, head_dim = query_shape
    _, kv_seq, kv_heads, kv_head_dim = key_shape
    return (seq == kv_seq and splash_block(seq) > 0 and heads % kv_heads == 0
            and head_dim == kv_head_dim)


def _xla_attention(query: jax.Array, key: jax.Array, value: jax.Array, chunk: int) -> jax.Array:
    """The non-TPU paths: one `jax.nn.dot_product_attention`, or query chunks of `chunk` rows."""
    batch, seq, heads, head_dim = query.shape
    if chunk <= 0 or chunk >= seq:
        return jax.nn.dot_product_attention(query, key, value, is_causal=True)
    kv_heads = key.shape[2]
    groups = heads // kv_heads
    # [batch, kv_heads, groups, seq, head_dim]: one transpose here instead of one per chunk.
    scaled = (query * jnp.asarray(head_dim ** -0.5, query.dtype)).reshape(
        batch, seq, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    key_t, value_t = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    chunks = []
    for start in range(0, seq, chunk):
        end = min(seq, start + chunk)
        scores = jnp.einsum("bkgth,bksh->bkgts", scaled[:, :, :, start:end], key_t[:, :, :end],
                            preferred_element_type=jnp.float32)
        visible = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]  # [rows, end]
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        chunks.append(jnp.einsum("bkgts,bksh->bkgth", probs, value_t[:, :, :end]))
    attended = jnp.concatenate(chunks, axis=3)  # [batch, kv_heads, groups, seq, head_dim]
    return attended.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, head_dim)


def _splash_kernel(heads: int, kv_heads: int, seq: int, interpret: bool):
    """One sequence's kernel: q `[heads, seq, d]`, k/v `[kv_heads, seq, d]` (MQA: `[seq, d]`)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = splash_block(seq)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq))] * heads)
    # Grouped-query heads natively: query head h reads kv head h // (heads / kv_heads).
    make = splash.make_splash_mqa if kv_heads == 1 else splash.make_splash_mha
    return make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                residual_checkpoint_name=SPLASH_RESIDUALS, interpret=interpret)


def _local_splash(query: jax.Array, key: jax.Array, value: jax.Array, *, interpret: bool) -> jax.Array:
    """Splash over local `[batch, seq, heads, head_dim]` arrays (one device's shard)."""
    _, seq, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    kernel = _splash_kernel(heads, kv_heads, seq, interpret)
    # The kernel does not scale the scores: scale q as the other paths do, in its dtype.
    query = (query * jnp.asarray(head_dim ** -0.5, query.dtype)).transpose(0, 2, 1, 3)
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [batch, heads, seq, d]
    if kv_heads == 1:
        key, value = key[:, 0], value[:, 0]
    return jax.vmap(kernel)(query, key, value).transpose(0, 2, 1, 3)


def _mesh_specs(mesh, batch: int, heads: int, kv_heads: int):
    """Mesh axes of the batch and the heads for the shard_map: the `batch` / `heads` rules'
    axes (defaults: BATCH_AXES, `tensor`); heads stay whole unless both head counts divide."""
    from rmoe_jax.parallel import BATCH_AXES, rule_mesh_axes

    batch_axes = rule_mesh_axes(mesh, "batch", BATCH_AXES)
    head_axes = rule_mesh_axes(mesh, "heads", ("tensor",))
    if head_axes != rule_mesh_axes(mesh, "kv_heads", ("tensor",)) or set(head_axes) & set(batch_axes):
        head_axes = ()
    head_shards = math.prod(mesh.shape[a] for a in head_axes)
    if heads % head_shards or kv_heads % head_shards:
        head_axes = ()
    if batch % math.prod(mesh.shape[a] for a in batch_axes):
        return None
    return batch_axes, head_axes


def _batch_divides(batch: int) -> bool:
    """Whether the shard_map can split `batch` over the active mesh's batch axes (or no mesh)."""
    from rmoe_jax.parallel import active_mesh

    mesh = active_mesh()
    return mesh is None or _mesh_specs(mesh, batch, 1, 1) is not None


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
    """Causal attention by the splash kernel; shapes as `causal_attention`, which must pass
    `splash_supported`. Under a mesh (`jax.set_mesh`) it runs in a shard_map over the batch
    axes (and heads where they divide); outside one, on the whole arrays. `interpret=True` runs
    the kernel's math with the Pallas interpreter (any platform; for tests)."""
    from rmoe_jax.parallel import active_mesh

    local = functools.partial(_local_splash, interpret=interpret)
    mesh = active_mesh()
    if mesh is None:
        return local(query, key, value)
    specs = _mesh_specs(mesh, query.shape[0], query.shape[2], key.shape[2])
    if specs is None:
        raise ValueError(f"splash attention: batch {query.shape[0]} does not divide over the "
                         f"mesh's batch shards {dict(mesh.shape)}")
    batch_axes, head_axes = specs
    spec = jax.sharding.PartitionSpec(batch_axes or None, None, head_axes or None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(query, key, value)


def causal_attention(query: jax.Array, key: jax.Array, value: jax.Array, chunk: int) -> jax.Array:
    """Causal attention with grouped-query heads.

    Args:
      query: `[batch, seq, heads, head_dim]`.
      key, value: `[batch, seq, kv_heads, head_dim]`; `heads` is a multiple of `kv_heads`.
      chunk: query rows per chunk; 0 (or >= seq) is one `jax.nn.dot_product_attention` call.
        Not used on TPU where splash takes the shapes (`splash_supported`) and, under a mesh,
        the batch divides over the batch shards; there the splash kernel runs instead.
    Returns: `[batch, seq, heads, head_dim]` in the query's dtype. Scores and the softmax are
    float32 whatever the inputs' dtype.
    """
    fallback = functools.partial(_xla_attention, chunk=chunk)
    if not splash_supported(query.shape, key.shape) or not _batch_divides(query.shape[0]):
        return fallback(query, key, value)
    return jax.lax.platform_dependent(query, key, value, tpu=splash_attention, default=fallback)
