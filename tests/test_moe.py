"""Gating, aux losses and both dispatch strategies against NumPy / per-token references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmoe_jax.model import gating
from rmoe_jax.model.dispatch import (blocked_matmul, capacity_dispatch, dropless_dispatch, expert_capacity,
                                     grouped_matmul)

import numpy_reference as ref

E, K, D, F = 5, 2, 6, 7


def test_top_k_gating_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(9, E)).astype(np.float32) * 3
    probs, weights, indices = gating.top_k_gating(jnp.asarray(logits, jnp.bfloat16), K)
    assert probs.dtype == jnp.float32  # float32 whatever the compute dtype
    bf16_logits = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    expected_probs = ref.softmax(bf16_logits)
    expected_idx = np.argsort(-expected_probs, axis=-1)[:, :K]
    expected_w = np.take_along_axis(expected_probs, expected_idx, axis=-1)
    np.testing.assert_allclose(probs, expected_probs, rtol=1e-5)
    np.testing.assert_array_equal(indices, expected_idx)
    np.testing.assert_allclose(weights, expected_w / expected_w.sum(-1, keepdims=True), rtol=1e-5)
    _, raw, _ = gating.top_k_gating(jnp.asarray(bf16_logits), K, renormalize=False)
    np.testing.assert_allclose(raw, expected_w, rtol=1e-5)


def _numpy_top_k_weights(logits: np.ndarray, indices: np.ndarray, renormalize: bool = True) -> np.ndarray:
    """The softmax probabilities of the chosen experts (renormalised to sum 1), float64."""
    chosen = np.take_along_axis(ref.softmax(logits), indices, axis=-1)
    return chosen / chosen.sum(-1, keepdims=True) if renormalize else chosen


def test_top_k_weights_gradient_matches_finite_differences():
    """d(sum c * weights) / d logits, against central differences of the NumPy weights with the
    experts held fixed (they are piecewise constant), with and without renormalisation."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(6, E)) * 2
    cotangent = rng.normal(size=(6, K))
    _, _, indices = gating.top_k_gating(jnp.asarray(logits, jnp.float32), K)
    indices = np.asarray(indices)
    for renormalize in (True, False):
        def numpy_objective(z):
            return np.sum(cotangent * _numpy_top_k_weights(z, indices, renormalize))

        grad = jax.grad(lambda z: jnp.sum(jnp.asarray(cotangent, jnp.float32) * gating.top_k_gating(
            z, K, renormalize)[1]))(jnp.asarray(logits, jnp.float32))
        expected = np.zeros_like(logits)
        step = 1e-5
        for position in np.ndindex(*logits.shape):
            bump = np.zeros_like(logits)
            bump[position] = step
            expected[position] = (numpy_objective(logits + bump) - numpy_objective(logits - bump)) / (2 * step)
        np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gating.top_k_gating(jnp.asarray(logits, jnp.float32), K)[1],
                               _numpy_top_k_weights(logits, indices), rtol=1e-5)


def test_count_per_value_matches_bincount():
    ids = np.random.default_rng(3).integers(-2, 9, size=(40, 3))
    counts = gating.count_per_value(jnp.asarray(ids, jnp.int32), 7)
    assert counts.dtype == jnp.int32 and counts.shape == (7,)
    in_range = ids[(ids >= 0) & (ids < 7)]
    np.testing.assert_array_equal(counts, np.bincount(in_range, minlength=7))


def test_load_balance_and_z_loss_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(11, E)).astype(np.float32)
    probs, _, indices = gating.top_k_gating(jnp.asarray(logits), K)
    counts = np.zeros(E)
    for row in np.asarray(indices):
        for e in row:
            counts[e] += 1
    f = counts / (11 * K)
    p = ref.softmax(logits).mean(0)
    loss = gating.load_balance_loss(gating.expert_fractions(indices, E), jnp.mean(probs, 0))
    np.testing.assert_allclose(loss, E * np.sum(f * p), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(gating.z_loss(jnp.asarray(logits)), np.mean(lse**2), rtol=1e-5)


def test_perfectly_balanced_routing_gives_one():
    # Every expert chosen equally often and uniform probabilities: E * sum (1/E)(1/E) = 1.
    indices = jnp.asarray([[e, (e + 1) % E] for e in range(E)], jnp.int32)
    fractions = gating.expert_fractions(indices, E)
    np.testing.assert_allclose(fractions, np.full(E, 1 / E))
    np.testing.assert_allclose(gating.load_balance_loss(fractions, jnp.full((E,), 1 / E)), 1.0, rtol=1e-6)


def test_routing_stats_match_numpy():
    logits = np.random.default_rng(2).normal(size=(13, E)).astype(np.float32) * 2
    probs = ref.softmax(logits)
    stats = gating.routing_stats(jnp.asarray(probs), K)
    np.testing.assert_allclose(stats["gate_entropy"], np.mean(-(probs * np.log(probs)).sum(-1)), rtol=1e-5)
    top = -np.sort(-probs, axis=-1)
    np.testing.assert_allclose(stats["top1_top2_ratio"], np.median(top[:, 0] / top[:, 1]), rtol=1e-5)
    np.testing.assert_allclose(stats["topk_weight_sum"], np.mean(top[:, :K].sum(-1)), rtol=1e-5)
    uniform = gating.routing_stats(jnp.full((4, E), 1 / E), K)
    np.testing.assert_allclose(uniform["gate_entropy"], np.log(E), rtol=1e-6)


def _problem(groups=3, seq=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(groups, seq, D)).astype(np.float32)
    logits = rng.normal(size=(groups * seq, E)).astype(np.float32)
    _, weights, indices = gating.top_k_gating(jnp.asarray(logits), K)
    experts = tuple(jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.3)
                    for s in [(E, D, F), (E, D, F), (E, F, D)])
    return jnp.asarray(x), weights.reshape(groups, seq, K), indices.reshape(groups, seq, K), experts


def per_token_reference(x, weights, indices, experts):
    """y_n = sum_j w_nj * w2_e(silu(w1_e x_n) * w3_e x_n), e = idx_nj; one token at a time."""
    w1, w3, w2 = experts

    def token(x_n, w_n, idx_n):
        h = jax.nn.silu(jnp.einsum("d,kdf->kf", x_n, w1[idx_n])) * jnp.einsum("d,kdf->kf", x_n, w3[idx_n])
        return jnp.einsum("kf,kfd,k->d", h, w2[idx_n], w_n)

    return jax.vmap(token)(x.reshape(-1, D), weights.reshape(-1, K), indices.reshape(-1, K))


def test_dispatch_strategies_agree_with_reference_outputs_and_grads():
    x, weights, indices, experts = _problem()
    groups, seq, _ = x.shape
    no_drop_capacity = seq * K  # every slot fits

    def losses(x, weights, experts):
        probe = jnp.sin(jnp.arange(groups * seq * D, dtype=jnp.float32)).reshape(-1, D)
        capacity_y, kept = capacity_dispatch(x, weights, indices, experts, no_drop_capacity)
        dropless_y = dropless_dispatch(x.reshape(-1, D), weights.reshape(-1, K), indices.reshape(-1, K), experts)
        reference_y = per_token_reference(x, weights, indices, experts)
        return [jnp.sum(y.reshape(-1, D) * probe) for y in (capacity_y, dropless_y, reference_y)], kept

    (values, kept) = losses(x, weights, experts)
    assert bool(jnp.all(kept))
    np.testing.assert_allclose(values[0], values[2], rtol=1e-5)
    np.testing.assert_allclose(values[1], values[2], rtol=1e-5)
    grads = [jax.grad(lambda *a, i=i: losses(*a)[0][i], argnums=(0, 1, 2))(x, weights, experts)
             for i in range(3)]
    for strategy in (0, 1):
        for ours, expected in zip(jax.tree.leaves(grads[strategy]), jax.tree.leaves(grads[2])):
            np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def numpy_kept(indices, capacity, num_experts=E):
    """GShard priority: all first choices (in token order), then all second choices, ...
    indices `[groups, seq, k]`; each group fills its own `capacity` slots per expert."""
    groups, seq, k = indices.shape
    kept = np.zeros(indices.shape, bool)
    for g in range(groups):
        load = np.zeros(num_experts, int)
        for slot in range(k):
            for s in range(seq):
                e = indices[g, s, slot]
                if load[e] < capacity:
                    kept[g, s, slot] = True
                    load[e] += 1
    return kept


def test_small_capacity_drops_what_numpy_counts():
    x, weights, indices, experts = _problem(groups=2, seq=16, seed=3)
    capacity = expert_capacity(16, E, K, capacity_factor=0.5)
    assert capacity == 4
    y, kept = capacity_dispatch(x, weights, indices, experts, capacity)
    expected_kept = numpy_kept(np.asarray(indices), capacity)
    np.testing.assert_array_equal(np.asarray(kept), expected_kept)
    assert 0 < (~expected_kept).sum() < expected_kept.size
    # Dropped assignments contribute nothing: the reference with their weights zeroed matches.
    reference = per_token_reference(x, weights * expected_kept, indices, experts)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_size,expected", [(512, 80), (8, 2), (3, 1)])
def test_expert_capacity(group_size, expected):
    assert expert_capacity(group_size, 16, 2, 1.25) == expected


@pytest.mark.parametrize("group_sizes", [[5, 0, 7, 3], [0, 0, 0, 40], [9, 9, 9, 9], [1, 2, 3, 0]])
def test_grouped_matmul_matches_a_per_group_loop(group_sizes):
    rng = np.random.default_rng(4)
    rows = 40  # more rows than sum(group_sizes) in some cases: those give zeros
    lhs = rng.normal(size=(rows, 6)).astype(np.float32)
    rhs = rng.normal(size=(4, 6, 5)).astype(np.float32)
    expected = np.zeros((rows, 5), np.float32)
    start = 0
    for group, size in enumerate(group_sizes):
        expected[start:start + size] = lhs[start:start + size] @ rhs[group]
        start += size
    sizes = jnp.asarray(group_sizes, jnp.int32)
    for fn in (grouped_matmul, blocked_matmul, jax.lax.ragged_dot):
        np.testing.assert_allclose(fn(jnp.asarray(lhs), jnp.asarray(rhs), sizes), expected, rtol=1e-5, atol=1e-5)
    probe = rng.normal(size=(rows, 5)).astype(np.float32)
    grads = [jax.grad(lambda l, r, f=f: jnp.sum(f(l, r, sizes) * probe), argnums=(0, 1))(lhs, rhs)
             for f in (blocked_matmul, jax.lax.ragged_dot)]
    for ours, reference in zip(*grads):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


# -- the TPU branch of grouped_matmul (megablox gmm), run on CPU in Pallas interpret mode --------

@pytest.fixture
def megablox_interpret(monkeypatch):
    """`_megablox_matmul` exactly as the TPU branch calls it, with megablox's `gmm` (forward and
    its own custom-VJP backward, gmm + tgmm) run by the Pallas interpreter instead of Mosaic."""
    import functools

    from jax.experimental.pallas.ops.tpu import megablox
    from jax.experimental.pallas.ops.tpu.megablox import ops

    # `_megablox_matmul` imports `gmm` from the package at call time, so this patch reaches it.
    monkeypatch.setattr(megablox, "gmm", functools.partial(ops.gmm, interpret=True))
    from rmoe_jax.model.dispatch import _megablox_matmul

    return _megablox_matmul


def numpy_grouped_matmul(lhs, rhs, group_sizes, probe):
    """out, d lhs, d rhs of sum(out * probe) by a loop over groups (float64); rows past
    sum(group_sizes) belong to no group: zero output, zero gradient."""
    lhs, rhs, probe = (np.asarray(a, np.float64) for a in (lhs, rhs, probe))
    out, lhs_grad, rhs_grad = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
    start = 0
    for group, size in enumerate(group_sizes):
        rows = slice(start, start + size)
        out[rows] = lhs[rows] @ rhs[group]
        lhs_grad[rows] = probe[rows] @ rhs[group].T
        rhs_grad[group] = lhs[rows].T @ probe[rows]
        start += size
    return out, lhs_grad, rhs_grad


# rows, group sizes (4 groups): sizes off the 128-row tile, empty groups (first, middle, last),
# rows past sum(group_sizes), and a row count the wrapper must pad up to the tile.
MEGABLOX_CASES = [
    (256, [100, 0, 57, 60]),
    (256, [0, 0, 0, 256]),
    (200, [130, 0, 1, 0]),
]


def _megablox_problem(rows, group_sizes, seed=5):
    rng = np.random.default_rng(seed)
    lhs = rng.normal(size=(rows, 128)).astype(np.float32)
    rhs = rng.normal(size=(len(group_sizes), 128, 128)).astype(np.float32)
    probe = rng.normal(size=(rows, 128)).astype(np.float32)
    return lhs, rhs, probe


def output_and_grads(fn, lhs, rhs, sizes, probe):
    """fn(lhs, rhs, sizes) and the gradients of sum(out * probe) wrt lhs and rhs (one program)."""

    @jax.jit
    def run(lhs, rhs):
        out, vjp = jax.vjp(lambda l, r: fn(l, r, sizes), lhs, rhs)
        return (out, *vjp(probe))

    return tuple(np.asarray(a) for a in run(jnp.asarray(lhs), jnp.asarray(rhs)))


@pytest.mark.parametrize("rows,group_sizes", MEGABLOX_CASES)
def test_megablox_branch_matches_per_group_loop_and_cpu_path(megablox_interpret, rows, group_sizes):
    lhs, rhs, probe = _megablox_problem(rows, group_sizes)
    sizes = jnp.asarray(group_sizes, jnp.int32)
    used = sum(group_sizes)
    want_out, want_lhs_grad, want_rhs_grad = numpy_grouped_matmul(lhs, rhs, group_sizes, probe)

    tpu_out, tpu_lhs_grad, tpu_rhs_grad = output_and_grads(megablox_interpret, lhs, rhs, sizes, probe)
    cpu_out, cpu_lhs_grad, cpu_rhs_grad = output_and_grads(blocked_matmul, lhs, rhs, sizes, probe)
    tol = dict(rtol=1e-4, atol=1e-3)  # float32 sums of 128 (rhs grad: up to 256) products of N(0,1)
    np.testing.assert_allclose(tpu_out, want_out, **tol)
    np.testing.assert_array_equal(tpu_out[used:], 0.0)  # rows outside every group: exact zeros
    np.testing.assert_allclose(tpu_rhs_grad, want_rhs_grad, **tol)  # empty groups: zero gradient
    for group, size in enumerate(group_sizes):
        if size == 0:
            np.testing.assert_array_equal(tpu_rhs_grad[group], 0.0)
    # The lhs gradient of rows inside a group (rows past sum(group_sizes): the next test).
    np.testing.assert_allclose(tpu_lhs_grad[:used], want_lhs_grad[:used], **tol)
    # The CPU path, which the TPU branch must agree with.
    np.testing.assert_allclose(cpu_out, want_out, **tol)
    np.testing.assert_allclose(cpu_lhs_grad, want_lhs_grad, **tol)
    np.testing.assert_array_equal(cpu_lhs_grad[used:], 0.0)
    np.testing.assert_allclose(cpu_rhs_grad, want_rhs_grad, **tol)
    np.testing.assert_allclose(tpu_out, cpu_out, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(tpu_rhs_grad, cpu_rhs_grad, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(tpu_lhs_grad[:used], cpu_lhs_grad[:used], rtol=1e-5, atol=1e-4)


def test_megablox_wide_tiles_with_ragged_k_and_n(megablox_interpret):
    """k = 256, n = 384: 1024-row tiles, one k and one n tile (the backward swaps them); the
    0.91B expert shapes (1280 -> 2 x 448, 448 -> 1280) get 1024-row tiles and irregular ones."""
    from rmoe_jax.model.dispatch import gmm_tiling

    assert gmm_tiling(256, 384) == (1024, 256, 384)
    assert gmm_tiling(1280, 896) == (1024, 640, 896) and gmm_tiling(448, 1280) == (1024, 512, 640)
    assert gmm_tiling(4096, 14336) == (1024, 512, 1024) and gmm_tiling(64, 256) == (128, 128, 128)
    rng = np.random.default_rng(3)
    group_sizes = [300, 0, 250, 40]
    lhs = rng.normal(size=(600, 256)).astype(np.float32)
    rhs = rng.normal(size=(4, 256, 384)).astype(np.float32)
    probe = rng.normal(size=(600, 384)).astype(np.float32)
    want = numpy_grouped_matmul(lhs, rhs, group_sizes, probe)
    got = output_and_grads(megablox_interpret, lhs, rhs, jnp.asarray(group_sizes, jnp.int32), probe)
    used = sum(group_sizes)
    for g, w in zip((got[0][:used], got[1][:used], got[2]), (want[0][:used], want[1][:used], want[2])):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-3)


def test_megablox_branch_gives_padding_rows_zero_gradient(megablox_interpret):
    rows, group_sizes = 256, [100, 0, 57, 60]  # rows 217.. belong to no group
    lhs, rhs, probe = _megablox_problem(rows, group_sizes)
    sizes = jnp.asarray(group_sizes, jnp.int32)
    _, lhs_grad, _ = output_and_grads(megablox_interpret, lhs, rhs, sizes, probe)
    np.testing.assert_array_equal(lhs_grad[sum(group_sizes):], 0.0)  # as on CPU (the test above)


@pytest.mark.parametrize("mask_rows", [False, True])
def test_megablox_swiglu_matches_numpy(megablox_interpret, mask_rows):
    """The TPU SwiGLU (w1 and w3 as one gmm, masks only at its ends) against NumPy, values
    and gradients; with rows outside every group those give zeros and get zero gradient."""
    from rmoe_jax.model.dispatch import _megablox_swiglu

    rng = np.random.default_rng(11)
    group_sizes = [120, 0, 57, 60] if mask_rows else [120, 0, 200, 80]
    rows, d, f = 400, 128, 192  # f off the 128 unit: one irregular tile of the fused 2f = 384
    x = rng.normal(size=(rows, d)).astype(np.float32)
    w1, w3 = (rng.normal(size=(4, d, f)).astype(np.float32) / np.sqrt(d) for _ in range(2))
    w2 = rng.normal(size=(4, f, d)).astype(np.float32) / np.sqrt(f)
    probe = rng.normal(size=(rows, d)).astype(np.float32)

    def numpy_swiglu(x, w1, w3, w2):
        out = np.zeros((rows, d))
        start = 0
        for group, size in enumerate(group_sizes):
            xs = x[start:start + size]
            h = xs @ w1[group]
            out[start:start + size] = ((h / (1 + np.exp(-h))) * (xs @ w3[group])) @ w2[group]
            start += size
        return out

    def loss64(*a):
        return np.sum(numpy_swiglu(*a) * probe)

    sizes = jnp.asarray(group_sizes, jnp.int32)
    run = jax.jit(jax.value_and_grad(
        lambda *a: jnp.sum(_megablox_swiglu(*a, sizes, mask_rows) * probe), argnums=(0, 1, 2, 3)))
    value, grads = run(x, w1, w3, w2)
    out = jax.jit(lambda *a: _megablox_swiglu(*a, sizes, mask_rows))(x, w1, w3, w2)
    args64 = [np.asarray(a, np.float64) for a in (x, w1, w3, w2)]
    np.testing.assert_allclose(np.asarray(out), numpy_swiglu(*args64), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(value), loss64(*args64), rtol=1e-4)
    # Gradients by central differences of the float64 NumPy loss along random directions.
    for arg, grad in enumerate(grads):
        direction = rng.normal(size=args64[arg].shape)
        step = 1e-4
        plus, minus = list(args64), list(args64)
        plus[arg] = plus[arg] + step * direction
        minus[arg] = minus[arg] - step * direction
        expected = (loss64(*plus) - loss64(*minus)) / (2 * step)
        np.testing.assert_allclose(float(np.sum(np.asarray(grad, np.float64) * direction)), expected,
                                   rtol=2e-3)
    used = sum(group_sizes)
    np.testing.assert_array_equal(np.asarray(out)[used:], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0])[used:], 0.0)
