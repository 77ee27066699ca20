"""Print a model's parameter breakdown, and what its router adds over SMoE's linear gate.

    python -m rmoe_jax.param_count --config configs/enwik8_medium.py
    python -m rmoe_jax.param_count --config configs/llama_0p91b.py --config.model.tie_embeddings=True

Nothing is allocated: shapes come from `jax.eval_shape` of the model's init.
"""

from __future__ import annotations

import copy
import sys

from absl import flags
from ml_collections import config_flags

from rmoe_jax import cli
from rmoe_jax.model import count_params

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)

ROWS = ("total", "active", "non_embedding", "embedding", "experts", "router")


def breakdown(model_config) -> list[tuple[str, int, int]]:
    """[(row, this model, the same model with a linear SMoE router)]."""
    smoe_config = copy.deepcopy(model_config)
    smoe_config.router.name = "linear"
    ours, smoe = count_params(model_config), count_params(smoe_config)
    return [(row, ours[row], smoe[row]) for row in ROWS]


def format_breakdown(rows: list[tuple[str, int, int]], router_name: str) -> str:
    lines = [f"| params | {router_name} | linear (SMoE) | difference |", "|---|---:|---:|---:|"]
    for row, ours, smoe in rows:
        lines.append(f"| {row} | {ours:,} ({ours / 1e6:.2f}M) | {smoe:,} | {ours - smoe:+,} |")
    return "\n".join(lines)


def main(argv):
    del argv
    from rmoe_jax.config import ConfigError, validate_model

    model_config = _CONFIG.value.model
    try:
        validate_model(model_config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_breakdown(breakdown(model_config), model_config.router.name))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    cli.run(main)
