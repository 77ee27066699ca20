"""Dispatch across devices: tokens travel to the devices that own their experts.

Runs inside `jax.shard_map` over the whole mesh. Tokens are sharded over the batch axes
(`data`, `fsdp`, `expert`); expert weights over `expert` (E / X experts per shard) and
optionally their FFN dimension over `tensor`. Per device, with n local tokens and k choices:

  1. sort the local (token, slot) assignments by expert, and within an expert first choices
     before second choices, each in token order (`slot_major`); the rows bound for expert
     shard s are then one contiguous run of the sorted rows;
  2. send each run, at most B rows of it, to its shard with one ragged all-to-all; the owner
     receives into a buffer of X * B rows, sender j's rows right after those of senders
     0..j-1;
  3. the owner runs the grouped matmuls on the buffer as it arrived, sums the FFN-dim shards
     over `tensor`, and sends every row back to where it came from;
  4. the sender unsorts and combines with the gate weights.

Offsets and group sizes on the receivers come from one all-gather of every device's per-expert
counts `[X, 2, E]`. The owner does not sort what it received: sender j's run is already sorted
by local expert, so the buffer is X * E/X contiguous groups (sender j, local expert e), and the
grouped matmul takes them as they are, with expert e's weights tiled X times (group j * E/X + e
uses copy j of expert e; the tiles' gradients sum back onto the expert). That saves a sort, a
gather of the whole buffer and the scatter back, in both passes.

The block B (`exchange_block_rows`) is the exact worst case, n * min(k, E / X) rows (a token
sends at most min(k, E / X) of its k rows to one shard: its choices are distinct experts), or,
with `moe.exchange_factor` f > 0, f times the balanced share n * k / X (capped at the worst
case). Rows past B in a run are dropped (the shard's last experts' rows, later choices first)
and counted (`exchange_dropped`); the train step then keeps its old state and the loop re-runs
the step with worst-case blocks (`moe.exchange_overflow=rerun`, the default: dropless stays
exact), or lets them drop (`drop`). On TPU and GPU the exchange is `jax.lax.ragged_all_to_all`,
which moves only the filled rows; XLA:CPU has none, so there it is the same collective built
from dense blocks (`ragged_exchange`). The owner's unfilled rows all lie past the last group
(the runs land back to back) and are never sent back, so the grouped matmul may leave them
undefined (no row masks). On a mesh without an `expert` axis (pure FSDP) each device runs the
single-device dropless dispatch on its own tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from rmoe_jax.model import gating
from rmoe_jax.model.dispatch import (combine_slot_major, dropless_dispatch, grouped_swiglu,
                                     slot_major, take_rows)
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


def _kept_per_expert(expert_counts, local_experts: int, block: int):
    """`[E]` rows per expert that fit their shard's block: a shard's run is its experts' rows in
    expert order, cut after `block` rows, so expert e keeps what is left of the block after the
    shard's earlier experts (clipped to [0, its count])."""
    per_shard = expert_counts.reshape(-1, local_experts)  # [X, E/X]
    before = jnp.cumsum(per_shard, axis=1) - per_shard
    return jnp.clip(block - before, 0, per_shard).reshape(-1)


def exchange_plan(expert_counts, local_experts: int, block: int, axis_name: str):
    """Offsets and sizes of both ragged exchanges, and the owner's groups, from every device's
    per-expert row counts.

    expert_counts `[E]` int32: this device's sorted rows bound for each expert. Returns
    (there, back, kept, group_sizes): `there` and `back` each a dict of `input_offsets`,
    `send_sizes`, `output_offsets`, `recv_sizes` (all `[X]` int32) for `ragged_all_to_all`;
    `kept` `[X]` the rows sent to each shard (at most `block`); `group_sizes` `[X * E/X]` the
    rows this device receives from sender j for its local expert e, at index j * E/X + e (the
    order they land in). `back` returns each row to its place in the sender's sorted order.
    """
    me = jax.lax.axis_index(axis_name)
    kept_experts = _kept_per_expert(expert_counts, local_experts, block)
    everyone = jax.lax.all_gather(jnp.stack([expert_counts, kept_experts]), axis_name)  # [X, 2, E]
    num_senders = everyone.shape[0]
    counts = everyone[:, 0].reshape(num_senders, -1, local_experts).sum(-1)  # [sender, shard]
    sent = everyone[:, 1].reshape(num_senders, -1, local_experts).sum(-1)
    starts = jnp.cumsum(counts, axis=1) - counts  # where each sender's run for a shard begins
    # On shard s, sender j's rows follow those of senders 0..j-1.
    landing = jnp.cumsum(sent, axis=0) - sent  # [sender, shard]
    there = dict(input_offsets=starts[me], send_sizes=sent[me], output_offsets=landing[me],
                 recv_sizes=sent[:, me])
    back = dict(input_offsets=landing[:, me], send_sizes=sent[:, me], output_offsets=starts[:, me],
                recv_sizes=sent[me])
    mine = jax.lax.dynamic_slice_in_dim(everyone[:, 1], me * local_experts, local_experts, axis=1)
    return there, back, sent[me], mine.reshape(-1)


def _local_dispatch(x, weights, indices, w1, w3, w2, *, num_experts: int, expert_shards: int,
                    block: int, axes: tuple[str, ...]):
    """Per-device body. x `[n, d]`, weights/indices `[n, k]`, w* hold E/X local experts.
    Returns (y `[n, d]`, rows dropped over the whole mesh (int32 scalar))."""
    num_tokens = indices.shape[0]
    local_experts = num_experts // expert_shards
    flat_expert = slot_major(indices)
    order = jnp.argsort(flat_expert, stable=True)
    sorted_x = take_rows(x, order % num_tokens)  # [k*n, d]
    expert_counts = gating.count_per_value(flat_expert, num_experts)
    there, back, kept, group_sizes = exchange_plan(expert_counts, local_experts, block, "expert")
    exchange = lambda operand, output, plan: ragged_all_to_all(
        operand, output, **plan, axis_name="expert", max_slice=block)

    received = exchange(sorted_x, jnp.zeros((expert_shards * block, x.shape[-1]), x.dtype), there)
    # Group j * E/X + e (sender j's rows for local expert e) multiplies copy j of expert e.
    # The rows past the groups (the buffer's unfilled tail) are never sent back, nor is their
    # gradient, so they need no masks.
    tiled = tuple(jnp.tile(w, (expert_shards, 1, 1)) for w in (w1, w3, w2))
    owner_out = grouped_swiglu(received, tiled, group_sizes, mask_rows=False)
    owner_out = jax.lax.psum(owner_out, "tensor")  # FFN-dim shards each hold a partial sum
    # Rows past a full block never left; they come back as zeros.
    sorted_out = exchange(owner_out, jnp.zeros_like(sorted_x), back)
    out = jnp.zeros_like(sorted_out).at[order].set(sorted_out, unique_indices=True)
    y = combine_slot_major(out, weights)
    # Every FFN-dim (tensor) shard sees the same rows: count them once, over the other axes.
    shard_counts = expert_counts.reshape(expert_shards, local_experts).sum(-1)
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
