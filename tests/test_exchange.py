"""Bounded expert-parallel exchange blocks (moe.exchange_factor) on 8 fake CPU devices.

References: the ragged all-to-all's definition written as NumPy loops (for the dense form that
stands in for `jax.lax.ragged_all_to_all` on CPU), a NumPy MoE that drops exactly the rows a
full block cannot hold (counted by a plain loop), the single-device model, and, for an
overflowing dropless run, the same run with worst-case blocks.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rmoe_jax.model.expert_parallel import BATCH_AXES, exchange_block_rows, expert_parallel_dispatch
from rmoe_jax.model import build_model
from rmoe_jax.model.ragged_exchange import dense_ragged_all_to_all

from helpers import random_params, small_model
from test_mesh import loss_fn, make_mesh, sharded_loss_and_grads
from train_helpers import tiny_config


def test_block_rows():
    # Worst case: a token sends at most min(k, E/X) rows to one shard.
    assert exchange_block_rows(100, 4, 16, 8, 0.0) == 100 * 2
    assert exchange_block_rows(100, 2, 16, 4, 0.0) == 100 * 2
    # 1.25 x the balanced share 100 * 4 / 8 = 50 -> 62.5 -> 63 -> 64 (multiple of 8).
    assert exchange_block_rows(100, 4, 16, 8, 1.25) == 64
    assert exchange_block_rows(100, 4, 16, 8, 100.0) == 200  # capped at the worst case


def numpy_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets):
    """The collective from its definition, all devices at once (leading axis = device): device
    i sends operand[i][input_offsets[i, s] : + send_sizes[i, s]] to device s, which writes it
    at output_offsets[i, s]. -> (result, which output rows were written)."""
    result, written = output.copy(), np.zeros(output.shape[:2], bool)
    for i in range(operand.shape[0]):
        for s in range(operand.shape[0]):
            rows = operand[i, input_offsets[i, s]:input_offsets[i, s] + send_sizes[i, s]]
            result[s, output_offsets[i, s]:output_offsets[i, s] + len(rows)] = rows
            written[s, output_offsets[i, s]:output_offsets[i, s] + len(rows)] = True
    return result, written


def test_dense_ragged_all_to_all_is_the_collective():
    """Random slices (some empty, some full), disjoint landing places in a random order of
    senders, gaps between them; values and both gradients against the NumPy definition."""
    devices, rows_in, rows_out, max_slice, width = 8, 20, 48, 5, 3
    rng = np.random.default_rng(0)
    send_sizes = rng.integers(0, max_slice + 1, (devices, devices)).astype(np.int32)
    send_sizes[0, 1], send_sizes[2, 3] = 0, max_slice
    input_offsets = rng.integers(0, rows_in - max_slice + 1, (devices, devices)).astype(np.int32)
    output_offsets = np.zeros((devices, devices), np.int32)
    for receiver in range(devices):  # senders land in a random order, with random gaps
        free = rows_out - int(send_sizes[:, receiver].sum())
        gaps = np.diff(np.sort(rng.integers(0, free + 1, devices + 1)))
        place = 0
        for sender, gap in zip(rng.permutation(devices), gaps):
            place += int(gap)
            output_offsets[sender, receiver] = place
            place += int(send_sizes[sender, receiver])
    recv_sizes = send_sizes.T.copy()
    operand = rng.normal(size=(devices, rows_in, width)).astype(np.float32)
    output = rng.normal(size=(devices, rows_out, width)).astype(np.float32)
    cotangent = rng.normal(size=output.shape).astype(np.float32)

    mesh = make_mesh((1, 1, 8, 1))
    per_device = P("expert")

    def collective(operand, output, *plan):
        body = lambda *a: dense_ragged_all_to_all(*(v[0] for v in a), axis_name="expert",
                                                  max_slice=max_slice)[None]
        return jax.shard_map(body, mesh=mesh, in_specs=(per_device,) * 6, out_specs=per_device,
                             check_vma=False)(operand, output, *plan)

    plan = [jnp.asarray(v) for v in (input_offsets, send_sizes, output_offsets, recv_sizes)]
    result, (grad_operand, grad_output) = jax.jit(lambda a, b: (
        collective(a, b, *plan),
        jax.grad(lambda a, b: jnp.sum(collective(a, b, *plan) * cotangent), (0, 1))(a, b)))(
            operand, output)
    expected, written = numpy_ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                                output_offsets)
    np.testing.assert_array_equal(np.asarray(result), expected)
    # d/d operand: each sent row collects the cotangent where it landed; d/d output: the
    # cotangent where nothing landed.
    expected_grad_operand = np.zeros_like(operand)
    for i in range(devices):
        for s in range(devices):
            for r in range(send_sizes[i, s]):
                expected_grad_operand[i, input_offsets[i, s] + r] += cotangent[s, output_offsets[i, s] + r]
    np.testing.assert_allclose(np.asarray(grad_operand), expected_grad_operand, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad_output), np.where(written[..., None], 0, cotangent))


def swiglu(x, w1, w3, w2):
    h = x @ w1
    return ((h / (1 + np.exp(-h))) * (x @ w3)) @ w2


def numpy_exchange(x, weights, indices, experts, *, devices, expert_shards, block):
    """The bounded exchange from its definition: each device's rows sorted by expert, then by
    slot (every first choice before any second choice), then by token; a shard's block keeps
    its first `block` rows; -> (y, dropped rows)."""
    w1, w3, w2 = (np.asarray(w, np.float64) for w in experts)
    num_experts = w1.shape[0]
    local_experts = num_experts // expert_shards
    n = x.shape[0] // devices
    y = np.zeros(x.shape, np.float64)
    dropped = 0
    for device in range(devices):
        rows = [(int(indices[t, s]), s, t) for t in range(device * n, (device + 1) * n)
                for s in range(indices.shape[1])]
        rows.sort()
        filled = [0] * expert_shards
        for expert, s, t in rows:
            shard = expert // local_experts
            if filled[shard] < block:
                filled[shard] += 1
                y[t] += weights[t, s] * swiglu(np.asarray(x[t], np.float64), w1[expert],
                                               w3[expert], w2[expert])
            else:
                dropped += 1
    return y, dropped


def run_dispatch(mesh, x, weights, indices, experts, factor):
    batch = NamedSharding(mesh, P(BATCH_AXES))
    up, down = NamedSharding(mesh, P("expert", None, "tensor")), NamedSharding(mesh, P("expert", "tensor", None))
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda *a: expert_parallel_dispatch(mesh, *a[:3], a[3:], 8, factor),
                     in_shardings=(batch, batch, batch, up, up, down))
        return jax.device_get(fn(x, weights, indices, *experts))


@pytest.mark.parametrize("factor", [0.5, 1.0, 0.0])
def test_forced_routing_drops_what_numpy_counts(factor):
    mesh = make_mesh((2, 1, 4, 1))  # 8 devices, 4 expert shards of 2 experts
    rng = np.random.default_rng(0)
    tokens, d, f, k = 64, 8, 16, 2
    x = rng.normal(size=(tokens, d)).astype(np.float32)
    weights = rng.uniform(0.1, 1.0, size=(tokens, k)).astype(np.float32)
    # Three quarters of the tokens pick experts 0 and 1, both on shard 0; the rest are random.
    # A device's first four tokens pick (0, 1), its last four (1, 0): expert 1's run then holds
    # second choices of earlier tokens and first choices of later ones, so which of its rows a
    # full block keeps depends on the drop order (first choices first).
    indices = np.stack([rng.choice(8, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)
    skewed = rng.random(tokens) < 0.75
    later = (np.arange(tokens) % (tokens // 8) >= tokens // 16)[:, None]
    indices[skewed] = np.where(later, [1, 0], [0, 1])[skewed]
    experts = [rng.normal(size=s).astype(np.float32) * 0.3 for s in ((8, d, f), (8, d, f), (8, f, d))]
    y, dropped = run_dispatch(mesh, x, weights, indices, experts, factor)
    block = exchange_block_rows(tokens // 8, k, 8, 4, factor)
    expected_y, expected_dropped = numpy_exchange(x, weights, indices, experts, devices=8,
                                                  expert_shards=4, block=block)
    assert int(dropped) == expected_dropped
    assert (expected_dropped > 0) == (factor > 0)  # the skew overflows every bounded block
    np.testing.assert_allclose(y, expected_y, rtol=2e-5, atol=2e-5)


def test_bounded_blocks_equal_single_device_when_nothing_overflows():
    mesh = make_mesh((1, 2, 4, 1))
    cfg = small_model("recurrent", **{"moe.exchange_factor": 3.5, "moe.num_experts": 8,
                                      "max_seq_len": 32})
    model = build_model(cfg)
    params = random_params(cfg, scale=0.1)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 33)), jnp.int32)
    loss, dropped, grads, hlo, _ = sharded_loss_and_grads(mesh, model, params, tokens)
    assert float(np.max(dropped)) == 0.0 and "all-to-all" in hlo
    local_tokens = 8 * 32 // 8
    block = exchange_block_rows(local_tokens, 2, 8, 4, 3.5)
    assert block < local_tokens * 2  # really smaller than the worst case
    ref_loss, ref_grads = jax.value_and_grad(lambda p: loss_fn(model, p, tokens))(params)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-6)


def test_overflowing_dropless_run_is_rerun_exactly(tmp_path, capsys):
    """A dropless run whose bounded blocks overflow on every step gives the losses of the
    worst-case-block run: each overflowing step is kept back and run again."""
    from rmoe_jax.train import run

    settings = dict(mesh__data=2, mesh__expert=4, model__moe__num_experts=8,
                    train__num_steps=2, train__eval_every=0, train__checkpoint_every=2,
                    train__log_every=1, train__schedule="constant", train__warmup_steps=1)
    exact = run(tiny_config(**settings), str(tmp_path / "exact"))
    capsys.readouterr()
    bounded = run(tiny_config(model__moe__exchange_factor=0.05, **settings), str(tmp_path / "bounded"))
    out = capsys.readouterr().out
    assert out.count("re-running the step with worst-case blocks") == 2, out
    assert math.isclose(bounded["train_loss"], exact["train_loss"], rel_tol=1e-6)
