"""`jax.lax.ragged_all_to_all` where the backend has it, and the same collective from dense
blocks where it does not (XLA:CPU: `UNIMPLEMENTED: HLO opcode ragged-all-to-all`).

A ragged all-to-all sends, from each device, the slice `operand[input_offsets[s] :
input_offsets[s] + send_sizes[s]]` to device s of the axis, which writes it into its `output`
at `output_offsets[s]` (the offset *on the receiver*); `recv_sizes[j]` is how many rows arrive
from device j. Rows of `output` that nothing lands on keep their value. Only the filled rows
travel, so the bytes on the wire are what the routing needs, not a worst-case block.

The dense form (`dense_ragged_all_to_all`) has the same semantics for slices of at most
`max_slice` rows: it gathers each slice into a `[devices, max_slice, ...]` block (padding
zeroed), exchanges the blocks with one `all_to_all`, and scatters what arrived to its offsets.
It is what runs on CPU, so the tests exercise the exact offsets and sizes the TPU program
uses; `tests/test_exchange.py` checks it against the definition above, written in NumPy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def dense_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                            *, axis_name: str, max_slice: int):
    """`ragged_all_to_all` from one dense `all_to_all` of `[devices, max_slice, ...]` blocks.

    operand `[rows_in, ...]`, output `[rows_out, ...]`; the four index arrays `[devices]`
    int32, every send size at most `max_slice`. Returns `output` with the received rows set.
    """
    slot = jnp.arange(max_slice, dtype=jnp.int32)
    tail = (1,) * (operand.ndim - 1)
    sent = slot[None, :] < send_sizes[:, None]  # [devices, max_slice]
    source = jnp.where(sent, input_offsets[:, None] + slot[None, :], 0)
    blocks = jnp.take(operand, source, axis=0)  # [devices, max_slice, ...]
    blocks = jnp.where(sent.reshape(sent.shape + tail), blocks, jnp.zeros((), operand.dtype))
    received = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=False)  # block j: from j
    # Where sender j asked its rows to land here (its output_offsets entry for this device).
    landing = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    arrived = slot[None, :] < recv_sizes[:, None]
    # Rows that did not arrive get distinct indices past the end (dropped), so the indices are
    # unique as the scatter is told.
    past_end = output.shape[0] + jnp.arange(arrived.size, dtype=jnp.int32).reshape(arrived.shape)
    target = jnp.where(arrived, landing[:, None] + slot[None, :], past_end)
    return output.at[target.reshape(-1)].set(
        received.reshape((-1,) + operand.shape[1:]), mode="drop", unique_indices=True)


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                      *, axis_name: str, max_slice: int):
    """The XLA collective on TPU and GPU; `dense_ragged_all_to_all` elsewhere (CPU).

    Shapes as in `dense_ragged_all_to_all`; `max_slice` bounds every send size (the CPU form
    needs it to size its blocks; the collective itself moves only the rows sent).
    """
    def native(*args):
        return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)

    dense = functools.partial(dense_ragged_all_to_all, axis_name=axis_name, max_slice=max_slice)
    return jax.lax.platform_dependent(operand, output, input_offsets, send_sizes, output_offsets,
                                      recv_sizes, cpu=dense, default=native)
