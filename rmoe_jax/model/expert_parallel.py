"""Dispatch across devices: tokens travel to the devices that own their experts.

Runs inside `jax.shard_map` over the whole mesh. Tokens are sharded over the batch axes
(`data`, `fsdp`, `expert`); expert weights over `expert` (E / X experts per shard) and
optionally their FFN dimension over `tensor`. Per device, with n local tokens and k choices:

  1. sort the local (token, slot) assignments by expert; the rows bound for expert shard s are
     then one contiguous run of the sorted rows;
  2. send each run, at most B rows of it, to its shard with one ragged all-to-all (with the
     local expert id of every row); the owner receives into a buffer of X * B rows, sender
     j's rows after those of senders 0..j-1;
  3. the owner sorts what it received by local expert, runs the grouped matmuls, sums the
     FFN-dim shards over `tensor`, and sends every row back to where it came from;
  4. the sender unsorts and combines with the gate weights.

Offsets on the receivers come from one all-gather of every device's per-shard counts `[X, 2, X]`.
The block B (`exchange_block_rows`) is the exact worst case, n * min(k, E / X) rows (a token
sends at most min(k, E / X) of its k rows to one shard: its choices are distinct experts), or,
with `moe.exchange_factor` f > 0, f times the balanced share n * k / X (capped at the worst
case). Rows past B in a run are dropped and counted (`exchange_dropped`); the train step then
keeps its old state and the loop re-runs the step with worst-case blocks
(`moe.exchange_overflow=rerun`, the default: dropless stays exact), or lets them drop
(`drop`). On TPU and GPU the exchange is `jax.lax.ragged_all_to_all`, which moves only the
filled rows; XLA:CPU has none, so there it is the same collective built from dense blocks
(`ragged_exchange`). Unfilled rows of the owner's buffer carry the id E / X, outside every
group, so the grouped matmul gives them zeros. On a mesh without an `expert` axis (pure FSDP)
each device runs the single-device dropless dispatch on its own tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from rmoe_jax.model import gating
from rmoe_jax.model.dispatch import dropless_dispatch, grouped_swiglu, take_rows
from rmoe_jax.model.ragged_exchange import ragged_all_to_all
from rmoe_jax.parallel import BATCH_AXES
EXCHANGE_OVERFLOW = ("rerun", "drop")


def exchange_block_rows(local_tokens: int, top_k: int, num_experts: int, expert_shards: int,
                        factor: float) -> int:
    """Rows per sender and receiver: the exact worst case n * min(k, E / X), or for `factor` > 0
    ceil(factor * n * k / X) rounded up to a multiple of 8, whichever is smaller."""
    worst = local_tokens * min(top_k, num_experts // expert_shards)
    if factor <= 0:
        return worst
    share = math.ceil(factor * local_tokens * top_k / expert_shards)
    return min(worst, -(-share // 8) * 8)


def exchange_plan(shard_counts, block: int, axis_name: str):
    """Offsets and sizes of both ragged exchanges, from every device's per-shard row counts.

    shard_counts `[X]` int32: this device's sorted rows bound for each expert shard. Returns
    (there, back, kept): `there` and `back` each a dict of `input_offsets`, `send_sizes`,
    `output_offsets`, `recv_sizes` (all `[X]` int32) for `ragged_all_to_all`; `kept` `[X]` the
    rows sent to each shard (at most `block`). `back` returns each row to its place in the
    sender's sorted order.
    """
    me = jax.lax.axis_index(axis_name)
    kept = jnp.minimum(shard_counts, block)
    everyone = jax.lax.all_gather(jnp.stack([shard_counts, kept]), axis_name)  # [X(sender), 2, X]
    counts, sent = everyone[:, 0], everyone[:, 1]  # [sender, shard]
    starts = jnp.cumsum(counts, axis=1) - counts  # where each sender's run for a shard begins
    # On shard s, sender j's rows follow those of senders 0..j-1.
    landing = jnp.cumsum(sent, axis=0) - sent  # [sender, shard]
    there = dict(input_offsets=starts[me], send_sizes=kept, output_offsets=landing[me],
                 recv_sizes=sent[:, me])
    back = dict(input_offsets=landing[:, me], send_sizes=sent[:, me], output_offsets=starts[:, me],
                recv_sizes=kept)
    return there, back, kept


def _local_dispatch(x, weights, indices, w1, w3, w2, *, num_experts: int, expert_shards: int,
                    block: int, axes: tuple[str, ...]):
    """Per-device body. x `[n, d]`, weights/indices `[n, k]`, w* hold E/X local experts.
    Returns (y `[n, d]`, rows dropped over the whole mesh (int32 scalar))."""
    num_tokens, top_k = indices.shape
    local_experts = num_experts // expert_shards
    flat_expert = indices.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    sorted_expert = flat_expert[order]
    sorted_x = take_rows(x, order // top_k)  # [n*k, d]
    shard_counts = gating.count_per_value(sorted_expert // local_experts, expert_shards)
    there, back, kept = exchange_plan(shard_counts, block, "expert")
    capacity = expert_shards * block
    exchange = lambda operand, output, plan: ragged_all_to_all(
        operand, output, **plan, axis_name="expert", max_slice=block)

    received = exchange(sorted_x, jnp.zeros((capacity, x.shape[-1]), x.dtype), there)
    received_ids = exchange((sorted_expert % local_experts).astype(jnp.int32),
                            jnp.full((capacity,), local_experts, jnp.int32), there)
    owner_order = jnp.argsort(received_ids, stable=True)
    group_sizes = gating.count_per_value(received_ids, local_experts)
    owner_in = take_rows(received, owner_order)
    owner_out = grouped_swiglu(owner_in, (w1, w3, w2), group_sizes)
    owner_out = jax.lax.psum(owner_out, "tensor")  # FFN-dim shards each hold a partial sum
    owner_rows = jnp.zeros_like(owner_out).at[owner_order].set(owner_out, unique_indices=True)
    # Rows past a full block never left; they come back as zeros.
    sorted_out = exchange(owner_rows, jnp.zeros_like(sorted_x), back)
    out = jnp.zeros_like(sorted_out).at[order].set(sorted_out, unique_indices=True)
    y = jnp.einsum("nkd,nk->nd", out.reshape(num_tokens, top_k, -1), weights.astype(out.dtype))
    # Every FFN-dim (tensor) shard sees the same rows: count them once, over the other axes.
    dropped = jax.lax.psum(jnp.sum(shard_counts - kept), tuple(a for a in axes if a != "tensor"))
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
        if expert_shards == 1:  # every device holds every expert: nothing to exchange
            y = dropless_dispatch(x, weights, indices, (w1, w3, w2))
            return jax.lax.psum(y, "tensor"), jnp.zeros((), jnp.int32)
        return _local_dispatch(x, weights, indices, w1, w3, w2, num_experts=num_experts,
                               expert_shards=expert_shards, block=block, axes=mesh.axis_names)

    return jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, batch, up, up, down),
                         out_specs=(batch, P()), check_vma=False)(x, weights, indices, *experts)
