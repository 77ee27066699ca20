"""Compile the real train, eval and decode steps ahead of time for devices we may not have.

    # a TPU pod slice, compiled on this CPU by libtpu (`pip install libtpu==0.0.42.1`):
    python -m rmoe_jax.aot --config configs/llama_0p91b.py --topology v5p:4x4x2 \
        --config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.expert=8 \
        --config.train.grad_accum_steps=7 [--steps train,eval,decode]
    # 8 fake CPU devices:
    python -m rmoe_jax.aot --config configs/llama_0p91b.py --cpu_devices 8 \
        --config.mesh.fsdp=8 --config.mesh.data=1 --config.train.grad_accum_steps=140
    # where one layer's bytes go (its parts compiled alone on one chip; rmoe_jax.layer_parts):
    python -m rmoe_jax.aot --config configs/llama_0p91b.py --topology v6e:4x8 --steps parts

Lowers and compiles with abstract inputs (`jax.ShapeDtypeStruct`s carrying shardings): nothing
is allocated. Prints, per step, the per-chip argument / temp / output memory against the chip's
HBM, FLOPs and bytes per step, a roofline step time from the chip's bf16 peak and HBM bandwidth,
tokens/s and the MFU bound it implies, and the collectives in the compiled program. Memory and
collectives are the real step's; FLOPs and bytes come from loop-free cost-only compiles
(`scaled_costs`: XLA's cost analysis counts a loop body once). A step that does not fit the
chip's HBM is named with the buffer and the excess (exit status 1); an unknown topology name
fails before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import re
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from rmoe_jax import cli
from rmoe_jax.config import eval_batch_size, set_fields

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Compile for this many (fake) CPU devices.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "A TPU topology, e.g. v5p:2x2x1 or v6e:4x4.")
_STEPS = flags.DEFINE_list("steps", ["train", "eval", "decode"],
                           "Which steps to compile: train, eval, decode (one KV-cache token); parts: where one "
                           "layer's bytes go (rmoe_jax.layer_parts).")
_LOOP_COSTS = flags.DEFINE_bool(
    "loop_costs", True, "FLOPs/bytes with every layer and micro-batch counted (extra small "
    "unrolled compiles, see scaled_costs); off: XLA's numbers for the real step (loops once).")

WORST_CASE_BUFFERS_NOTE = (
    "Note: dropless expert parallelism receives into a buffer of expert x block rows, the "
    "block by default the exact worst case (n x min(k, E / expert) rows per sender for n local "
    "tokens). The ragged all-to-alls move only the filled rows, but the compiled FLOPs/bytes "
    "count the buffers whole (megablox gmm's cost estimate is 2*m*k*n for the static m, though "
    "its grid visits only the filled tiles); 'model TFLOPs/chip' is what the math needs. "
    "--config.model.moe.exchange_factor=1.25 sizes the blocks at 1.25x the balanced share "
    "(an overflowing step is re-run with worst-case blocks).")

COLLECTIVES = ("ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip numbers: dense bf16 peak FLOP/s, HBM bytes/s and HBM capacity."""

    name: str
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: float


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 1.2e12, 32 * 2**30),
    "v5e": Chip("TPU v5e", 197e12, 0.819e12, 16 * 2**30),
    "v5p": Chip("TPU v5p", 459e12, 2.765e12, 95 * 2**30),
    "v6e": Chip("TPU v6e", 918e12, 1.64e12, 32 * 2**30),
}


@dataclasses.dataclass
class StepReport:
    """What one compiled step costs on each device."""

    name: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops: float
    bytes_accessed: float
    collectives: dict[str, int]

    @property
    def peak_bytes(self) -> int:
        """Live at once: arguments + outputs + temporaries, less outputs aliased to donated args."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def roofline_seconds(flops: float, bytes_accessed: float, chip: Chip) -> float:
    """The step can go no faster than its compute or its HBM traffic allows."""
    return max(flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Occurrences of each collective op (sync or async-start form) in HLO text."""
    # (?<![\w-]): `all-to-all` does not count the `ragged-all-to-all`s.
    return {op: len(re.findall(rf"(?<![\w-]){op}(-start)?\(", hlo_text)) for op in COLLECTIVES}


def report_from_compiled(name: str, compiled: Any) -> StepReport:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return StepReport(
        name=name,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        collectives=count_collectives(compiled.as_text()),
    )


def chip_for(device_kind: str) -> Chip | None:
    """The chip of a device kind: 'TPU v5' is a v5p, 'TPU v5 lite' a v5e, 'TPU v6 lite' a v6e."""
    kind = device_kind.lower().replace(" ", "")
    if kind in ("tpuv5", "tpuv5p"):
        return CHIPS["v5p"]
    for key in ("v5p", "v5e", "v5lite", "v6e", "v6lite", "v4"):
        if key in kind:
            return CHIPS[{"v5lite": "v5e", "v6lite": "v6e"}.get(key, key)]
    return None


def _compile_one(config, mesh, name: str, *, identity_optimizer: bool = False):
    """Lower and compile one step ('train', 'eval' or 'decode') of `config` with abstract inputs."""
    logging.info("compiling the %s step: %d layers (unroll %d), batch %d, %d micro-batches%s", name,
                 config.model.num_layers, config.model.get("scan_unroll", 1), config.train.batch_size,
                 config.train.grad_accum_steps, ", identity optimizer" if identity_optimizer else "")
    import flax.linen as nn
    import jax

    from rmoe_jax import parallel
    from rmoe_jax.train.experiment import build_experiment

    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.rules_from_config(config.mesh)):
        experiment = build_experiment(config, mesh, seed=0, identity_optimizer=identity_optimizer)
        state = experiment.restore_target
        if name == "train":
            return experiment.train_step().lower(
                state, experiment.abstract_batch(config.train.batch_size)).compile()
        if name == "eval":
            batch = experiment.abstract_batch(eval_batch_size(config.train))
            return experiment.eval_step().lower(state.params, batch).compile()
        if name == "decode":
            return _compile_decode(config, mesh, state.params, experiment.state_shardings.params)
    raise ValueError(f"unknown step {name!r}: choose train, eval or decode")


def _compile_decode(config, mesh, params, params_sh):
    """One KV-cache decode step: one new token per sequence, cache as long as data.seq_len."""
    import jax
    import jax.numpy as jnp

    from rmoe_jax import parallel
    from rmoe_jax.model.decode import decode_model, extend

    model = decode_model(config.model)
    batch = eval_batch_size(config.train)
    seq_len = int(config.data.seq_len)
    cache = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                              jnp.zeros((batch, seq_len), jnp.int32)))["cache"]
    batch_axes = parallel.BATCH_AXES
    # Cache leaves `[L, batch, len, kv_heads, head_dim]` split over the batch axes like the data;
    # the write index `[L]` replicated.
    cache_sh = jax.tree.map(
        lambda s: jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, batch_axes) if s.ndim >= 2 else
            jax.sharding.PartitionSpec()), cache)
    cache = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), cache, cache_sh)
    tokens_sh = parallel.batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=tokens_sh)
    step = jax.jit(lambda p, c, t: extend(model, p, c, t),
                   in_shardings=(params_sh, cache_sh, tokens_sh),
                   out_shardings=(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes)),
                                  cache_sh),
                   donate_argnums=1)
    return step.lower(params, cache, tokens).compile()


def _variant(config, **fields):
    """A copy of `config` with dotted fields replaced (`model.num_layers=2`)."""
    copy = config.copy_and_resolve_references()
    copy.unlock()
    return set_fields(copy, fields)


def _costs(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def scaled_costs(config, mesh, name: str) -> tuple[float, float]:
    """FLOPs and bytes per device of one whole step, with every loop iteration counted.

    XLA's cost analysis counts a while loop's body once, and the real step has two loops: the
    `nn.scan` over layers and (train, `grad_accum_steps = k > 1`) the `lax.scan` over
    micro-batches. So the costs come from loop-free variants of the same step, each compiled
    for the same mesh with the layer scan fully unrolled (`model.scan_unroll`) and one
    micro-batch per step:
      S(l)  the train step (or eval / decode step) of l layers, batch = one micro-batch;
      G(l)  the same train step with an identity optimizer: the gradient of one micro-batch
            (what the accumulation loop runs k times) plus one param-sized add.
    Fully unrolled, remat keeps its CSE barriers (`transformer._layer_stack`), so XLA cannot
    fold the recomputation into the forward, which the real step's separate loops rule out too.
    Every per-layer cost is the same, so X(L) = X(1) + (L - 1) * (X(2) - X(1)) is exact for
    L layers from the two small compiles; then train = S(L) + (k - 1) * G(L).
    """
    layers = int(config.model.num_layers)
    accum = int(config.train.grad_accum_steps) if name == "train" else 1
    base = {"train.grad_accum_steps": 1}
    if name == "train":
        base["train.batch_size"] = int(config.train.batch_size) // accum

    def at_layers(identity: bool) -> tuple[float, float]:
        counts = (1, 2) if layers > 1 else (1,)
        costs = [_costs(_compile_one(_variant(config, **base, **{"model.num_layers": n,
                                                                 "model.scan_unroll": n}),
                                     mesh, name, identity_optimizer=identity)) for n in counts]
        if layers == 1:
            return costs[0]
        return tuple(one + (layers - 1) * (two - one) for one, two in zip(*costs))

    flops, bytes_accessed = at_layers(False)
    if accum > 1:
        grad_flops, grad_bytes = at_layers(True)
        flops += (accum - 1) * grad_flops
        bytes_accessed += (accum - 1) * grad_bytes
    return flops, bytes_accessed


def layer_gradient_costs(config, mesh) -> tuple[float, float]:
    """GB and GFLOP per device of one layer's share of one micro-batch's gradient: G(2) - G(1)
    of `scaled_costs` (forward, rematerialisation and backward of one decoder layer)."""
    accum = int(config.train.grad_accum_steps)
    base = {"train.grad_accum_steps": 1, "train.batch_size": int(config.train.batch_size) // accum}
    one, two = (_costs(_compile_one(_variant(config, **base, **{"model.num_layers": n,
                                                                "model.scan_unroll": n}),
                                    mesh, "train", identity_optimizer=True)) for n in (1, 2))
    return (two[1] - one[1]) / 1e9, (two[0] - one[0]) / 1e9


def print_layer_parts(config, devices, *, with_layer: bool = True) -> None:
    """`--steps parts`: the table of `layer_parts` for one chip's share of one micro-batch, and
    the whole layer's gradient on the config's mesh to compare it with."""
    from rmoe_jax import layer_parts, parallel

    mesh = parallel.make_mesh(config.mesh, devices)
    shards = math.prod(mesh.shape[axis] for axis in parallel.BATCH_AXES if axis in mesh.shape)
    micro_batch = int(config.train.batch_size) // int(config.train.grad_accum_steps)
    if micro_batch % shards:
        raise ValueError(f"train.batch_size / train.grad_accum_steps = {micro_batch} sequences do "
                         f"not split over the {shards} batch shards of the mesh")
    sequences = micro_batch // shards
    parts = layer_parts.part_costs(config.model, sequences, int(config.data.seq_len), devices[0])
    layer = layer_gradient_costs(config, mesh) if with_layer else (None, None)
    remat = config.model.get("remat_policy", "none") != "none"
    print(f"\none layer, {sequences} x {config.data.seq_len} tokens per chip (one micro-batch), "
          f"remat {config.model.get('remat_policy', 'none')}, XLA's cost analysis on "
          f"{devices[0].device_kind}:")
    print(layer_parts.format_parts(parts, remat=remat, layer_gb=layer[0], layer_gflop=layer[1]))


def compile_steps(config, devices, steps=("train", "eval"), *, loop_costs: bool = True) -> list[StepReport]:
    """Lower and compile the steps of `config` over `devices` (abstract inputs, nothing allocated).

    Memory and collectives come from the real compiled step. With `loop_costs` the FLOPs and
    bytes are those of `scaled_costs` (every loop iteration counted); without, the compiled
    step's own cost analysis (each loop body counted once: an undercount).
    """
    from rmoe_jax import parallel

    mesh = parallel.make_mesh(config.mesh, devices)
    problems = parallel.fit_problems(mesh, num_experts=config.model.moe.num_experts,
                                     global_batch=config.train.batch_size,
                                     micro_batches=config.train.grad_accum_steps)
    if problems:
        raise ValueError("the config does not fit the mesh:\n  " + "\n  ".join(problems))
    reports = []
    for name in steps:
        report = report_from_compiled(name, _compile_one(config, mesh, name))
        logging.info("compiled the %s step: %s", name, report)
        if loop_costs:
            report.flops, report.bytes_accessed = scaled_costs(config, mesh, name)
        reports.append(report)
    return reports


def fit_problem(report: StepReport, chip: Chip) -> str | None:
    """Why `report`'s step does not fit `chip`'s HBM (the buffers and how much over), or None."""
    if report.peak_bytes <= chip.hbm_bytes:
        return None
    gib = 2**30
    buffers = {"arguments (the train state / params)": report.argument_bytes,
               "temporaries (activations, gradients, collectives' buffers)": report.temp_bytes,
               "outputs not aliased to donated arguments": report.output_bytes - report.alias_bytes}
    largest = max(buffers, key=buffers.get)
    parts = ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in buffers.items())
    return (f"the {report.name} step does not fit a {chip.name} chip: it needs "
            f"{report.peak_bytes / gib:.2f} GiB per chip, {(report.peak_bytes - chip.hbm_bytes) / gib:.2f} "
            f"GiB over the {chip.hbm_bytes / gib:.0f} GiB HBM ({parts}); the largest is {largest}. "
            f"More micro-batches (--config.train.grad_accum_steps), more chips on fsdp/expert, or a "
            f"remat policy shrink the temporaries; fsdp/expert shrink the arguments.")


def step_tokens(config, name: str) -> int:
    """Tokens one step processes: a batch of sequences (train, eval) or one per sequence (decode)."""
    batch = int(config.train.batch_size) if name == "train" else eval_batch_size(config.train)
    return batch if name == "decode" else batch * int(config.data.seq_len)


def format_reports(reports: list[StepReport], *, devices: int, device_kind: str, chip: Chip | None,
                   tokens_per_step: int | dict, model_flops_per_step: float,
                   loop_costs: bool = True) -> str:
    """A markdown table, one row per step. `tokens_per_step`: an int, or a dict by step name.
    Without `loop_costs` the FLOPs/bytes are XLA's loop-once undercount: no roofline from them.

    Times per step: `compute` = compiled FLOPs / peak, `model compute` = the analytic model
    FLOPs / peak (train only), `memory` = compiled bytes / HBM bandwidth. The roofline is
    max(compute, model compute, memory): the model's FLOPs count too because some kernels carry
    no cost estimate (XLA counts ~nothing for the Pallas splash attention), so the compiled
    count alone could undercount; `bound` says which term sets it. `MFU bound` = model compute
    / roofline; `MFU bound, model FLOPs` = model compute / max(model compute, memory): only the
    model's FLOPs, as MaxText counts MFU (it differs where the compiled count is larger: a
    kernel's estimate counting its whole static buffer, as megablox `gmm` does, or remat's
    recomputed forward).
    """
    gib = 2**30
    lines = [f"{devices} x {device_kind}" + (f" ({chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
                                             f"{chip.hbm_bandwidth / 1e12:.2f} TB/s, "
                                             f"{chip.hbm_bytes / gib:.0f} GiB HBM)" if chip else ""),
             "",
             "| step | args GiB | temp GiB | output GiB | peak GiB/chip | fits | TFLOPs/chip | "
             "model TFLOPs/chip | GB accessed/chip | compute s | model compute s | memory s | "
             "roofline s | bound | tokens/s | MFU bound | MFU bound, model FLOPs | collectives |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in reports:
        tokens_step = tokens_per_step[r.name] if isinstance(tokens_per_step, dict) else tokens_per_step
        fits = "-" if chip is None else ("yes" if r.peak_bytes <= chip.hbm_bytes else
                                         f"NO: {(r.peak_bytes - chip.hbm_bytes) / gib:.1f} GiB over")
        train = r.name == "train"
        cells = ["-"] * 8  # compute, model compute, memory, roofline, bound, tokens/s, 2 x MFU
        if chip is not None and loop_costs:
            compute = r.flops / chip.peak_flops
            memory = r.bytes_accessed / chip.hbm_bandwidth
            model = model_flops_per_step / devices / chip.peak_flops if train else 0.0
            seconds = max(roofline_seconds(r.flops, r.bytes_accessed, chip), model)
            cells[0], cells[2], cells[3] = f"{compute:.4g}", f"{memory:.4g}", f"{seconds:.4g}"
            cells[4] = ("memory" if memory >= max(compute, model) else
                        "compute" if compute >= model else "model compute")
            cells[5] = f"{tokens_step / seconds:,.0f}"
            if train:
                cells[1] = f"{model:.4g}"
                cells[6] = f"{model / seconds:.0%}"
                cells[7] = f"{model / max(model, memory):.0%}"
        collectives = ", ".join(f"{k} {v}" for k, v in r.collectives.items() if v) or "none"
        model_tflops = f"{model_flops_per_step / devices / 1e12:.3g}" if train else "-"
        lines.append(f"| {r.name} | {r.argument_bytes / gib:.2f} | {r.temp_bytes / gib:.2f} | "
                     f"{r.output_bytes / gib:.2f} | {r.peak_bytes / gib:.2f} | {fits} | "
                     f"{r.flops / 1e12:.3g} | {model_tflops} | {r.bytes_accessed / 1e9:.3g} | "
                     + " | ".join(cells) + f" | {collectives} |")
    return "\n".join(lines)


def model_train_flops(model_config, tokens: int, seq_len: int) -> float:
    """6 x active params x tokens, plus causal attention scores (6 * L * s * d per token / 2 * 2)."""
    from rmoe_jax.model import count_params

    active = count_params(model_config)["active"]
    attention = 6 * model_config.num_layers * seq_len * model_config.d_model  # QK^T and AV, causal
    return float(tokens) * (6 * active + attention)


def main(argv):
    del argv
    config = _CONFIG.value
    if _CPU_DEVICES.value:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if _TOPOLOGY.value:
        from rmoe_jax.tpu_topology import TopologyError, configure_libtpu_env, parse_topology

        try:
            generation, _ = parse_topology(_TOPOLOGY.value)
        except TopologyError as error:  # a command-line mistake: one line, exit status 2
            print(f"error: --topology {_TOPOLOGY.value}: {error}", file=sys.stderr, flush=True)
            return 2
        configure_libtpu_env(_TOPOLOGY.value)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; the TPU is abstract
    import jax

    if _TOPOLOGY.value:
        from rmoe_jax.tpu_topology import topology_devices

        devices = topology_devices(_TOPOLOGY.value)
        chip = CHIPS[generation]
    else:
        devices = jax.devices()
        chip = chip_for(devices[0].device_kind)
    device_kind = devices[0].device_kind
    steps = tuple(name for name in _STEPS.value if name != "parts")
    if "parts" in _STEPS.value:
        print_layer_parts(config, devices)
        if not steps:
            return 0
    tokens = {name: step_tokens(config, name) for name in steps}
    reports = []
    for name in steps:  # progress on stderr as each step compiles (0.91B steps take minutes)
        reports += compile_steps(config, devices, (name,), loop_costs=_LOOP_COSTS.value)
        print(f"compiled the {name} step", file=sys.stderr, flush=True)
    print(f"\n{config.model.router.name} router, dispatch {config.model.moe.dispatch}, mesh "
          + " ".join(f"{a}={config.mesh[a]}" for a in ("data", "fsdp", "expert", "tensor"))
          + f", grad_accum_steps {config.train.grad_accum_steps}; FLOPs/bytes "
          + ("with every loop iteration counted (unrolled cost-only compiles)" if _LOOP_COSTS.value
             else "as XLA reports them (loop bodies counted once)"))
    print(format_reports(reports, devices=len(devices), device_kind=device_kind, chip=chip,
                         tokens_per_step=tokens, loop_costs=_LOOP_COSTS.value,
                         model_flops_per_step=model_train_flops(config.model, tokens.get("train", 0),
                                                                config.data.seq_len)))
    if config.model.moe.dispatch == "dropless" and config.mesh.expert > 1:
        print(WORST_CASE_BUFFERS_NOTE)
    problems = [p for p in (fit_problem(r, chip) for r in reports) if p] if chip else []
    for problem in problems:
        print("DOES NOT FIT: " + problem)
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    cli.run(main)  # a flag or config mistake: one line, exit 2
