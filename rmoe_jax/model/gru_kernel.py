"""The RMoE router's GRU step as one fused Pallas TPU kernel, forward and backward.

Why: XLA compiles the GRU step (two `[tokens, 3p]` matmuls and the gate math) into a dozen
fusions, each reading and writing `[tokens, 3p]` float32 intermediates through HBM; with its
autodiff backward that is ~1.2 GB per layer and micro-batch of 20,480 tokens at p = 128, six
times a linear router, for a cell whose inputs and output are three `[tokens, p]` arrays. This
kernel keeps one block of rows and the four weights in VMEM and computes the gates there:
forward it reads x and h and writes h'; backward it reads x, h and the output gradient,
recomputes the gates, and writes dx, dh and the weight gradients (summed in VMEM).

Semantics are PyTorch `GRUCell`'s, as `recurrent.gru_step` (the XLA path, which the CPU runs):
`r = s(W_ir x + b_ir + W_hr h + b_hr)`, `z = s(W_iz x + b_iz + W_hz h + b_hz)`,
`n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`, `h' = (1 - z) n + z h`, all float32.
Kernels are `[in, 3p]` in gate order r, z, n. The TPU kernel needs `p % 128 == 0` (lane-aligned
gate slices, `gru_kernel_supported`); `interpret=True` runs the same kernel anywhere (tests).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]
MAX_BLOCK_ROWS = 1024  # [1024, 3p] f32 gates at p = 128: 1.5 MiB, well inside scoped VMEM
LANES = 128


def gru_kernel_supported(input_size: int, hidden_size: int) -> bool:
    """Whether the TPU kernel takes these widths: gate slices must fall on 128-lane tiles."""
    return hidden_size % LANES == 0 and input_size % LANES == 0


def block_rows_for(rows: int) -> int:
    """Rows per grid step: the largest power of two <= MAX_BLOCK_ROWS dividing `rows` (>= 8:
    a float32 sublane tile); rows not a multiple of 8 are padded up to one by the caller."""
    block = MAX_BLOCK_ROWS
    while block > 8 and rows % block:
        block //= 2
    return block


def _gates(x, h, w_in, w_hid, b_in, b_hid, p):
    """Reset, update and candidate gates, and the hidden part of the candidate `[rows, p]`."""
    input_part = jnp.dot(x, w_in, preferred_element_type=jnp.float32) + b_in
    hidden_part = jnp.dot(h, w_hid, preferred_element_type=jnp.float32) + b_hid
    reset = jax.nn.sigmoid(input_part[:, :p] + hidden_part[:, :p])
    update = jax.nn.sigmoid(input_part[:, p:2 * p] + hidden_part[:, p:2 * p])
    hidden_candidate = hidden_part[:, 2 * p:]
    candidate = jnp.tanh(input_part[:, 2 * p:] + reset * hidden_candidate)
    return reset, update, candidate, hidden_candidate


def _forward_kernel(x_ref, h_ref, w_in_ref, w_hid_ref, b_in_ref, b_hid_ref, out_ref):
    h = h_ref[...]
    _, update, candidate, _ = _gates(x_ref[...], h, w_in_ref[...], w_hid_ref[...],
                                     b_in_ref[...], b_hid_ref[...], h.shape[1])
    out_ref[...] = (1.0 - update) * candidate + update * h


def _backward_kernel(x_ref, h_ref, grad_ref, w_in_ref, w_hid_ref, b_in_ref, b_hid_ref,
                     dx_ref, dh_ref, dw_in_ref, dw_hid_ref, db_in_ref, db_hid_ref):
    from jax.experimental import pallas as pl

    @pl.when(pl.program_id(1) == 0)  # this core's first block: start its weight-grad sums
    def _start():
        for ref in (dw_in_ref, dw_hid_ref, db_in_ref, db_hid_ref):
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    x, h, grad = x_ref[...], h_ref[...], grad_ref[...]
    w_in, w_hid = w_in_ref[...], w_hid_ref[...]
    p = h.shape[1]
    reset, update, candidate, hidden_candidate = _gates(x, h, w_in, w_hid, b_in_ref[...],
                                                        b_hid_ref[...], p)
    # d(pre-activation) of each gate, [rows, p]; the candidate's hidden part is scaled by r.
    d_candidate = grad * (1.0 - update) * (1.0 - candidate * candidate)
    d_update = grad * (h - candidate) * update * (1.0 - update)
    d_reset = d_candidate * hidden_candidate * reset * (1.0 - reset)
    d_hidden_candidate = d_candidate * reset
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    x_t, h_t = x.T, h.T
    dx = jnp.zeros(x.shape, jnp.float32)
    dh = grad * update
    gates = ((d_reset, d_reset), (d_update, d_update), (d_candidate, d_hidden_candidate))
    for gate, (d_input_part, d_hidden_part) in enumerate(gates):
        cols = slice(gate * p, (gate + 1) * p)
        dx = dx + dot(d_input_part, w_in[:, cols].T)
        dh = dh + dot(d_hidden_part, w_hid[:, cols].T)
        dw_in_ref[0, :, cols] += dot(x_t, d_input_part)
        dw_hid_ref[0, :, cols] += dot(h_t, d_hidden_part)
        db_in_ref[0, :, cols] += jnp.sum(d_input_part, axis=0, keepdims=True)
        db_hid_ref[0, :, cols] += jnp.sum(d_hidden_part, axis=0, keepdims=True)
    dx_ref[...] = dx
    dh_ref[...] = dh


def _specs(block: int, widths: tuple[int, ...], row_block=lambda i: i):
    """BlockSpecs: grid step `index` takes row block `row_block(*index)` of each `[rows, w]`."""
    from jax.experimental import pallas as pl

    return [pl.BlockSpec((block, w), lambda *index: (row_block(*index), 0)) for w in widths]


def _weight_specs(w_in, w_hid):
    """BlockSpecs of the two kernels and the two `[1, 3p]` biases: whole, every grid step."""
    from jax.experimental import pallas as pl

    whole = lambda shape: pl.BlockSpec(shape, lambda *index: (0,) * len(shape))  # noqa: E731
    width = w_in.shape[1]
    return [whole(w_in.shape), whole(w_hid.shape), whole((1, width)), whole((1, width))]


def _compiler_params(semantics: tuple[str, ...]):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics)


def _forward_call(params: Params, x, h, interpret: bool):
    from jax.experimental import pallas as pl

    rows, input_size = x.shape
    p = h.shape[1]
    block = block_rows_for(rows)
    width = params["input_kernel"].shape[1]
    # Reads x and h, writes h'; the weights' blocks never change, so they are read once.
    cost = pl.CostEstimate(
        flops=2 * rows * (input_size + p) * width + 10 * rows * p,
        transcendentals=3 * rows * p,
        bytes_accessed=4 * (rows * (input_size + 2 * p) + (input_size + p + 2) * width))
    return pl.pallas_call(
        _forward_kernel, grid=(rows // block,),
        in_specs=_specs(block, (input_size, p)) + _weight_specs(
            params["input_kernel"], params["hidden_kernel"]),
        out_specs=_specs(block, (p,))[0],
        out_shape=jax.ShapeDtypeStruct((rows, p), jnp.float32),
        # Row blocks are independent: both TensorCores of a megacore chip can take them.
        compiler_params=None if interpret else _compiler_params(("parallel",)),
        cost_estimate=cost, interpret=interpret, name="rmoe_gru_forward",
    )(x, h, params["input_kernel"], params["hidden_kernel"],
      params["input_bias"].reshape(1, width), params["hidden_bias"].reshape(1, width))


def _backward_call(params: Params, x, h, grad, interpret: bool):
    """Grid (sums, blocks per sum): each of `sums` (2 where the blocks split evenly: one per
    TensorCore of a megacore chip) accumulates the weight gradients of its row blocks in its
    own VMEM-resident output block; the sums are added here."""
    from jax.experimental import pallas as pl

    rows, input_size = x.shape
    p = h.shape[1]
    block = block_rows_for(rows)
    blocks = rows // block
    sums = 2 if blocks % 2 == 0 else 1
    per_sum = blocks // sums
    width = params["input_kernel"].shape[1]
    partial = lambda shape: pl.BlockSpec((1,) + shape, lambda c, j: (c, 0, 0))  # noqa: E731
    # The gates are recomputed (one forward's matmuls), then dx/dh and the weight gradients.
    cost = pl.CostEstimate(
        flops=2 * rows * (input_size + p) * width * 3 + 30 * rows * p,
        transcendentals=3 * rows * p,
        # Reads x, h and the gradient; writes dx and dh; reads the weights once and writes
        # each sum of the weight gradients once.
        bytes_accessed=4 * (rows * (2 * input_size + 3 * p)
                            + (sums + 1) * (input_size + p + 2) * width))
    out_shape = (
        jax.ShapeDtypeStruct((rows, input_size), jnp.float32),
        jax.ShapeDtypeStruct((rows, p), jnp.float32),
        jax.ShapeDtypeStruct((sums, input_size, width), jnp.float32),
        jax.ShapeDtypeStruct((sums, p, width), jnp.float32),
        jax.ShapeDtypeStruct((sums, 1, width), jnp.float32),
        jax.ShapeDtypeStruct((sums, 1, width), jnp.float32),
    )
    row_block = lambda c, j: c * per_sum + j  # noqa: E731
    dx, dh, dw_in, dw_hid, db_in, db_hid = pl.pallas_call(
        _backward_kernel, grid=(sums, per_sum),
        in_specs=_specs(block, (input_size, p, p), row_block) + _weight_specs(
            params["input_kernel"], params["hidden_kernel"]),
        out_specs=_specs(block, (input_size, p), row_block) + [
            partial((input_size, width)), partial((p, width)), partial((1, width)),
            partial((1, width))],
        out_shape=out_shape,
        # The second axis accumulates into the same output blocks: sequential on one core.
        compiler_params=None if interpret else _compiler_params(("parallel", "arbitrary")),
        cost_estimate=cost, interpret=interpret, name="rmoe_gru_backward",
    )(x, h, grad, params["input_kernel"], params["hidden_kernel"],
      params["input_bias"].reshape(1, width), params["hidden_bias"].reshape(1, width))
    grads = {"input_kernel": dw_in.sum(0), "hidden_kernel": dw_hid.sum(0),
             "input_bias": db_in.sum((0, 1)), "hidden_bias": db_hid.sum((0, 1))}
    return grads, dx, dh


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_step(params: Params, x: jax.Array, h: jax.Array, interpret: bool) -> jax.Array:
    return _forward_call(params, x, h, interpret)


def _fused_step_fwd(params, x, h, interpret):
    # Residuals are the inputs only: the backward kernel recomputes the gates in VMEM.
    return _forward_call(params, x, h, interpret), (params, x, h)


def _fused_step_bwd(interpret, residuals, grad):
    params, x, h = residuals
    return _backward_call(params, x, h, grad, interpret)


_fused_step.defvjp(_fused_step_fwd, _fused_step_bwd)


def _local_gru_step(params: Params, x: jax.Array, h: jax.Array, *, interpret: bool) -> jax.Array:
    """The kernel on one device's rows, padded up to a multiple of 8 rows where needed."""
    rows = x.shape[0]
    padded = -(-rows // 8) * 8
    params = {k: v.astype(jnp.float32) for k, v in params.items()}
    x, h = x.astype(jnp.float32), h.astype(jnp.float32)
    if padded != rows:
        x = jnp.pad(x, ((0, padded - rows), (0, 0)))
        h = jnp.pad(h, ((0, padded - rows), (0, 0)))
    return _fused_step(params, x, h, interpret)[:rows]


def fused_gru_step(params: Params, x: jax.Array, h: jax.Array, *,
                   interpret: bool = False) -> jax.Array:
    """`recurrent.gru_step` by the fused kernel. x `[tokens, in]`, h `[tokens, p]` -> h'
    `[tokens, p]` float32. Under a mesh (`jax.set_mesh`) the kernel runs in a shard_map over
    the token rows' batch axes (weights replicated; their gradients are summed over shards);
    outside one, on the whole arrays."""
    from rmoe_jax.parallel import BATCH_AXES, active_mesh, rule_mesh_axes

    local = functools.partial(_local_gru_step, interpret=interpret)
    mesh = active_mesh()
    if mesh is None:
        return local(params, x, h)
    # Token rows are `batch * seq` flattened, batch-major: sharded as the batch is.
    axes = rule_mesh_axes(mesh, "batch", BATCH_AXES)
    if x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    rows = jax.sharding.PartitionSpec(axes or None, None)
    replicated = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), params)
    return jax.shard_map(local, mesh=mesh, in_specs=(replicated, rows, rows), out_specs=rows,
                         check_vma=False)(params, x, h)


def gru_step_per_platform(params: Params, x: jax.Array, h: jax.Array,
                          xla_step: Callable[[Params, jax.Array, jax.Array], jax.Array]
                          ) -> jax.Array:
    """The fused kernel on TPU where the widths allow (`gru_kernel_supported`), `xla_step`
    (`recurrent.gru_step`) elsewhere. Shapes as `fused_gru_step`."""
    if not gru_kernel_supported(x.shape[-1], h.shape[-1]):
        return xla_step(params, x, h)
    return jax.lax.platform_dependent(params, x, h, tpu=fused_gru_step, default=xla_step)
