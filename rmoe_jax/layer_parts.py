"""Where one decoder layer's compiled bytes go: its big parts compiled alone on one chip.

    python -m rmoe_jax.aot --config configs/llama_0p91b.py --topology v6e:4x8 --steps parts

Each part is the model's own code (the `Attention` and `MoEBlock` modules, the router, the
grouped SwiGLU experts, the dispatch's row gather) at one chip's share of one micro-batch
(`batch_size / grad_accum_steps / chips` sequences), compiled forward and forward+backward for
`device`; the bytes and FLOPs are XLA's cost analysis of those programs, the same model the
step's roofline uses. In the step a part runs its forward once more when the layer is
rematerialised (every policy but `none` recomputes some of it; `full` all of it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rmoe_jax.model import dispatch, routers
from rmoe_jax.model.moe import MoEBlock
from rmoe_jax.model.transformer import Attention


@dataclasses.dataclass(frozen=True)
class PartCost:
    """Compiled costs of one part, GB and GFLOP for one chip and one micro-batch."""

    name: str
    forward_gb: float
    forward_gflop: float
    gradient_gb: float | None  # forward + backward; None for a part timed forward only
    gradient_gflop: float | None

    def in_step_gb(self, remat: bool) -> float:
        """Bytes of the part in a train step: forward + backward, plus a second forward when
        the layer is rematerialised (an upper bound for policies that save some of it)."""
        gradient = self.forward_gb if self.gradient_gb is None else self.gradient_gb
        return gradient + (self.forward_gb if remat else 0.0)


def _costs(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("bytes accessed", 0.0)) / 1e9, float(cost.get("flops", 0.0)) / 1e9


def _on(device, tree):
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _part(name: str, device, forward: Callable, args: tuple, differentiate: bool = True) -> PartCost:
    """`forward(*args)` (a pytree of arrays) compiled as is and inside the gradient of the sum of
    squares of its floating outputs with respect to every floating argument leaf."""
    args = _on(device, args)
    fwd_gb, fwd_gflop = _costs(jax.jit(forward).lower(*args).compile())
    if not differentiate:
        return PartCost(name, fwd_gb, fwd_gflop, None, None)

    def objective(*a):
        leaves = [x for x in jax.tree.leaves(forward(*a)) if jnp.issubdtype(x.dtype, jnp.floating)]
        return sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in leaves)

    wrt = tuple(i for i, a in enumerate(args)
                if all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(a)))
    grad_gb, grad_gflop = _costs(jax.jit(jax.grad(objective, argnums=wrt)).lower(*args).compile())
    return PartCost(name, fwd_gb, fwd_gflop, grad_gb, grad_gflop)


def _module_part(name: str, device, module: nn.Module, inputs: tuple) -> PartCost:
    params = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    return _part(name, device, lambda p, *x: module.apply(p, *x), (params, *inputs))


def part_costs(model: ml_collections.ConfigDict, sequences: int, seq_len: int, device) -> list[PartCost]:
    """The parts of one `model` layer for `sequences` x `seq_len` tokens on `device`.

    Rows: attention block, MoE block (router, gating, dispatch, experts), then three pieces
    of the MoE block alone: the router, the grouped SwiGLU experts and the dropless dispatch's
    row gather `x[order % tokens]` (forward only: its gradient is a scatter-add).
    """
    dtype, param_dtype = jnp.dtype(model.dtype), jnp.dtype(model.param_dtype)
    d_model, tokens, top_k = model.d_model, sequences * seq_len, model.moe.top_k
    array = jax.ShapeDtypeStruct
    x = array((sequences, seq_len, d_model), dtype)
    flat_x = array((tokens, d_model), dtype)
    head_dim = model.head_dim or d_model // model.num_heads
    attention = Attention(model.num_heads, model.num_kv_heads, head_dim, model.rope_theta, dtype,
                          param_dtype, model.init_std)
    positions = array((sequences, seq_len), jnp.int32)
    parts = [_module_part("attention block", device, attention, (x, positions))]

    state = array((tokens, routers.router_state_size(model.router)), jnp.float32)
    shared_module = routers.SharedRouterParams(model.router, d_model, model.init_std)
    shared = (jax.eval_shape(shared_module.init, jax.random.key(0))
              if model.router.name == "recurrent" else {})

    def with_shared(module: nn.Module) -> Callable:
        def forward(params, shared_params, *inputs):
            values = shared_module.apply(shared_params) if shared_params else {}
            return module.apply(params, *inputs, values)
        return forward

    def module_with_shared(name: str, module: nn.Module, inputs: tuple) -> PartCost:
        shared_values = jax.eval_shape(shared_module.apply, shared) if shared else {}
        params = jax.eval_shape(module.init, jax.random.key(0), *inputs, shared_values)
        return _part(name, device, with_shared(module), (params, shared, *inputs))

    moe = MoEBlock(model.moe, model.router, dtype, param_dtype, model.init_std)
    parts.append(module_with_shared("MoE block", moe, (x, state)))
    router = routers.build_router(model.router, model.moe.num_experts, model.init_std)
    parts.append(module_with_shared("  of which the router", router, (flat_x, state)))

    num_experts, hidden = model.moe.num_experts, model.moe.expert_hidden
    rows = array((top_k * tokens, d_model), dtype)
    experts = (array((num_experts, d_model, hidden), param_dtype),
               array((num_experts, d_model, hidden), param_dtype),
               array((num_experts, hidden, d_model), param_dtype))
    group_sizes = array((num_experts,), jnp.int32)

    def grouped_experts(sorted_rows, weights, sizes):
        weights = tuple(w.astype(dtype) for w in weights)
        return dispatch.grouped_swiglu(sorted_rows, weights, sizes, mask_rows=False)

    parts.append(_part("  of which the experts (grouped SwiGLU)", device, grouped_experts,
                       (rows, experts, group_sizes)))
    order = array((top_k * tokens,), jnp.int32)
    parts.append(_part("  of which the dispatch row gather", device,
                       lambda x, o: dispatch.take_rows(x, o % tokens), (flat_x, order),
                       differentiate=False))
    return parts


def format_parts(parts: list[PartCost], *, remat: bool, layer_gb: float | None,
                 layer_gflop: float | None) -> str:
    """A markdown table of `parts` and, given the layer's own gradient bytes, what is left."""
    step_column = "in the step GB (fwd+bwd" + (" + remat fwd)" if remat else ")")
    lines = [f"| part | fwd GB | fwd GFLOP | fwd+bwd GB | fwd+bwd GFLOP | {step_column} |",
             "|---|---:|---:|---:|---:|---:|"]

    def number(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    for part in parts:
        lines.append(f"| {part.name} | {number(part.forward_gb)} | {number(part.forward_gflop, 1)} | "
                     f"{number(part.gradient_gb)} | {number(part.gradient_gflop, 1)} | "
                     f"{number(part.in_step_gb(remat))} |")
    if layer_gb is not None:
        blocks = sum(p.in_step_gb(remat) for p in parts if not p.name.startswith(" "))
        lines.append(f"| the layer (gradient of 2 layers - 1 layer, one micro-batch) | | | "
                     f"{number(layer_gb)} | {number(layer_gflop, 1)} | {number(layer_gb)} |")
        lines.append(f"| rest of the layer (norms, residuals, scan bookkeeping, scheduling) | | | | | "
                     f"{number(layer_gb - blocks)} |")
    return "\n".join(lines)
