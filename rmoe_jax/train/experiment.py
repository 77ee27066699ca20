"""One experiment's set-up, built in one place: model, optimizer, abstract state, shardings and
the jitted step functions. The training loop, `aot` (compile only) and `bench` all use it.

    experiment = build_experiment(config, mesh)
    state = experiment.init_state()                     # or restore into experiment.restore_target
    step = experiment.train_step()                      # jitted, state donated
    sums = experiment.eval_step()(state.params, batch)  # add over batches, then finish_eval
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rmoe_jax import parallel
from rmoe_jax.model import build_model, decay_mask, frozen_mask
from rmoe_jax.train import state as state_lib
from rmoe_jax.train.optim import make_optimizer
from rmoe_jax.train.step import make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Experiment:
    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: tuple  # logical-axis rules (`mesh.rules` applied)
    model: nn.Module
    tx: optax.GradientTransformation
    frozen: Any  # pytree of bools like the params
    abstract_state: state_lib.TrainState  # ShapeDtypeStructs, without shardings
    state_shardings: state_lib.TrainState
    init_fn: Callable[[], state_lib.TrainState]

    @property
    def batch_sharding(self) -> NamedSharding:
        return parallel.batch_sharding(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def restore_target(self) -> state_lib.TrainState:
        """The abstract state carrying its shardings (a checkpoint restores into it)."""
        return state_lib.with_shardings(self.abstract_state, self.state_shardings)

    def init_state(self) -> state_lib.TrainState:
        """The initial state (deterministic in `train.seed`), placed by its shardings."""
        return jax.jit(self.init_fn, out_shardings=self.state_shardings)()

    def train_step(self, *, model: Optional[nn.Module] = None, keep_state_on_exchange_overflow: bool = False):
        """`step(state, batch) -> (state, metrics)`, jitted with the state donated. `model`
        replaces the experiment's (the same params, e.g. worst-case exchange blocks)."""
        step = make_train_step(model or self.model, self.tx, self.config.train, frozen_mask=self.frozen,
                               keep_state_on_exchange_overflow=keep_state_on_exchange_overflow)
        return jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)

    def eval_step(self):
        """`eval_step(params, batch) -> sums`, jitted (see `rmoe_jax.train.step.finish_eval`)."""
        return jax.jit(make_eval_step(self.model), in_shardings=(self.state_shardings.params,
                                                                 self.batch_sharding),
                       out_shardings=self.replicated)

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A batch's ShapeDtypeStructs `[batch_size, seq_len]`, sharded (for compiling ahead)."""
        shape, sharding = (int(batch_size), int(self.config.data.seq_len)), self.batch_sharding
        return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
                "targets": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
                "weights": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)}


def build_experiment(config: ml_collections.ConfigDict, mesh: Mesh, *, seed: Optional[int] = None,
                     identity_optimizer: bool = False) -> Experiment:
    """The set-up of `config` on `mesh` (nothing allocated: the state is abstract until
    `init_state`). `seed` defaults to `train.seed`; `identity_optimizer` (AOT's forward+backward
    cost) replaces the optimizer by `optax.identity()`."""
    rules = parallel.rules_from_config(config.mesh)
    model = build_model(config.model)
    seq_len = int(config.data.seq_len)
    # A full-length sequence, as the state's init uses: under a mesh, an expert-parallel layer
    # needs the tokens to divide over the batch shards.
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32)))["params"]
    frozen = frozen_mask(params)
    tx = (optax.identity() if identity_optimizer else
          make_optimizer(config.train, frozen_mask=frozen, decay_mask=decay_mask(params)))
    abstract, init_fn = state_lib.abstract_and_init(
        model, tx, seq_len=seq_len,
        seed=int(config.train.seed if seed is None else seed))
    shardings = state_lib.state_shardings(mesh, abstract, rules)
    return Experiment(config=config, mesh=mesh, rules=rules, model=model, tx=tx, frozen=frozen,
                      abstract_state=abstract, state_shardings=shardings, init_fn=init_fn)
