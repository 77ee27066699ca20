"""The train state, its initialisation, and where it lives (mesh and shardings from
`rmoe_jax.parallel`)."""

from __future__ import annotations

import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rmoe_jax import parallel


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `step` counts completed updates."""

    step: jax.Array
    params: Any
    opt_state: Any


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """`parallel.make_mesh`; in addition, a single process whose mesh config has no -1 axis and
    asks for fewer devices than it has uses the first ones (e.g. `mesh.data=1` on a machine
    with 8 fake CPU devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_config[a]) for a in parallel.MESH_AXES]
    if -1 not in sizes and math.prod(sizes) < len(devices) and jax.process_count() == 1:
        devices = devices[: math.prod(sizes)]
    return parallel.make_mesh(mesh_config, devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract_and_init(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    seq_len: int,
    seed: int,
) -> tuple[TrainState, Callable[[], TrainState]]:
    """(the state's ShapeDtypeStructs, a function that builds the real state from `seed`)."""

    def init() -> TrainState:
        params_key, dropout_key = jax.random.split(jax.random.key(seed))
        dummy = jnp.zeros((1, seq_len), jnp.int32)
        variables = model.init({"params": params_key, "dropout": dropout_key}, dummy, deterministic=True)
        params = nn.meta.unbox(variables["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.eval_shape(init), init


def state_shardings(mesh: Mesh, abstract_state: TrainState, rules: tuple) -> TrainState:
    """NamedShardings of the whole state: params by their logical axes under `rules`, the
    optimizer's params-shaped moments like their params, everything else replicated."""
    return parallel.state_shardings(mesh, abstract_state, rules)


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    seq_len: int,
    seed: int,
    mesh: Mesh | None = None,
    rules: tuple = parallel.DEFAULT_RULES,
) -> TrainState:
    """Initialise params (deterministic in `seed`) and the optimizer state, placed on `mesh`."""
    abstract, init = abstract_and_init(model, tx, seq_len=seq_len, seed=seed)
    if mesh is None:
        return jax.jit(init)()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(init, out_shardings=state_shardings(mesh, abstract, rules))()


def with_shardings(abstract_state: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying their shardings: the restore target for a checkpoint."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                        shardings)
