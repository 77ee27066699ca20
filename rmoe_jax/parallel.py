"""Mesh, logical-axis rules, and the shardings of params, train state and batch.

Every parameter has logical axis names (`param_logical_axes`, read from the parameter table
`rmoe_jax.param_table`, so the param tree stays plain arrays); key activations are constrained with `constrain`. Rules in
the config (`mesh.rules`) map logical names to the mesh axes `data`, `fsdp`, `expert`, `tensor`.
Defaults: experts over `expert` (FFN dim over `tensor`), other weights over `fsdp`, the batch
over `data`, `fsdp` and `expert`, router parameters replicated.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rmoe_jax import param_table
from rmoe_jax.param_table import path_string

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("expert_group", ("data", "fsdp")),  # sequences of the capacity dispatch, experts moved out
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_embed", None),
    ("expert_mlp", "tensor"),
    ("norm", None),
    ("router_in", None),
    ("router_out", None),
    ("layers", None),
)

def parse_rules(text: str) -> dict[str, Any]:
    """`mesh.rules` overrides, 'embed=fsdp+expert,mlp=none' -> {'embed': ('fsdp', 'expert'),
    'mlp': None}: each logical name of `DEFAULT_RULES` listed gets those mesh axes instead.

    Raises:
      ValueError: naming the entry, an unknown logical name or an unknown mesh axis.
    """
    names = {name for name, _ in DEFAULT_RULES}
    out: dict[str, Any] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, value = (part.strip() for part in entry.partition("="))
        if not sep or name not in names:
            raise ValueError(f"mesh.rules: {entry!r} is not NAME=AXES with NAME one of "
                             f"{', '.join(sorted(names))} (e.g. 'embed=fsdp+expert,mlp=none')")
        axes = tuple(a.strip() for a in value.split("+")) if value.lower() != "none" else None
        unknown = [a for a in axes or () if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"mesh.rules: {entry!r} names {', '.join(unknown)}, not mesh axes "
                             f"({', '.join(MESH_AXES)}, or none)")
        out[name] = axes[0] if axes and len(axes) == 1 else axes
    return out


def rules_from_config(mesh_config: ml_collections.ConfigDict) -> tuple:
    """The logical-axis rules: `DEFAULT_RULES` with the `mesh.rules` overrides applied."""
    overrides = parse_rules(mesh_config.get("rules", "") or "")
    return tuple((name, overrides.get(name, axes)) for name, axes in DEFAULT_RULES)


def mesh_shape(mesh_config: ml_collections.ConfigDict, device_count: int) -> dict[str, int]:
    """Axis sizes with the one -1 axis filled; raises naming both numbers when they don't fit."""
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    for axis, size in sizes.items():
        if size == -1:
            if device_count % fixed:
                raise ValueError(f"mesh: the fixed axes {sizes} use {fixed} devices, which does not "
                                 f"divide the {device_count} devices available")
            sizes[axis] = device_count // fixed
    if math.prod(sizes.values()) != device_count:
        raise ValueError(f"mesh: axes {sizes} need {math.prod(sizes.values())} devices, "
                         f"but {device_count} are available")
    return sizes


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence | None = None) -> Mesh:
    """A mesh over all devices of all processes with axes (data, fsdp, expert, tensor)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    array = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def fit_problems(mesh: Mesh, *, num_experts: int, global_batch: int,
                 micro_batches: int = 1) -> list[str]:
    """Ways the model and batch do not divide over the mesh, each naming both numbers."""
    problems = []
    if num_experts % mesh.shape["expert"]:
        problems.append(f"model.moe.num_experts={num_experts} is not divisible by the expert axis "
                        f"(mesh.expert={mesh.shape['expert']})")
    batch_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    micro_batch = global_batch // max(micro_batches, 1)
    if micro_batch % batch_shards:
        problems.append(f"train.batch_size={global_batch} (micro-batch {micro_batch}) is not divisible "
                        f"by the batch shards data*fsdp*expert={batch_shards}")
    return problems


def param_logical_axes(params: Any) -> Any:
    """Pytree of logical-axis tuples, one per param (layers' leading axis named 'layers'), as
    `rmoe_jax.param_table` gives them."""
    return param_table.logical_axes(params)


def param_specs(params: Any, rules: tuple) -> Any:
    """PartitionSpecs of the params under `rules`."""
    return jax.tree.map(lambda names: nn.logical_to_mesh_axes(names, rules),
                        param_logical_axes(params), is_leaf=lambda x: isinstance(x, tuple))


def _tree_specs_like(tree: Any, params: Any, specs: Any) -> Any:
    """Specs for a tree (e.g. an optimizer state) whose param-shaped subtrees mirror `params`:
    a leaf whose path ends with a param's path takes that param's spec; others replicate."""
    by_path = {}
    jax.tree_util.tree_map_with_path(
        lambda path, spec: by_path.setdefault(path_string(path), spec), specs,
        is_leaf=lambda x: isinstance(x, P))

    def spec_for(path, leaf):
        name = path_string(path)
        parts = name.split("/")
        for start in range(len(parts)):
            spec = by_path.get("/".join(parts[start:]))
            if spec is not None and len(spec) <= len(getattr(leaf, "shape", ())):
                return spec
        return P()

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def state_shardings(mesh: Mesh, abstract_state: Any, rules: tuple) -> Any:
    """NamedShardings for a train state with `.params` (and params-shaped optimizer state)."""
    specs = param_specs(abstract_state.params, rules)
    state_specs = _tree_specs_like(abstract_state, abstract_state.params, specs)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs,
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches `[batch, seq]` split over every axis that holds different data."""
    return NamedSharding(mesh, P(BATCH_AXES))


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh or without rules."""
    rules = nn.get_logical_axis_rules()
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, nn.logical_to_mesh_axes(logical_axes, rules))


def active_mesh():
    """The mesh set with `jax.set_mesh`, or None when there is none (single-device code)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names:
        return None
    return mesh


def rule_mesh_axes(mesh, logical_name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """The mesh axes, of size > 1, that the active logical-axis rules map `logical_name` to
    (`default` when no rules are active): how a shard_map around a Pallas kernel splits rows
    the way the surrounding jit shards them."""
    rules = nn.get_logical_axis_rules()
    axes = nn.logical_to_mesh_axes((logical_name,), rules)[0] if rules else default
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
