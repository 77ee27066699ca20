"""Compile the real train and eval steps ahead of time for a mesh of devices we may not have.

    # 8 fake CPU devices (per-device memory of a config on an 8-device mesh):
    python -m rmoe_jax.aot --config configs/llama_0p91b.py --cpu_devices 8 \
        --config.mesh.fsdp=8 --config.mesh.data=1 --config.train.grad_accum_steps=140
    # a TPU pod slice, compiled on this CPU with libtpu (`pip install -r requirements-tpu.txt`):
    python -m rmoe_jax.aot --config configs/llama_0p91b.py --topology v5p:4x4x4 ...

Lowers and compiles with abstract inputs (`jax.ShapeDtypeStruct`s carrying shardings): nothing
is allocated. Prints, per step, the per-device argument / temp / output memory (against the
chip's HBM where known), FLOPs and bytes per step from the compiled cost analysis, a roofline
step time from the chip's peak and bandwidth, and the collectives in the compiled program.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Compile for this many (fake) CPU devices.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "A TPU topology, e.g. v5p:2x2x1 or v6e:4x4.")
_STEPS = flags.DEFINE_list("steps", ["train", "eval"], "Which steps to compile: train, eval.")

COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


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
    return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo_text)) for op in COLLECTIVES}


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
    kind = device_kind.lower().replace(" ", "")
    for key in ("v5p", "v5e", "v5lite", "v6e", "v6lite", "v4"):
        if key in kind:
            return CHIPS[{"v5lite": "v5e", "v6lite": "v6e"}.get(key, key)]
    return None


def compile_steps(config, devices, steps=("train", "eval")) -> list[StepReport]:
    """Lower and compile the train / eval steps of `config` over `devices` (abstract inputs)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from rmoe_jax import parallel
    from rmoe_jax.model import build_model, decay_mask, frozen_mask
    from rmoe_jax.train import state as state_lib
    from rmoe_jax.train.optim import make_optimizer
    from rmoe_jax.train.step import make_eval_step, make_train_step

    mesh = parallel.make_mesh(config.mesh, devices)
    problems = parallel.fit_problems(mesh, num_experts=config.model.moe.num_experts,
                                     global_batch=config.train.batch_size,
                                     micro_batches=config.train.grad_accum_steps)
    if problems:
        raise ValueError("the config does not fit the mesh:\n  " + "\n  ".join(problems))
    rules = parallel.rules_from_config(config.mesh)
    model = build_model(config.model)
    seq_len = int(config.data.seq_len)
    batch_sh = parallel.batch_sharding(mesh)

    def abstract_batch(batch_size: int) -> dict:
        shape = (int(batch_size), seq_len)
        return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh),
                "targets": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh),
                "weights": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sh)}

    reports = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32)))
        frozen = frozen_mask(params["params"])
        tx = make_optimizer(config.train, frozen_mask=frozen, decay_mask=decay_mask(params["params"]))
        abstract, _ = state_lib.abstract_and_init(model, tx, seq_len=seq_len, seed=0)
        state_sh = state_lib.state_shardings(mesh, abstract, rules)
        state = state_lib.with_shardings(abstract, state_sh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        if "train" in steps:
            step = jax.jit(make_train_step(model, tx, config.train, frozen_mask=frozen),
                           in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                           donate_argnums=0)
            batch = abstract_batch(config.train.batch_size)
            reports.append(report_from_compiled("train", step.lower(state, batch).compile()))
        if "eval" in steps:
            step = jax.jit(make_eval_step(model), in_shardings=(state_sh.params, batch_sh),
                           out_shardings=replicated)
            batch = abstract_batch(config.train.eval_batch_size or config.train.batch_size)
            reports.append(report_from_compiled("eval", step.lower(state.params, batch).compile()))
    return reports


def format_reports(reports: list[StepReport], *, devices: int, device_kind: str, chip: Chip | None,
                   tokens_per_step: int, model_flops_per_step: float) -> str:
    gib = 2**30
    lines = [f"{devices} x {device_kind}" + (f" ({chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
                                             f"{chip.hbm_bandwidth / 1e12:.2f} TB/s, "
                                             f"{chip.hbm_bytes / gib:.0f} GiB HBM)" if chip else ""),
             "",
             "| step | args GiB | temp GiB | output GiB | peak GiB/device | fits | TFLOPs/device | "
             "GB accessed/device | roofline s | tokens/s | MFU bound | collectives |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in reports:
        fits = "-" if chip is None else ("yes" if r.peak_bytes <= chip.hbm_bytes else
                                         f"NO: {(r.peak_bytes - chip.hbm_bytes) / gib:.1f} GiB over")
        if chip is not None:
            seconds = roofline_seconds(r.flops, r.bytes_accessed, chip)
            tokens = f"{tokens_per_step / seconds:,.0f}"
            mfu = (f"{model_flops_per_step / (devices * chip.peak_flops * seconds):.0%}"
                   if r.name == "train" else "-")
            seconds = f"{seconds:.3f}"
        else:
            seconds = tokens = mfu = "-"
        collectives = ", ".join(f"{k} {v}" for k, v in r.collectives.items() if v) or "none"
        lines.append(f"| {r.name} | {r.argument_bytes / gib:.2f} | {r.temp_bytes / gib:.2f} | "
                     f"{r.output_bytes / gib:.2f} | {r.peak_bytes / gib:.2f} | {fits} | "
                     f"{r.flops / 1e12:.2f} | {r.bytes_accessed / 1e9:.1f} | {seconds} | {tokens} | "
                     f"{mfu} | {collectives} |")
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
    import jax

    if _TOPOLOGY.value:
        from rmoe_jax.tpu_topology import topology_devices

        devices = topology_devices(_TOPOLOGY.value)
    else:
        devices = jax.devices()
    device_kind = devices[0].device_kind
    reports = compile_steps(config, devices, tuple(_STEPS.value))
    tokens = int(config.train.batch_size) * int(config.data.seq_len)
    print(format_reports(reports, devices=len(devices), device_kind=device_kind, chip=chip_for(device_kind),
                         tokens_per_step=tokens,
                         model_flops_per_step=model_train_flops(config.model, tokens, config.data.seq_len)))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
