"""Training: optimizer and schedules, train state, the train/eval steps, and the loop.

    from rmoe_jax.train import run
    final_metrics = run(config, workdir)   # trains, resuming from workdir's latest checkpoint
"""

from rmoe_jax.train.loop import NonFiniteLossError, run, setup_compilation_cache, validate_all
from rmoe_jax.train.metrics import MetricsWriter, read_metrics
from rmoe_jax.train.optim import make_optimizer, make_schedule, trainable_global_norm
from rmoe_jax.train.state import TrainState, create_train_state, make_mesh
from rmoe_jax.train.step import finish_eval, make_eval_step, make_train_step, weighted_cross_entropy_sum

__all__ = [
    "MetricsWriter",
    "NonFiniteLossError",
    "TrainState",
    "create_train_state",
    "finish_eval",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "read_metrics",
    "run",
    "setup_compilation_cache",
    "trainable_global_norm",
    "validate_all",
    "weighted_cross_entropy_sum",
]
