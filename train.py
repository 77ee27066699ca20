"""Train an RMoE / MoE language model.

    python train.py --config configs/tiny.py --workdir /tmp/tiny
    python train.py --config configs/enwik8_medium.py --workdir runs/smoe \
        --config.model.router.name=linear

Any config field can be overridden with `--config.<path>=<value>`. Re-running the same command
resumes from the latest complete checkpoint in the workdir. Exit status: 0 when training
finished or was preempted (SIGTERM: a checkpoint is saved first), 1 on a non-finite loss,
2 on an invalid config or missing data.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rmoe_jax import cli  # first: picks the JAX platforms (rmoe_jax/platforms.py)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-process training).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (with --distributed; default: auto-detect).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index (with --distributed).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    problem = cli.writable_dir_problem(_WORKDIR.value, "--workdir")
    if problem:  # before any work: nothing is compiled or written for a run that cannot save
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 2
    import jax

    if _DISTRIBUTED.value:
        # CPU processes need a collectives implementation to form one mesh (no-op elsewhere).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)

    from rmoe_jax.config import ConfigError
    from rmoe_jax.train import NonFiniteLossError, run

    from rmoe_jax.data.errors import BadInputError, DataNotPreparedError

    try:
        final = run(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (DataNotPreparedError, BadInputError) as e:  # missing data, or a file it cannot read
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if jax.process_index() == 0:
        print("final metrics: " + json.dumps(final, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)  # absl's app.run; a flag or config mistake exits 2 with one line
