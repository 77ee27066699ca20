"""Dropless dispatch across devices: tokens travel to the devices that own their experts.

Runs inside `jax.shard_map` over the whole mesh. Tokens are sharded over the batch axes
(`data`, `fsdp`, `expert`); expert weights over `expert` (E / X experts per shard) and
optionally their FFN dimension over `tensor`. Per device:

  1. sort the local (token, slot) assignments by expert; the rows bound for expert shard s are
     then contiguous;
  2. scatter them into a send buffer `[X, n*k, d]` (row block s goes to shard s) and
     `all_to_all` it over the `expert` axis, with the local expert id of every row;
  3. the owner sorts what it received by local expert, runs the grouped matmuls
     (`ragged_dot`), sums the FFN-dim shards over `tensor`, and sends the rows back;
  4. the sender unsorts and combines with the gate weights.

XLA:CPU has no ragged all-to-all, so the buffers are padded to the worst case (every local
assignment bound for one shard): exact and dropless, at X times the activation memory of a
ragged exchange. Padding rows carry the id E/X, outside every group, so `ragged_dot` gives them
zeros and they cost no expert FLOPs on backends with a true grouped matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from rmoe_jax.model.dispatch import grouped_swiglu

BATCH_AXES = ("data", "fsdp", "expert")


def _local_dispatch(x, weights, indices, w1, w3, w2, *, num_experts: int, expert_shards: int):
    """Per-device body. x `[n, d]`, weights/indices `[n, k]`, w* hold E/X local experts."""
    num_tokens, top_k = indices.shape
    local_experts = num_experts // expert_shards
    flat_expert = indices.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    sorted_expert = flat_expert[order]
    sorted_x = jnp.take(x, order // top_k, axis=0)  # [n*k, d]
    shard = sorted_expert // local_experts
    shard_counts = jnp.bincount(shard, length=expert_shards)
    shard_start = jnp.cumsum(shard_counts) - shard_counts
    row_in_shard = jnp.arange(num_tokens * top_k) - shard_start[shard]

    rows = num_tokens * top_k
    send = jnp.zeros((expert_shards, rows, x.shape[-1]), x.dtype).at[shard, row_in_shard].set(sorted_x)
    send_ids = jnp.full((expert_shards, rows), local_experts, jnp.int32).at[shard, row_in_shard].set(
        sorted_expert % local_experts)
    received = jax.lax.all_to_all(send, "expert", 0, 0, tiled=False)
    received_ids = jax.lax.all_to_all(send_ids, "expert", 0, 0, tiled=False)

    flat_ids = received_ids.reshape(-1)
    owner_order = jnp.argsort(flat_ids, stable=True)
    group_sizes = jnp.bincount(flat_ids, length=local_experts + 1)[:local_experts].astype(jnp.int32)
    owner_in = jnp.take(received.reshape(-1, x.shape[-1]), owner_order, axis=0)
    owner_out = grouped_swiglu(owner_in, (w1, w3, w2), group_sizes)
    owner_out = jax.lax.psum(owner_out, "tensor")  # FFN-dim shards each hold a partial sum
    back = jnp.zeros_like(owner_out).at[owner_order].set(owner_out, unique_indices=True)
    returned = jax.lax.all_to_all(back.reshape(received.shape), "expert", 0, 0, tiled=False)

    sorted_out = returned[shard, row_in_shard]  # [n*k, d], in expert-sorted order
    out = jnp.zeros_like(sorted_out).at[order].set(sorted_out, unique_indices=True)
    return jnp.einsum("nkd,nk->nd", out.reshape(num_tokens, top_k, -1), weights.astype(out.dtype))


def dropless_expert_parallel(mesh: Mesh, x, weights, indices, experts, num_experts: int):
    """Dropless MoE over `mesh`. x `[N, d]` and weights/indices `[N, k]` sharded over the batch
    axes; experts (w1, w3 `[E, d, f]`, w2 `[E, f, d]`) over `expert` and `tensor`. -> `[N, d]`."""
    expert_shards = mesh.shape["expert"]
    batch = P(BATCH_AXES)
    up, down = P("expert", None, "tensor"), P("expert", "tensor", None)

    def body(x, weights, indices, w1, w3, w2):
        return _local_dispatch(x, weights, indices, w1, w3, w2, num_experts=num_experts,
                               expert_shards=expert_shards)

    return jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, batch, up, up, down),
                         out_specs=batch, check_vma=False)(x, weights, indices, *experts)
