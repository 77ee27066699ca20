"""The paper's router rows: one registry, by name, for configs, `compare` and `bench`.

Every row of the paper's Tables 1, 2, 5 and 6 (and the shared-expert setting) is a name here,
with the config overrides that make it. `configs/enwik8_medium.py:ROW`, `python -m
rmoe_jax.compare --routers ROW,...` and the benchmark's `smoe` variant all read this table.
Shorter names that the enwik8 configs accepted before (`np`, `mlp`, `sproj_gru`, ...) are
aliases of the same rows (`ALIASES`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from rmoe_jax.config import set_fields

# Defaults of every recurrent-router option, so that a row means the same thing whatever the
# base config set (e.g. a base config with no_recurrence=True still gives plain RMoE for 'rmoe').
_RECURRENT = {
    "model.router.name": "recurrent",
    "model.router.cell": "gru",
    "model.router.no_recurrence": False,
    "model.router.detach": False,
    "model.router.residual_alpha": 0.0,
    "model.router.residual_detach": False,
    "model.router.shared_projector": False,
    "model.router.head": "linear",
}


@dataclasses.dataclass(frozen=True)
class Router:
    label: str  # the paper's name
    overrides: Mapping[str, Any]  # config path -> value
    paper: str = ""  # where the paper reports it


def _rec(**changes) -> dict:
    out = dict(_RECURRENT)
    out.update({f"model.router.{k}": v for k, v in changes.items()})
    return out


# THE router table: name -> paper row. Every row of Tables 1, 2, 5 and 6 is nameable.
ROUTERS: dict[str, Router] = {
    # Table 1
    "smoe": Router("SMoE", {"model.router.name": "linear"}, "Table 1"),
    "hyper": Router("HyperMoE", {"model.router.name": "hyper"}, "Table 1"),
    "smoe_mlp": Router("SMoE-MLP", {"model.router.name": "mlp"}, "Table 1"),
    "random": Router("RandomSMoE", {"model.router.name": "random"}, "Table 1"),
    "cosine": Router("CosineMoE", {"model.router.name": "cosine"}, "Table 1"),
    "xmoe": Router("XMoE (q=16)", {"model.router.name": "xmoe", "model.router.xmoe_dim": 16}, "Table 1"),
    "rmoe": Router("RMoE", _rec(), "Table 1"),
    # Table 5: recurrence ablations
    "rmoe_np": Router("RMoE-NP", _rec(no_recurrence=True), "Table 5"),
    "rmoe_detach": Router("RMoE + detach", _rec(detach=True), "Table 5"),
    "rmoe_np_r0.5": Router("NP + r0.5", _rec(no_recurrence=True, residual_alpha=0.5), "Table 5"),
    "rmoe_np_r1.0": Router("NP + r1.0", _rec(no_recurrence=True, residual_alpha=1.0), "Table 5"),
    "rmoe_np_r0.5_detach": Router("NP + r0.5 (detached)",
                                  _rec(no_recurrence=True, residual_alpha=0.5, residual_detach=True),
                                  "Table 5"),
    "rmoe_np_r1.0_detach": Router("NP + r1.0 (detached)",
                                  _rec(no_recurrence=True, residual_alpha=1.0, residual_detach=True),
                                  "Table 5"),
    # Table 6: projector / cell
    "rmoe_sproj": Router("S-proj + GRU", _rec(shared_projector=True), "Table 6"),
    "rmoe_rnn": Router("L-proj + RNN", _rec(cell="rnn"), "Table 6"),
    "rmoe_lstm": Router("L-proj + LSTM", _rec(cell="lstm"), "Table 6"),
    # Table 2: XMoE(q) vs XMoE(q) + GRU
    **{f"xmoe{q}": Router(f"XMoE (q={q})", {"model.router.name": "xmoe", "model.router.xmoe_dim": q},
                          "Table 2") for q in (8, 16, 32)},
    **{f"xmoe{q}_gru": Router(f"XMoE (q={q}) + GRU", {**_rec(head="xmoe"), "model.router.xmoe_dim": q},
                              "Table 2") for q in (8, 16, 32)},
    # Shared expert (DeepSeekMoE style) beside the routed ones
    "smoe_shared": Router("SMoE + shared expert",
                          {"model.router.name": "linear", "model.moe.shared_expert": True}, "15B setting"),
    "rmoe_shared": Router("RMoE + shared expert", {**_rec(), "model.moe.shared_expert": True}, "15B setting"),
}
ROUTERS["rmoe_gru"] = Router("L-proj + GRU (= RMoE)", _rec(), "Table 6")


# Names the enwik8 config files used for the same rows.
ALIASES = {"mlp": "smoe_mlp", "np": "rmoe_np", "detach": "rmoe_detach",
           "np_r0.5": "rmoe_np_r0.5", "np_r1.0": "rmoe_np_r1.0", "sproj_gru": "rmoe_sproj",
           "rnn": "rmoe_rnn", "lstm": "rmoe_lstm", "shared": "rmoe_shared"}


def resolve(name: str) -> str:
    """The registry name of `name` (itself, or what its alias stands for).

    Raises:
      ValueError: an unknown name; the message lists the rows.
    """
    name = ALIASES.get(name, name)
    if name not in ROUTERS:
        raise ValueError(f"unknown row {name!r}; choose one of:\n" + router_help())
    return name


def apply_row(config, name: str):
    """Set the fields of the paper row `name` (or an alias) in the experiment `config`."""
    return set_fields(config, dict(ROUTERS[resolve(name)].overrides))


def router_help() -> str:
    width = max(map(len, ROUTERS))
    lines = []
    for name, r in ROUTERS.items():
        over = " ".join(f"--config.{k}={v}" for k, v in r.overrides.items()
                        if not (k in _RECURRENT and _RECURRENT[k] == v and k != "model.router.name"))
        lines.append(f"  {name:<{width}}  {r.label:<24} {r.paper:<8} {over}")
    return "\n".join(lines)


