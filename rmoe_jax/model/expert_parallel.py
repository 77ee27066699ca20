"""Dispatch across devices: tokens travel to the devices that own their experts.

Runs inside `jax.shard_map` over the whole mesh. Tokens are sharded over the batch axes
(`data`, `fsdp`, `expert`); expert weights over `expert` (E / X experts per shard) and
optionally their FFN dimension over `tensor`. Per device, with n local tokens and k choices:

  1. sort the local (token, slot) assignments by expert; the rows bound for expert shard s are
     then contiguous;
  2. scatter them into a send buffer `[X, B, d]` (block s goes to shard s) and `all_to_all` it
     over the `expert` axis, with the local expert id of every row;
  3. the owner sorts what it received by local expert, runs the grouped matmuls, sums the
     FFN-dim shards over `tensor`, and sends the rows back;
  4. the sender unsorts and combines with the gate weights.

The block B (`exchange_block_rows`) is the exact worst case, n * min(k, E / X) rows (a token
sends at most min(k, E / X) of its k rows to one shard: its choices are distinct experts), or,
with `moe.exchange_factor` f > 0, f times the balanced share n * k / X (capped at the worst
case). Rows past a full block are dropped and counted (`exchange_dropped`); the train step
then keeps its old state and the loop re-runs the step with worst-case blocks
(`moe.exchange_overflow=rerun`, the default: dropless stays exact), or lets them drop
(`drop`). XLA:CPU has no ragged all-to-all, so the buffers are dense blocks; padding rows carry
the id E / X, outside every group, so the grouped matmul gives them zeros.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from rmoe_jax.model.dispatch import grouped_swiglu
from rmoe_jax.parallel import BATCH_AXES
EXCHANGE_OVERFLOW = ("rerun", "drop")


def exchange_block_rows(local_tokens: int, top_k: int, num_experts: int, expert_shards: int,
                        factor: float) -> int:
    """Rows per send block: the exact worst case n * min(k, E / X), or for `factor` > 0
    ceil(factor * n * k / X) rounded up to a multiple of 8, whichever is smaller."""
    worst = local_tokens * min(top_k, num_experts // expert_shards)
    if factor <= 0:
        return worst
    share = math.ceil(factor * local_tokens * top_k / expert_shards)
    return min(worst, -(-share // 8) * 8)


def _local_dispatch(x, weights, indices, w1, w3, w2, *, num_experts: int, expert_shards: int,
                    block: int, axes: tuple[str, ...]):
    """Per-device body. x `[n, d]`, weights/indices `[n, k]`, w* hold E/X local experts.
    Returns (y `[n, d]`, rows dropped over the whole mesh (int32 scalar))."""
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
    kept = row_in_shard < block  # rows past a full block overflow
    slot = jnp.where(kept, row_in_shard, block)  # out of range: dropped by the scatters

    send = jnp.zeros((expert_shards, block, x.shape[-1]), x.dtype).at[shard, slot].set(
        sorted_x, mode="drop")
    send_ids = jnp.full((expert_shards, block), local_experts, jnp.int32).at[shard, slot].set(
        sorted_expert % local_experts, mode="drop")
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

    sorted_out = jnp.where(kept[:, None], returned[shard, jnp.minimum(slot, block - 1)], 0)
    out = jnp.zeros_like(sorted_out).at[order].set(sorted_out, unique_indices=True)
    y = jnp.einsum("nkd,nk->nd", out.reshape(num_tokens, top_k, -1), weights.astype(out.dtype))
    # Every FFN-dim (tensor) shard sees the same rows: count them once, over the other axes.
    dropped = jax.lax.psum(jnp.sum(~kept).astype(jnp.int32), tuple(a for a in axes if a != "tensor"))
    return y, dropped


def expert_parallel_dispatch(mesh: Mesh, x, weights, indices, experts, num_experts: int,
                             exchange_factor: float = 0.0):
    """MoE over `mesh`. x `[N, d]` and weights/indices `[N, k]` sharded over the batch axes;
    experts (w1, w3 `[E, d, f]`, w2 `[E, f, d]`) over `expert` and `tensor`.

    Returns (y `[N, d]`, rows dropped for full exchange blocks over the whole mesh, int32 []);
    with `exchange_factor` 0 (worst-case blocks) nothing is ever dropped.
    """
    expert_shards = mesh.shape["expert"]
    batch_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    block = exchange_block_rows(x.shape[0] // batch_shards, indices.shape[1], num_experts,
                                expert_shards, exchange_factor)
    batch = P(BATCH_AXES)
    up, down = P("expert", None, "tensor"), P("expert", "tensor", None)

    def body(x, weights, indices, w1, w3, w2):
        return _local_dispatch(x, weights, indices, w1, w3, w2, num_experts=num_experts,
                               expert_shards=expert_shards, block=block, axes=mesh.axis_names)

    return jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, batch, up, up, down),
                         out_specs=(batch, P()), check_vma=False)(x, weights, indices, *experts)


def dropless_expert_parallel(mesh: Mesh, x, weights, indices, experts, num_experts: int):
    """Dropless MoE over `mesh` with worst-case exchange blocks: y `[N, d]`."""
    return expert_parallel_dispatch(mesh, x, weights, indices, experts, num_experts, 0.0)[0]
