"""Single-device dispatch of tokens to stacked SwiGLU experts: `capacity` and `dropless`.

Experts are stacked arrays (`w1`, `w3`: `[E, d, f]`, `w2`: `[E, f, d]`); no per-expert loop.
  capacity  each sequence is a group with capacity C = ceil(k * seq * capacity_factor / E)
            slots per expert; slots are filled top-1 choices first, then top-2, ... in token
            order; the rest are dropped. Sort-based (`capacity_dispatch`): the group's k*S
            assignments are sorted by expert (stably, slot-major), an assignment's slot is its
            rank in its expert's run, the rows of x are gathered into an `[E, G, C, d]` buffer,
            the experts run on it densely and each (token, choice) gathers its row back. No
            `[S, E, C]` one-hot tensors; `capacity_dispatch_einsum` (GShard one-hot
            dispatch/combine einsums) is kept only as the reference the tests pin it to.
  dropless  sort the k*N (token, expert) assignments by expert, grouped matmuls
            (`grouped_matmul`: megablox on TPU, a tile loop on CPU, `ragged_dot` on GPU),
            unsort. Nothing is dropped.
With a capacity large enough to drop nothing both give the same outputs and gradients.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from rmoe_jax.model import gating
from rmoe_jax.parallel import constrain

EXPERT_BUFFER_AXES = ("expert", "expert_group", None, None)  # [E, groups, capacity, d]
GROUP_BUFFER_AXES = ("batch", None, None, None)  # [groups, E, capacity, d]: back on x's shards

ExpertWeights = tuple[jax.Array, jax.Array, jax.Array]  # w1 [E,d,f], w3 [E,d,f], w2 [E,f,d]


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """`x[rows]` along axis 0 (`[n, ...]`, rows `[m]` -> `[m, ...]`) for row indices the caller
    guarantees in bounds (a permutation, a slot clamped to the buffer). jnp.take's default
    mode fills out-of-bounds rows, which on TPU is a second pass over every gathered row (a
    select writing [tokens * k, d] again); `clip` is XLA's own gather, which clamps."""
    return jnp.take(x, rows, axis=0, mode="clip")


def expert_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert per group of `group_size` tokens."""
    return max(1, math.ceil(top_k * group_size * capacity_factor / num_experts))


def _swiglu_experts(expert_in: jax.Array, experts: ExpertWeights) -> jax.Array:
    """`[E, G, C, d]` -> `[E, G, C, d]`: expert e's SwiGLU on its slots, as dense batched matmuls."""
    w1, w3, w2 = experts
    hidden = nn.silu(jnp.einsum("egcd,edf->egcf", expert_in, w1)) * jnp.einsum(
        "egcd,edf->egcf", expert_in, w3)
    return checkpoint_name(jnp.einsum("egcf,efd->egcd", hidden, w2), "moe_expert_out")


def capacity_slots(indices: jax.Array, num_experts: int, capacity: int):
    """Where each assignment goes, by a sort instead of one-hot tensors.

    indices `[G, S, k]`. Returns
      position `[G, S, k]` int32: the assignment's slot in its expert (may be >= capacity),
      kept `[G, S, k]` bool: position < capacity,
      source `[G, E, C]` int32: the token (in 0..S-1) that fills slot c of expert e,
      filled `[G, E, C]` bool: whether that slot is filled at all.
    Slot-major priority: assignment a = j * S + s (choice j of token s); sorting the keys
    e * k * S + a (unique) orders the assignments by expert, and within an expert by a, so
    every first choice comes before any second choice, in token order.
    """
    num_groups, group_size, top_k = indices.shape
    n = top_k * group_size
    if num_experts * n >= 2**31:
        raise ValueError(f"capacity dispatch: {num_experts} experts x {n} assignments per group "
                         "overflow the int32 sort keys")
    experts_slot_major = indices.astype(jnp.int32).transpose(0, 2, 1).reshape(num_groups, n)
    keys = jnp.sort(experts_slot_major * n + jnp.arange(n, dtype=jnp.int32), axis=-1)  # [G, n]
    order = keys % n  # order[i]: the slot-major assignment at sorted position i
    sorted_expert = keys // n
    # starts[e]: sorted position of expert e's first assignment; ends[e] = starts[e + 1].
    bounds = jax.vmap(lambda sk: jnp.searchsorted(
        sk, jnp.arange(num_experts + 1, dtype=jnp.int32) * n, side="left"))(keys).astype(jnp.int32)
    starts, counts = bounds[:, :-1], bounds[:, 1:] - bounds[:, :-1]  # [G, E]
    rank = jnp.arange(n, dtype=jnp.int32) - jnp.take_along_axis(starts, sorted_expert, axis=-1)
    position = jax.vmap(lambda o, r: jnp.zeros((n,), jnp.int32).at[o].set(
        r, unique_indices=True))(order, rank)
    position = position.reshape(num_groups, top_k, group_size).transpose(0, 2, 1)
    slot = jnp.arange(capacity, dtype=jnp.int32)
    filled = slot < counts[..., None]  # [G, E, C]
    sorted_index = jnp.minimum(starts[..., None] + slot, n - 1).reshape(num_groups, -1)
    source = (jnp.take_along_axis(order, sorted_index, axis=-1) % group_size).reshape(filled.shape)
    return position, position < capacity, source, filled


def capacity_dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array,
                      experts: ExpertWeights, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Fixed capacity per expert and group, by sort and gathers (`capacity_slots`).

    Args: x `[G, S, d]` (G groups of S tokens), weights/indices `[G, S, k]`.
    Returns: y `[G, S, d]`, kept `[G, S, k]` bool (False = dropped for lack of capacity).
    y[g, s] = sum_j kept * weight * expert_out[e_j, g, position_j]; dropped assignments add 0.
    Same outputs, kept mask and gradients as `capacity_dispatch_einsum`.
    """
    num_groups, group_size, top_k = indices.shape
    num_experts = experts[0].shape[0]
    position, kept, source, filled = capacity_slots(indices, num_experts, capacity)
    # Dispatch: slot (e, c) of group g gathers its token's row (zeros in the unfilled slots).
    # The gathers are batched over groups, so under a mesh they stay on the groups' shards.
    rows = jax.vmap(take_rows)(x, source.reshape(num_groups, -1))
    rows = jnp.where(filled.reshape(num_groups, -1, 1), rows, jnp.zeros((), x.dtype))
    expert_in = rows.reshape(num_groups, num_experts, capacity, -1).transpose(1, 0, 2, 3)
    # Under a mesh these constraints move tokens to their experts' shards (an all-to-all) and back.
    expert_in = constrain(expert_in, EXPERT_BUFFER_AXES)
    expert_out = constrain(_swiglu_experts(expert_in, experts), EXPERT_BUFFER_AXES)
    expert_out = constrain(expert_out.transpose(1, 0, 2, 3), GROUP_BUFFER_AXES)  # [G, E, C, d]
    # Combine: each kept (token, choice) gathers its slot's row; dropped ones read a clamped
    # slot and are zeroed by the where (whose backward gives that slot a zero gradient).
    flat_slot = indices.astype(jnp.int32) * capacity + jnp.minimum(position, capacity - 1)
    out_rows = jax.vmap(take_rows)(
        expert_out.reshape(num_groups, num_experts * capacity, -1),
        flat_slot.reshape(num_groups, -1)).reshape(num_groups, group_size, top_k, -1)
    out_rows = jnp.where(kept[..., None], out_rows, jnp.zeros((), out_rows.dtype))
    return jnp.einsum("gskd,gsk->gsd", out_rows, weights.astype(out_rows.dtype)), kept


def capacity_dispatch_einsum(x: jax.Array, weights: jax.Array, indices: jax.Array,
                             experts: ExpertWeights, capacity: int) -> tuple[jax.Array, jax.Array]:
    """The GShard one-hot dispatch/combine version of `capacity_dispatch`: the reference the
    tests pin the sort-based one to (outputs, gradients, kept mask). Not used by the model: its
    `[G, S, E, C]` dispatch/combine einsums cost more than the experts at long sequences.

    Args: x `[G, S, d]` (G groups of S tokens), weights/indices `[G, S, k]`.
    Returns: y `[G, S, d]`, kept `[G, S, k]` bool (False = dropped for lack of capacity).
    """
    w1, w3, w2 = experts
    num_groups, group_size, top_k = indices.shape
    num_experts = w1.shape[0]
    expert_mask = jax.nn.one_hot(indices, num_experts, dtype=jnp.int32)  # [G,S,k,E]
    # Slot-major order: every token's first choice is served before any second choice.
    mask_slot_major = expert_mask.transpose(0, 2, 1, 3).reshape(num_groups, top_k * group_size, -1)
    position = (jnp.cumsum(mask_slot_major, axis=1) - 1) * mask_slot_major
    position = position.reshape(num_groups, top_k, group_size, -1).transpose(0, 2, 1, 3).sum(-1)
    kept = position < capacity  # [G,S,k]
    slot = jax.nn.one_hot(position, capacity, dtype=x.dtype) * kept[..., None].astype(x.dtype)
    mask = expert_mask.astype(x.dtype)
    dispatch = jnp.einsum("gske,gskc->gsec", mask, slot)
    combine = jnp.einsum("gske,gskc,gsk->gsec", mask, slot, weights.astype(x.dtype))
    # Under a mesh these constraints move tokens to their experts' shards (an all-to-all) and back.
    expert_in = constrain(jnp.einsum("gsec,gsd->egcd", dispatch, x), EXPERT_BUFFER_AXES)
    hidden = nn.silu(jnp.einsum("egcd,edf->egcf", expert_in, w1)) * jnp.einsum(
        "egcd,edf->egcf", expert_in, w3)
    expert_out = checkpoint_name(jnp.einsum("egcf,efd->egcd", hidden, w2), "moe_expert_out")
    expert_out = constrain(expert_out, EXPERT_BUFFER_AXES)
    return jnp.einsum("gsec,egcd->gsd", combine, expert_out), kept


GMM_TILE = 128  # megablox tile for dims under 128 (and the unit of the wider tiles)
GMM_MAX_TILE = 1024  # widest k / n tile, and the row tile
GMM_MAX_TILE_AREA = 640 * 1024  # tk x tn: past this a tile pair overflows the scoped VMEM


def _gmm_dim_tile(dim: int) -> int:
    """The whole dim rounded up to the 128-lane unit if that is at most GMM_MAX_TILE (one
    irregular tile: 448 -> 512), else the widest multiple of 128 up to GMM_MAX_TILE that divides
    it (1280 -> 640), else 512 (irregular)."""
    whole = -(-dim // GMM_TILE) * GMM_TILE
    if whole <= GMM_MAX_TILE:
        return whole
    for tile in range(GMM_MAX_TILE, GMM_TILE - 1, -GMM_TILE):
        if dim % tile == 0:
            return tile
    return 512


def gmm_tiling(k: int, n: int) -> tuple[int, int, int]:
    """megablox tiling (tm, tk, tn) for lhs `[m, k]` x rhs `[k, n]`.

    gmm re-reads an expert's weight tile for every row tile and the lhs for every column tile
    (its cost estimate counts exactly that), so wide tiles cut the HBM traffic: each of k and
    n in as few tiles as the VMEM allows (`_gmm_dim_tile`; the larger halved while tk x tn is
    over GMM_MAX_TILE_AREA), rows in tiles of 1024. The backward runs with the same tiling,
    k and n swapped. With a dim under 128 all tiles are 128. At the 0.91B expert shapes this
    is (1024, 640, 896) for the fused up-projection 1280 -> 2 x 448 and (1024, 512, 640) for
    448 -> 1280; with the fusion, 13.1 GB for the experts' forward and backward on one v5p
    chip against 17.0 GB for separate w1 / w3 gmms in 512 x 384 x 384 tiles (AOT).
    """
    if min(k, n) < GMM_TILE:
        # 128 x 128 even over a smaller dim: the backward swaps tk and tn, and Mosaic takes a
        # block that is a multiple of 128 (megablox masks the ragged part) or the whole dim.
        return GMM_TILE, GMM_TILE, GMM_TILE
    tk, tn = _gmm_dim_tile(k), _gmm_dim_tile(n)
    while tk * tn > GMM_MAX_TILE_AREA:
        if tk >= tn:
            tk = max(GMM_TILE, tk // 2 // GMM_TILE * GMM_TILE)
        else:
            tn = max(GMM_TILE, tn // 2 // GMM_TILE * GMM_TILE)
    return GMM_MAX_TILE, tk, tn


def _zero_ungrouped_rows(rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`[rows, ...]` with the rows past sum(group_sizes) (in no group) set to zero."""
    in_a_group = jnp.arange(rows.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(in_a_group.reshape((-1,) + (1,) * (rows.ndim - 1)), rows,
                     jnp.zeros((), rows.dtype))


def _megablox_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                     mask_rows: bool = True) -> jax.Array:
    """The Pallas TPU grouped matmul JAX ships (megablox `gmm`, with its own backward).

    gmm leaves rows outside every group undefined, in its output and in its backward's lhs
    gradient; ragged_dot's contract is zeros for both. With `mask_rows` the input is masked as
    well as the output, which gives those rows a zero gradient (the where's backward zeroes
    them); without, the caller guarantees every row is in a group (or masks them itself).
    """
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    rows = lhs.shape[0]
    if mask_rows:
        lhs = _zero_ungrouped_rows(lhs, group_sizes)
    tiling = gmm_tiling(lhs.shape[1], rhs.shape[2])
    padded = -(-rows // tiling[0]) * tiling[0]  # gmm needs rows divisible by the row tile
    lhs = jnp.pad(lhs, ((0, padded - rows), (0, 0)))
    out = gmm(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype, tiling=tiling)[:rows]
    return _zero_ungrouped_rows(out, group_sizes) if mask_rows else out


def _megablox_swiglu(sorted_x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                     group_sizes: jax.Array, mask_rows: bool) -> jax.Array:
    """SwiGLU experts on TPU: w1 and w3 as one gmm (`[E, d, 2f]`: the rows are read once,
    not twice), then w2. With `mask_rows`, rows outside every group are masked once, at the
    input and the output (what lies between only ever meets those rows' own garbage);
    without, they are left undefined (see `grouped_swiglu`)."""
    hidden = w1.shape[2]
    if mask_rows:
        sorted_x = _zero_ungrouped_rows(sorted_x, group_sizes)
    gate_and_up = _megablox_matmul(sorted_x, jnp.concatenate([w1, w3], axis=2), group_sizes,
                                   mask_rows=False)
    activation = nn.silu(gate_and_up[:, :hidden]) * gate_and_up[:, hidden:]
    out = _megablox_matmul(activation, w2, group_sizes, mask_rows=False)
    return _zero_ungrouped_rows(out, group_sizes) if mask_rows else out


MIN_BLOCK_ROWS = 64  # XLA:CPU multiplies thin tiles slowly (16 rows: ~3x the time per row of 64)


def block_rows(rows: int, num_groups: int) -> int:
    """Block height for `blocked_matmul`: about half an average group, a power of two in
    [64, 128] (smaller blocks waste less padding, larger ones make better matmuls; below 64
    rows the padding saved costs less than the thin matmuls lose); for fewer than 64 rows the
    floor is `rows` rounded down to a power of two (at least 8). Half rather than a quarter:
    at the enwik8-medium shape (4096 rows, 16 experts) 128-row blocks take the train step from
    2.25 to 2.05 s on 2 cores (BENCHMARKS.md, "CPU step")."""
    target = max(rows // max(num_groups, 1) // 2, 8)
    block = min(128, 2 ** int(math.log2(target)))
    return int(max(block, min(MIN_BLOCK_ROWS, 2 ** int(math.log2(max(rows, 8))))))


def _tile_table(group_sizes: jax.Array, rows: int, block: int):
    """Row tiles of each group: tile t covers rows [start[t], start[t] + block) of group[t],
    of which the first valid[t] rows belong to it. Static length rows // block + E (enough
    for any sizes); only the first `count` entries are real."""
    num_groups = group_sizes.shape[0]
    tiles_per_group = -(-group_sizes // block)
    tile_ends = jnp.cumsum(tiles_per_group)
    tile = jnp.arange(rows // block + num_groups)
    group = jnp.minimum(jnp.searchsorted(tile_ends, tile, side="right"), num_groups - 1)
    tile_in_group = tile - (tile_ends - tiles_per_group)[group]
    start = (jnp.cumsum(group_sizes) - group_sizes)[group] + tile_in_group * block
    valid = jnp.clip(group_sizes[group] - tile_in_group * block, 0, block)
    return start, group, valid, tile_ends[-1]


def _tile_loop_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, block: int,
                      transpose_rhs: bool) -> jax.Array:
    """lhs `[rows, k]` rows of group e times rhs[e] (`[k, n]`, or `[n, k]` transposed)."""
    rows, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    start, group, valid, count = _tile_table(group_sizes, rows, block)
    padded_lhs = jnp.concatenate([lhs, jnp.zeros((block, k), lhs.dtype)])
    row_in_tile = jnp.arange(block)[:, None]
    contract = (((1,), (1 if transpose_rhs else 0,)), ((), ()))

    def tile_product(t, out):
        tile_lhs = jax.lax.dynamic_slice_in_dim(padded_lhs, start[t], block)
        product = jax.lax.dot_general(tile_lhs, rhs[group[t]], contract).astype(out.dtype)
        current = jax.lax.dynamic_slice_in_dim(out, start[t], block)
        kept = jnp.where(row_in_tile < valid[t], product, current)  # the rest is the next group's
        return jax.lax.dynamic_update_slice_in_dim(out, kept, start[t], 0)

    out = jax.lax.fori_loop(0, count, tile_product, jnp.zeros((rows + block, n), lhs.dtype))
    return out[:rows]


def _tile_loop_weight_grad(lhs: jax.Array, out_grad: jax.Array, group_sizes: jax.Array,
                           block: int) -> jax.Array:
    """d rhs `[E, k, n]` = per group lhs_e^T @ out_grad_e, accumulated in float32."""
    rows, k = lhs.shape
    n = out_grad.shape[1]
    start, group, valid, count = _tile_table(group_sizes, rows, block)
    padded_lhs = jnp.concatenate([lhs, jnp.zeros((block, k), lhs.dtype)])
    padded_grad = jnp.concatenate([out_grad, jnp.zeros((block, n), out_grad.dtype)])
    row_in_tile = jnp.arange(block)[:, None]

    def accumulate(t, rhs_grad):
        tile_lhs = jax.lax.dynamic_slice_in_dim(padded_lhs, start[t], block)
        tile_lhs = jnp.where(row_in_tile < valid[t], tile_lhs, jnp.zeros((), lhs.dtype))
        tile_grad = jax.lax.dynamic_slice_in_dim(padded_grad, start[t], block)
        update = jax.lax.dot_general(tile_lhs, tile_grad, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
        return rhs_grad.at[group[t]].add(update)

    rhs_grad = jnp.zeros((group_sizes.shape[0], k, n), jnp.float32)
    return jax.lax.fori_loop(0, count, accumulate, rhs_grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, block: int) -> jax.Array:
    return _tile_loop_matmul(lhs, rhs, group_sizes, block, transpose_rhs=False)


def _blocked_matmul_forward(lhs, rhs, group_sizes, block):
    return _blocked_matmul(lhs, rhs, group_sizes, block), (lhs, rhs, group_sizes)


def _blocked_matmul_backward(block, residuals, out_grad):
    lhs, rhs, group_sizes = residuals
    lhs_grad = _tile_loop_matmul(out_grad, rhs, group_sizes, block, transpose_rhs=True)
    rhs_grad = _tile_loop_weight_grad(lhs, out_grad, group_sizes, block).astype(rhs.dtype)
    return lhs_grad.astype(lhs.dtype), rhs_grad, np.zeros(group_sizes.shape, jax.dtypes.float0)


_blocked_matmul.defvjp(_blocked_matmul_forward, _blocked_matmul_backward)


def blocked_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`ragged_dot` as a loop over row tiles: each group's rows are cut into tiles of
    `block_rows` rows, and only the tiles in use are multiplied, each by its group's weights
    (the last tile of a group is partly the next group's rows, which it leaves untouched).

    XLA:CPU lowers `ragged_dot` to a dense masked matmul over all groups (E times the work);
    this does sum_e ceil(size_e / block) tiles. The loop's trip count is dynamic, so the
    backward (lhs grad: the same loop with rhs transposed; rhs grad: per-tile lhs^T @ grad
    accumulated per group) is written out as a custom VJP.
    """
    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
    return _blocked_matmul(lhs, rhs, group_sizes, block_rows(lhs.shape[0], rhs.shape[0]))


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Rows [start_e, start_e + size_e) of lhs `[rows, k]` times rhs[e] `[k, n]`; rows past
    sum(group_sizes) give zeros. Lowered per platform: megablox `gmm` on TPU, block matmuls on
    CPU, `ragged_dot` elsewhere (GPU)."""
    return jax.lax.platform_dependent(lhs, rhs, group_sizes, tpu=_megablox_matmul,
                                      cpu=blocked_matmul, default=jax.lax.ragged_dot)


def _swiglu_from_matmuls(sorted_x, w1, w3, w2, group_sizes, matmul):
    hidden = nn.silu(matmul(sorted_x, w1, group_sizes)) * matmul(sorted_x, w3, group_sizes)
    return matmul(hidden, w2, group_sizes)


def grouped_swiglu(sorted_x: jax.Array, experts: ExpertWeights, group_sizes: jax.Array,
                   mask_rows: bool = True) -> jax.Array:
    """SwiGLU experts over rows already sorted by expert: rows [start_e, start_e + size_e) use
    expert e; rows past sum(group_sizes) give zeros. `[rows, d]` -> `[rows, d]`.

    Per platform: megablox on TPU (`_megablox_swiglu`, w1 and w3 fused), the tile loop on CPU,
    `ragged_dot` elsewhere (GPU). `mask_rows=False` is for a caller that never reads the rows
    past the groups, nor their gradient (local dropless has none; the expert-parallel owner
    never sends them back): the TPU branch then skips its two masks, each a pass over every
    row, and leaves those rows undefined.
    """
    w1, w3, w2 = experts
    tpu = functools.partial(_megablox_swiglu, mask_rows=mask_rows)
    cpu = functools.partial(_swiglu_from_matmuls, matmul=blocked_matmul)
    other = functools.partial(_swiglu_from_matmuls, matmul=jax.lax.ragged_dot)
    out = jax.lax.platform_dependent(sorted_x, w1, w3, w2, group_sizes, tpu=tpu, cpu=cpu,
                                     default=other)
    return checkpoint_name(out, "moe_expert_out")


def slot_major(indices: jax.Array) -> jax.Array:
    """`[N, k]` -> `[k * N]`: assignment j * N + n is choice j of token n. Rows in this order
    split into `[k, N, d]` by a free reshape of the major dim; token-major rows (`[N * k, d]`
    -> `[N, k, d]`) would be re-tiled on TPU, a copy of every row in each pass."""
    return indices.T.reshape(-1)


def combine_slot_major(rows: jax.Array, weights: jax.Array) -> jax.Array:
    """rows `[k * N, d]` in `slot_major` order, weights `[N, k]` -> `[N, d]`: each token's
    expert outputs summed with its gate weights."""
    top_k = weights.shape[1]
    rows = rows.reshape(top_k, -1, rows.shape[-1])
    return jnp.einsum("knd,nk->nd", rows, weights.astype(rows.dtype))


def dropless_dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array,
                      experts: ExpertWeights) -> jax.Array:
    """Sort the assignments (slot-major) by expert, grouped matmuls, unsort, combine.

    Args: x `[N, d]`, weights/indices `[N, k]`. Returns y `[N, d]`.
    """
    w1, w3, w2 = experts
    num_tokens = indices.shape[0]
    num_experts = w1.shape[0]
    flat_expert = slot_major(indices)
    order = jnp.argsort(flat_expert, stable=True)
    sorted_x = take_rows(x, order % num_tokens)  # [k*N, d]
    group_sizes = gating.count_per_value(flat_expert, num_experts)
    sorted_out = grouped_swiglu(sorted_x, experts, group_sizes, mask_rows=False)
    out = jnp.zeros_like(sorted_out).at[order].set(sorted_out, unique_indices=True)
    return combine_slot_major(out, weights)
