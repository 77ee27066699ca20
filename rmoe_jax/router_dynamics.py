"""How routers evolve over training: per-checkpoint routing measurements of compare runs.

    python -m rmoe_jax.router_dynamics --compare_out runs/compare_long --out results/router_dynamics

Reads every complete checkpoint of every run in `<compare_out>/runs/<router>_seed<s>/` and, on
the first `--batches` validation batches, measures per layer (then averages over layers):

- `bpc`: validation bits per byte (the eval curve at that step);
- `gate_entropy` (ln E = uniform), `inner_balance` (median top-1 / top-2 probability),
  `outer_balance` (top-k probability mass);
- `logit_std`: the spread of a token's router logits over the experts (mean over tokens):
  the scale that decides how far the gates are from uniform;
- `router_input_l1` / `router_input_rms`: the vector the router head multiplies, per token:
  the normed token x for SMoE, the GRU state h_i for RMoE. With Adam each weight moves by about
  the learning rate per step whatever its gradient's size, so a logit moves by up to
  lr x ||input||_1 per step: a small router input means slowly growing logits;
- `head_kernel_norm`: Frobenius norm of the router head's kernel (W for SMoE, W_i for RMoE);
- `lm_grad` / `balance_grad`: norms of d(LM loss) / d(router params) and of the balance term's.

Writes `dynamics.json` (every value per run and step) and `dynamics.png` (each measurement
against the step, mean over seeds per router).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Mapping, Optional, Sequence

import numpy as np

RUN_NAME = re.compile(r"^(?P<router>.+)_seed(?P<seed>\d+)$")
MEASURES = ("bpc", "gate_entropy", "inner_balance", "outer_balance", "logit_std",
            "router_input_l1", "router_input_rms", "head_kernel_norm", "lm_grad", "balance_grad")


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps with a checkpoint folder (`<workdir>/checkpoints/<step>`), ascending."""
    from rmoe_jax.checkpoint import CHECKPOINT_DIR

    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def router_inputs_fn(model, router_name: str):
    """A jitted `(params, inputs [B, S]) -> (router logits [L, N, E], router head inputs
    [L, N, width])`; build it once and call it for every batch (each build compiles anew)."""
    import jax

    from rmoe_jax.model.routers import RecurrentRouter

    def capture(module, method_name):
        return isinstance(module, RecurrentRouter) and method_name == "__call__"

    @jax.jit
    def forward(params, inputs):
        _, state = model.apply({"params": params}, inputs, deterministic=True,
                               mutable=["intermediates"], capture_intermediates=capture)
        moe = state["intermediates"]["layers"]["moe"]
        logits = moe["router_logits"][0]
        if router_name == "recurrent":
            head_input = moe["router"]["__call__"][0][1]  # (logits, new state) -> the state h_i
        else:
            head_input = moe["moe_input"][0]
        return logits, head_input

    return lambda params, inputs: jax.device_get(forward(params, inputs))


def measure_checkpoint(config, model, params, batches: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """Every measurement of MODULE docstring for one checkpoint, averaged over layers."""
    from rmoe_jax import analysis

    router = config.model.router
    top_k = int(config.model.moe.top_k)
    recorded = analysis.record_routing(model, params, batches)
    probs = recorded["probs"]
    logit_std, l1, rms = [], [], []
    router_inputs = router_inputs_fn(model, router.name)
    for batch in batches:
        logits, head_input = router_inputs(params, np.asarray(batch["inputs"]))
        head_input = np.asarray(head_input, np.float64)
        if router.name == "recurrent":
            head_input = head_input[..., :int(router.hidden_size)]  # LSTM carries (h, c): h only
        logit_std.append(np.asarray(logits, np.float64).std(-1).mean(-1))  # [L]
        l1.append(np.abs(head_input).sum(-1).mean(-1))
        rms.append(np.sqrt((head_input ** 2).mean(-1)).mean(-1))
    router_params = params["layers"]["moe"]["router"]
    head = router_params["gate"]["kernel"] if "gate" in router_params else None
    grads = analysis.router_grad_norms(model, params, batches[0],
                                       balance_coef=float(config.model.moe.balance_coef))
    loss = recorded["ce_sum"] / max(recorded["weight_sum"], 1.0)
    return {
        "bpc": loss / math.log(2.0),
        "gate_entropy": float(analysis.gate_entropy(probs).mean()),
        "inner_balance": float(analysis.inner_balance(probs).mean()),
        "outer_balance": float(analysis.outer_balance(probs, top_k).mean()),
        "logit_std": float(np.mean(logit_std)),
        "logit_std_per_layer": np.mean(logit_std, axis=0).tolist(),
        "router_input_l1": float(np.mean(l1)),
        "router_input_rms": float(np.mean(rms)),
        "head_kernel_norm": (float(np.mean([np.linalg.norm(np.asarray(k)) for k in head]))
                             if head is not None else float("nan")),
        "lm_grad": grads["lm"],
        "balance_grad": grads["balance"],
    }


def measure_runs(compare_out: str, *, batches: int = 4, log=print) -> dict:
    """{run name: {'router', 'seed', 'steps': {step: measurements}}} for every run's checkpoints."""
    from rmoe_jax import analysis

    runs_dir = os.path.join(compare_out, "runs")
    if not os.path.isdir(runs_dir):
        raise FileNotFoundError(f"{runs_dir} not found: --compare_out must be a "
                                "`python -m rmoe_jax.compare --out` folder")
    out: dict = {}
    for name in sorted(os.listdir(runs_dir)):
        match = RUN_NAME.match(name)
        workdir = os.path.join(runs_dir, name)
        if match is None or not checkpoint_steps(workdir):
            continue
        run = {"router": match["router"], "seed": int(match["seed"]), "steps": {}}
        for step in checkpoint_steps(workdir):
            try:
                config, model, params, _ = analysis.load_trained(workdir, step)
            except FileNotFoundError:  # an unfinished save: not a checkpoint yet
                continue
            eval_batches = list(analysis.eval_batches(config, config.data.eval_split, batches))
            run["steps"][step] = measure_checkpoint(config, model, params, eval_batches)
            log(f"{name} step {step}: " + ", ".join(
                f"{k} {run['steps'][step][k]:.4g}" for k in MEASURES))
        out[name] = run
    return out


def plot_dynamics(runs: Mapping[str, dict], path: str) -> None:
    """One panel per measurement: mean over seeds per router, against the step."""
    plt = analysis_pyplot()
    routers = sorted({r["router"] for r in runs.values()})
    fig, axes = plt.subplots(2, 5, figsize=(22, 8))
    for ax, measure in zip(axes.flat, MEASURES):
        for router in routers:
            seeds = [r for r in runs.values() if r["router"] == router]
            steps = sorted(set.intersection(*[set(r["steps"]) for r in seeds])) if seeds else []
            if not steps:
                continue
            values = [np.mean([r["steps"][s][measure] for r in seeds]) for s in steps]
            ax.plot(steps, values, marker="o", label=f"{router} ({len(seeds)} seeds)")
        ax.set_title(measure)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def analysis_pyplot():
    from rmoe_jax.analysis import _pyplot

    return _pyplot()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rmoe_jax.router_dynamics",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare_out", required=True,
                        help="a `python -m rmoe_jax.compare --out` folder (its runs/ are read)")
    parser.add_argument("--out", required=True, help="folder for dynamics.json and dynamics.png")
    parser.add_argument("--batches", type=int, default=4, help="validation batches per checkpoint")
    args = parser.parse_args(argv)
    from rmoe_jax import cli

    cli.quiet_logs()
    try:
        runs = measure_runs(args.compare_out, batches=args.batches)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no run with a checkpoint in {args.compare_out}/runs", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dynamics.json"), "w") as f:
        json.dump(runs, f, indent=1, default=float)
    plot_dynamics(runs, os.path.join(args.out, "dynamics.png"))
    print(f"wrote {args.out}/dynamics.json and dynamics.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
