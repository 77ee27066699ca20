"""Ahead-of-time compilation for TPU slices without a TPU (`rmoe_jax.aot`, `rmoe_jax.tpu_topology`).

The TPU tests need libtpu (`pip install -r requirements-test.txt`). Without it they fail, on every
machine, so that a missing test dependency can never pass as a skip (CI must prove the TPU path).
A developer who knowingly lacks libtpu can opt out with RMOE_JAX_SKIP_TPU_TESTS=1.
"""

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from rmoe_jax import aot
from rmoe_jax.tpu_topology import (TopologyError, accelerator_type, libtpu_available,
                                   parse_topology, topology_devices)

needs_libtpu = pytest.mark.skipif(
    not libtpu_available() and os.environ.get("RMOE_JAX_SKIP_TPU_TESTS") == "1",
    reason="RMOE_JAX_SKIP_TPU_TESTS=1 and libtpu is not installed (pip install libtpu==0.0.42.1)")


def small_config(dispatch: str = "dropless", **overrides):
    """The tiny config shrunk further so that a TPU compile takes seconds."""
    config = tiny.get_config()
    model = config.model
    model.d_model, model.num_layers, model.num_heads, model.num_kv_heads = 64, 2, 2, 2
    model.moe.num_experts, model.moe.expert_hidden, model.moe.dispatch = 4, 64, dispatch
    model.router.hidden_size = 32
    model.max_seq_len = config.data.seq_len = 64
    model.dtype = "bfloat16"
    config.train.batch_size = 8
    config.mesh.data, config.mesh.expert = 1, 4
    config = aot._variant(config, **overrides)
    return config


# --- no compiler needed --------------------------------------------------------------------


def test_roofline_against_hand_computation():
    chip = aot.CHIPS["v5p"]  # 459e12 FLOP/s, 2.765e12 B/s
    # Compute-bound: 9.18e14 FLOPs / 459e12 = 2.0 s; 1e12 bytes / 2.765e12 = 0.3617 s.
    assert aot.roofline_seconds(9.18e14, 1e12, chip) == pytest.approx(2.0)
    # Memory-bound: 5.53e12 bytes / 2.765e12 = 2.0 s beats 4.59e13 / 459e12 = 0.1 s.
    assert aot.roofline_seconds(4.59e13, 5.53e12, chip) == pytest.approx(2.0)
    report = aot.StepReport("train", argument_bytes=2**30, output_bytes=2**30, temp_bytes=2 * 2**30,
                            alias_bytes=2**30, flops=9.18e14, bytes_accessed=1e12,
                            collectives={"all-to-all": 4, "all-gather": 0})
    assert report.peak_bytes == 3 * 2**30
    # 8 chips, 1,000,000 tokens in 2.0 s = 500,000 tokens/s; model FLOPs 2.9376e15 over
    # 8 chips x 459e12 x 2.0 s = 7.344e15 -> MFU bound 40%; 2.9376e15 / 8 = 367.2 TFLOP per chip,
    # 0.8 s of model compute per chip; memory 1e12 / 2.765e12 = 0.3617 s, so with only the
    # model's FLOPs the roofline would be 0.8 s: 100%.
    table = aot.format_reports([report], devices=8, device_kind="TPU v5", chip=chip,
                               tokens_per_step=1_000_000, model_flops_per_step=2.9376e15)
    row = table.splitlines()[-1]
    assert ("| train | 1.00 | 2.00 | 1.00 | 3.00 | yes | 918 | 367 | 1e+03 | 2 | 0.8 | 0.3617 | 2 "
            "| compute | 500,000 | 40% | 100% | all-to-all 4 |") == row
    # Memory-bound: 5.53e12 bytes -> 2.0 s; model compute 0.8 s -> 40% either way.
    memory_bound = aot.dataclasses.replace(report, bytes_accessed=5.53e12)
    row = aot.format_reports([memory_bound], devices=8, device_kind="TPU v5", chip=chip,
                             tokens_per_step=1_000_000, model_flops_per_step=2.9376e15).splitlines()[-1]
    assert "| 2 | 0.8 | 2 | 2 | memory | 500,000 | 40% | 40% |" in row
    # A compiled count below the model's (a kernel without a cost estimate): 1e14 FLOPs = 0.2179 s,
    # the model's 0.8 s sets the roofline.
    undercounted = aot.dataclasses.replace(report, flops=1e14)
    row = aot.format_reports([undercounted], devices=8, device_kind="TPU v5", chip=chip,
                             tokens_per_step=1_000_000, model_flops_per_step=2.9376e15).splitlines()[-1]
    assert "| 0.2179 | 0.8 | 0.3617 | 0.8 | model compute | 1,250,000 | 100% | 100% |" in row


def test_collectives_are_counted_by_op():
    hlo = """
  %ragged-all-to-all.1 = bf16[64,8]{1,0} ragged-all-to-all(bf16[64,8]{1,0} %a, bf16[64,8]{1,0} %b)
  %all-to-all-start.2 = (s32[4]{0}) all-to-all-start(s32[4]{0} %c)
  %all-to-all-done.2 = s32[4]{0} all-to-all-done((s32[4]{0}) %all-to-all-start.2)
  %all-gather.3 = f32[8]{0} all-gather(f32[2]{0} %d), dimensions={0}
  %fusion.4 = f32[8]{0} fusion(f32[8]{0} %all-gather.3), kind=kLoop, calls=%all-reduce.clone
"""
    counts = aot.count_collectives(hlo)
    assert counts == {"ragged-all-to-all": 1, "all-to-all": 1, "all-gather": 1, "reduce-scatter": 0,
                      "all-reduce": 0, "collective-permute": 0}


def test_fit_problem_names_buffer_and_excess():
    chip = aot.CHIPS["v6e"]  # 32 GiB
    gib = 2**30
    report = aot.StepReport("train", argument_bytes=4 * gib, output_bytes=4 * gib, temp_bytes=33 * gib,
                            alias_bytes=4 * gib, flops=0, bytes_accessed=0, collectives={})
    message = aot.fit_problem(report, chip)
    assert "37.00 GiB per chip, 5.00 GiB over the 32 GiB HBM" in message
    assert "the largest is temporaries" in message
    assert aot.fit_problem(aot.dataclasses.replace(report, temp_bytes=gib), chip) is None


def test_topology_names():
    assert parse_topology("v5p:2x2x1") == ("v5p", (2, 2, 1))
    assert accelerator_type("v5p:2x2x1") == "v5p-8"
    assert accelerator_type("v6e:4x8") == "v6e-32"
    with pytest.raises(TopologyError, match="generation 'v9x' is not one of"):
        parse_topology("v9x:2x2")
    with pytest.raises(TopologyError, match="v5p slices have 3 dimensions"):
        parse_topology("v5p:2x2")
    with pytest.raises(TopologyError, match="expected GENERATION:AxBxC"):
        parse_topology("v6e:2by2")


def test_chip_for_device_kinds():
    assert aot.chip_for("TPU v5").name == "TPU v5p"
    assert aot.chip_for("TPU v5 lite").name == "TPU v5e"
    assert aot.chip_for("TPU v6 lite").name == "TPU v6e"
    assert aot.chip_for("TPU v4").name == "TPU v4"
    assert aot.chip_for("cpu") is None


# --- loop costs (fake CPU devices: fast compiles) -------------------------------------------


def test_loop_costs_count_every_layer_and_micro_batch():
    """XLA counts a loop body once; `scaled_costs` counts every layer and micro-batch."""
    from rmoe_jax import parallel

    config = small_config("capacity", **{"mesh.expert": 1, "model.num_layers": 3})
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    # Two micro-batches of 4: the layer loop and the micro-batch loop both counted.
    accumulated = aot._variant(config, **{"train.grad_accum_steps": 2})
    flops, bytes_accessed = aot.scaled_costs(accumulated, mesh, "train")
    # Against the same step with one batch of 8 and the layer scan fully unrolled (no loop
    # left): the same FLOPs, less one gradient-sized add. (Bytes differ: two micro-batches
    # read the weights twice.)
    unrolled = aot._costs(aot._compile_one(aot._variant(config, **{"model.scan_unroll": 3}), mesh, "train"))
    assert flops == pytest.approx(unrolled[0], rel=0.02)
    assert bytes_accessed > unrolled[1]
    # The real (looped) step's own analysis undercounts.
    looped = aot._costs(aot._compile_one(accumulated, mesh, "train"))
    assert looped[0] < 0.6 * flops
    # And the analytic model FLOPs are within the right range (attention / softmax / norms /
    # gating are extra at this tiny size).
    analytic = aot.model_train_flops(config.model, 8 * 64, 64)
    assert analytic < flops < 3 * analytic


# --- TPU: compiled by libtpu for abstract chips ---------------------------------------------


@needs_libtpu
def test_libtpu_is_installed():
    assert libtpu_available(), ("libtpu is not installed: pip install -r requirements-test.txt "
                                "(or set RMOE_JAX_SKIP_TPU_TESTS=1 to skip the TPU tests knowingly)")


@needs_libtpu
def test_unknown_topology_message():
    with pytest.raises(TopologyError, match="unknown TPU topology 'v5p:3x3x3x3'"):
        topology_devices("v5p:3x3x3x3")


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_tiny_train_step_compiles_for_tpu(topology, dispatch):
    from rmoe_jax import parallel

    devices = topology_devices(topology)
    assert len(devices) == math.prod(parse_topology(topology)[1])
    chip = aot.CHIPS[parse_topology(topology)[0]]
    config = small_config(dispatch)
    mesh = parallel.make_mesh(config.mesh, devices)
    compiled = aot._compile_one(config, mesh, "train")
    report = aot.report_from_compiled("train", compiled)
    assert aot.fit_problem(report, chip) is None
    assert 0 < report.peak_bytes < chip.hbm_bytes
    # Expert parallelism over 4 chips moves tokens: dropless with ragged all-to-alls (rows
    # there, ids there, rows back, and the backward's), capacity with the all-to-alls XLA
    # derives for the capacity buffers' sharding constraints.
    if dispatch == "dropless":
        assert report.collectives["ragged-all-to-all"] >= 3
    else:
        assert report.collectives["all-to-all"] >= 1 and report.collectives["ragged-all-to-all"] == 0
    assert report.flops > 0 and report.bytes_accessed > 0
    half_chip = aot.Chip("test chip", 1e12, 1e12, report.peak_bytes / 2)
    assert "the train step does not fit a test chip" in aot.fit_problem(report, half_chip)
    if dispatch == "dropless":  # the grouped matmul is the Pallas megablox kernel on TPU
        assert "tpu_custom_call" in compiled.as_text()


@needs_libtpu
def test_pallas_kernels_in_the_tpu_train_step():
    """Where their shapes fit, attention (seq a multiple of 128) and the RMoE router's GRU
    (hidden size a multiple of 128) are Pallas kernels on TPU: splash's forward (with
    residuals) and both backward kernels, the GRU's forward and backward, all Mosaic custom
    calls, under a 4-chip expert mesh (the GRU's shard_map over the token rows)."""
    from rmoe_jax import parallel

    config = small_config("capacity", **{"model.d_model": 128, "model.max_seq_len": 128,
                                         "data.seq_len": 128,  # 2 heads of 64, one 128-block
                                         "model.router.hidden_size": 128})
    mesh = parallel.make_mesh(config.mesh, topology_devices("v5p:2x2x1"))
    text = aot._compile_one(config, mesh, "train").as_text()
    assert "tpu_custom_call" in text  # capacity dispatch: no megablox gmm
    for kernel in ("splash_mha_fwd_residuals", "splash_mha_dq_no_residuals",
                   "splash_mha_dkv_no_residuals", "rmoe_gru_forward", "rmoe_gru_backward"):
        assert kernel in text


@needs_libtpu
def test_loop_costs_keep_the_recomputation_on_tpu():
    """Remat `full` recomputes each layer's forward in the backward: per step, L layers'
    forwards more than remat `none`. The reference is the real (looped) step, whose cost
    analysis counts one layer's body: full - none there is exactly one layer's recomputation.
    On TPU, XLA merges the recomputation into the forward once the layers are fully unrolled
    (as `scaled_costs` compiles them) unless remat keeps its barriers there (prevent_cse):
    without them this SMoE step counted 38.3 of the 42.7 MFLOP."""
    from rmoe_jax import parallel

    layers = 3
    costs = {}
    for policy in ("none", "full"):
        config = small_config("dropless", **{"mesh.expert": 1, "mesh.fsdp": -1,
                                             "model.num_layers": layers, "model.remat_policy": policy,
                                             "model.router.name": "linear"})
        mesh = parallel.make_mesh(config.mesh, topology_devices("v5p:2x2x1"))
        looped = aot._costs(aot._compile_one(config, mesh, "train"))[0]
        costs[policy] = (aot.scaled_costs(config, mesh, "train")[0], looped)
    one_layer_recompute = costs["full"][1] - costs["none"][1]
    assert one_layer_recompute > 0
    assert costs["full"][0] - costs["none"][0] == pytest.approx(layers * one_layer_recompute, rel=0.02)


@needs_libtpu
def test_tpu_gating_gradient_has_no_scatter():
    """The top-k weights' gradient and the expert counts compile to no scatter on TPU: XLA
    serialises a scatter there (its cost model charges top_k's own gradient, a scatter into
    `[N * E]`, 21.6 GB at 20,480 tokens x 16 experts; the one-hot forms cost megabytes)."""
    from jax.sharding import SingleDeviceSharding

    from rmoe_jax.model import gating

    def objective(logits):
        probs, weights, indices = gating.top_k_gating(logits, 4)
        fractions = gating.expert_fractions(indices, 16)
        counts = gating.count_per_value(indices, 16).astype(jnp.float32)
        return jnp.sum(weights ** 2) + jnp.sum(fractions * jnp.mean(probs, 0)) + jnp.sum(counts)

    device = topology_devices("v5p:2x2x1")[0]
    logits = jax.ShapeDtypeStruct((2048, 16), jnp.float32, sharding=SingleDeviceSharding(device))
    text = jax.jit(jax.grad(objective)).lower(logits).compile().as_text()
    # The opcode, as in `f32[32768]{0} scatter(...)`; names and metadata may say "scatter".
    assert not re.search(r"\sscatter\(", text)


@needs_libtpu
def test_tpu_row_gather_has_no_fill_select():
    """The dispatch's row gathers (`dispatch.take_rows`: sorted rows, capacity slots) compile
    to XLA's gather alone on TPU, forward and backward: jnp.take's default fill mode adds a
    select over every gathered `[rows, d]` (a second pass over the rows)."""
    from jax.sharding import SingleDeviceSharding

    from rmoe_jax.model import dispatch

    def objective(x, order):
        return jnp.sum(dispatch.take_rows(x, order // 4).astype(jnp.float32) ** 2)

    device = SingleDeviceSharding(topology_devices("v5p:2x2x1")[0])
    x = jax.ShapeDtypeStruct((2048, 256), jnp.bfloat16, sharding=device)
    order = jax.ShapeDtypeStruct((8192,), jnp.int32, sharding=device)
    text = jax.jit(jax.grad(objective)).lower(x, order).compile().as_text()
    assert " gather(" in text
    assert not re.search(r"\[8192,256\]\S* select\(", text)
    # And the rows are those of NumPy indexing (in-bounds indices; CPU).
    values = np.arange(12.0, dtype=np.float32).reshape(6, 2)
    rows = np.array([5, 0, 0, 3], np.int32)
    np.testing.assert_array_equal(np.asarray(dispatch.take_rows(jnp.asarray(values), jnp.asarray(rows))),
                                  values[rows])


@needs_libtpu
def test_tpu_rope_writes_no_float32_copies_of_q_and_k():
    """On TPU the attention block (RoPE, splash) compiles without float32 copies of q or k
    (`[batch, seq, heads, head_dim]` in another layout), forward or backward: `rotary_embedding`
    computes head-major, in the splash kernel's layout (`transformer._rope_head_major`)."""
    from jax.sharding import SingleDeviceSharding

    from rmoe_jax.model.transformer import Attention

    batch, seq, d_model, heads = 2, 1024, 256, 4
    attention = Attention(num_heads=heads, num_kv_heads=heads, head_dim=64, dtype=jnp.bfloat16)
    device = SingleDeviceSharding(topology_devices("v6e:2x2")[0])
    x = jax.ShapeDtypeStruct((batch, seq, d_model), jnp.bfloat16, sharding=device)
    positions = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=device)
    params = jax.eval_shape(attention.init, jax.random.key(0), x, positions)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=device), params)

    def objective(params, x, positions):
        return jnp.sum(attention.apply(params, x, positions).astype(jnp.float32) ** 2)

    text = jax.jit(jax.grad(objective, argnums=(0, 1))).lower(params, x, positions).compile().as_text()
    assert "tpu_custom_call" in text  # the splash kernel
    copies = re.findall(r"= f32\[2,(?:1024,4|4,1024),64\]\{[^}]*\} copy\(", text)
    assert not copies, copies


@needs_libtpu
def test_layer_parts_count_the_math_they_compile(capsys):
    """`--steps parts`: the grouped experts' compiled FLOPs are the SwiGLU's own math (megablox
    counts 2 m k n per matmul, the backward twice that; 1024 rows fill its row tiles exactly), the row gather writes at
    least its k x tokens rows, every gradient costs more than its forward, and the CLI's table
    names every part."""
    from rmoe_jax import layer_parts

    config = small_config(**{"mesh.expert": 1, "mesh.fsdp": 4, "train.batch_size": 16,
                             "train.grad_accum_steps": 4})
    model = config.model
    sequences, seq_len = 8, 64  # 512 tokens x top-2 = 1024 rows
    devices = topology_devices("v5p:2x2x1")
    parts = {p.name.strip(): p for p in layer_parts.part_costs(model, sequences, seq_len, devices[0])}
    rows, d_model, hidden = 2 * sequences * seq_len, model.d_model, model.moe.expert_hidden
    swiglu_gflop = (2 * rows * d_model * 2 * hidden + 2 * rows * hidden * d_model) / 1e9
    experts = parts["of which the experts (grouped SwiGLU)"]
    # On top of the matmuls: the SwiGLU's elementwise silu and product (a few % at d = 64).
    assert swiglu_gflop <= experts.forward_gflop <= 1.05 * swiglu_gflop
    assert 3 * swiglu_gflop <= experts.gradient_gflop <= 1.05 * 3 * swiglu_gflop
    gather = parts["of which the dispatch row gather"]
    assert gather.gradient_gb is None and gather.forward_gb >= rows * d_model * 2 / 1e9
    for part in parts.values():
        if part.gradient_gb is not None:
            assert part.gradient_gb > part.forward_gb > 0, part
    aot.print_layer_parts(config, devices, with_layer=False)
    table = capsys.readouterr().out
    assert "1 x 64 tokens per chip" in table  # 16 sequences over 4 chips, 4 micro-batches
    for name in ("attention block", "MoE block", "of which the router"):
        assert f"| {name} |" in table or f"|   {name} |" in table
