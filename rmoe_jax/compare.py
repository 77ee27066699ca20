"""Compare routers the way the paper does: same steps, tokens, data order and seeds; one table.

    python -m rmoe_jax.compare --config configs/compare_cpu.py --routers smoe,rmoe,rmoe_np \
        --seeds 2 --out runs/compare_cpu [--config.train.num_steps=500 ...]

For every router R and seed s (0 .. seeds-1) it trains `<out>/runs/<R>_seed<s>/` with
`rmoe_jax.train.run` (the config, then any `--config.*` overrides, then R's router overrides,
then `train.seed = s`: the seed fixes both the initialisation and the training data order, so
every router sees the same batches), evaluates the final checkpoint on the validation and test
splits (the same first `--eval_batches` batches for every run), runs the routing analyses
(`rmoe_jax.analysis`) on it, and writes `<out>/runs/<R>_seed<s>/result.json`. Then:

    <out>/results.md     the table (mean +- sample std over seeds, paired deltas vs the baseline)
    <out>/results.csv    one row per router, and per-seed values
    <out>/summary.json   everything, machine-readable
    <out>/loss_curves.png        train CE (moving average) and validation loss vs step, every run
    <out>/mutual_information.png the cross-layer MI matrix per router (mean over seeds)
    <out>/gate_entropy.png       gate entropy, inner and outer balance per layer, per router
    <out>/expert_load.png        layer x expert load heatmap per router

Re-running the same command resumes: finished runs (result.json present, same config and
evaluation settings) are skipped, an interrupted run resumes from its latest checkpoint, and a
finished run asked for a different evaluation (--eval_batches, --test_split) is only
re-evaluated. Runs go seed-major (every router's seed 0 before any seed 1), and the table is
rewritten after each run, so a stopped comparison still has a complete table for its seeds.
`--routers help` lists the router names; every row of the paper's Tables 1, 2, 5 and 6 has
one (see ROUTERS in rmoe_jax/router_rows.py, the one table of names).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from rmoe_jax.config import set_fields
from rmoe_jax.router_rows import _RECURRENT, ROUTERS, Router, router_help  # noqa: F401 (re-exported)

RESULT_FILE = "result.json"

def parse_routers(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROUTERS]
    if unknown or not names:
        raise ValueError(f"unknown router(s) {', '.join(unknown) or '(none given)'}; choose from:\n"
                         + router_help())
    if len(set(names)) != len(names):
        raise ValueError(f"router listed twice in {spec!r}")
    return names


def apply_overrides(config, overrides: Mapping[str, Any]):
    """Set dotted config paths (`model.router.name`) on a ConfigDict, in place; returns it."""
    return set_fields(config, dict(overrides))


def run_config(base, router: str, seed: int):
    """The config of one run: base (with the user's overrides) + the router's row + the seed."""
    import ml_collections

    config = ml_collections.ConfigDict(copy.deepcopy(base.to_dict()))
    apply_overrides(config, ROUTERS[router].overrides)
    config.train.seed = int(seed)
    return config


def run_name(router: str, seed: int) -> str:
    return f"{router}_seed{seed}"


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


# -- one run --------------------------------------------------------------------------------------

def evaluate_params(config, model, params, split: str, batches: int) -> dict:
    """Mean next-token loss (and bits per byte for byte tokens) of `params` on the first
    `batches` eval batches of `split` (0 = the whole split)."""
    import jax

    from rmoe_jax.analysis import eval_batches
    from rmoe_jax.train.step import eval_sums, finish_eval, make_eval_step

    # eval_batches pads the last batch with weight-0 rows: one compiled shape.
    sums = eval_sums(jax.jit(make_eval_step(model)), params, eval_batches(config, split, batches),
                     split=split)
    return finish_eval(sums, byte_level=config.data.tokenizer == "byte")


def train_and_evaluate(config, workdir: str, *, eval_batches: int, test_split: str,
                       analysis_batches: int, log=print) -> dict:
    """Train one run (resuming), evaluate it, analyse it, write and return its result."""
    from rmoe_jax import analysis
    from rmoe_jax.model import count_params
    from rmoe_jax.train import read_metrics, run

    t0 = time.time()
    final = run(config, workdir)
    wall = time.time() - t0
    if final.get("stopped") != "completed":
        raise RuntimeError(f"{workdir}: training stopped early ({final.get('stopped')})")
    loaded = analysis.load_trained(workdir)
    saved_config, model, params, step = loaded
    val = evaluate_params(saved_config, model, params, config.data.eval_split, eval_batches)
    test = evaluate_params(saved_config, model, params, test_split, eval_batches)
    summary = analysis.analyze_workdir(workdir, batches=analysis_batches, split=config.data.eval_split,
                                       loaded=loaded, plots=True) if analysis_batches > 0 else None
    counts = count_params(config.model)
    tokens_per_step = int(config.train.batch_size) * int(config.data.seq_len)
    step_time = median_step_time(workdir, tokens_per_step)
    if step_time is None and final.get("tokens_per_sec"):
        step_time = tokens_per_step / final["tokens_per_sec"]
    result = {
        "step": int(step),
        "seed": int(config.train.seed),
        "validation": val,
        "test": test,
        "params": counts,
        "tokens_per_step": tokens_per_step,
        "tokens_seen": tokens_per_step * int(step),
        "step_time_s": step_time,
        "train_wall_s": wall,
        "train_loss_final": final.get("train_loss_avg"),
        "eval_batches": eval_batches,
        "test_split": test_split,
        "config": _config_json(config),
    }
    if summary is not None:
        result["analysis"] = {
            "mi_offdiagonal": summary["mutual_information"]["mean_offdiagonal"],
            "mi_adjacent": summary["mutual_information"]["mean_adjacent"],
            "mi_matrix": summary["mutual_information"]["matrix"],
            "gate_entropy": summary["gate_entropy"]["per_layer"],
            "inner_balance": summary["inner_balance"]["per_layer"],
            "outer_balance": summary["outer_balance"]["per_layer"],
            "expert_load": summary["expert_load"]["per_layer"],
            "drop_ratio": summary["drop_ratio"]["per_layer"],
            "expert_similarity": summary["expert_similarity"]["per_layer"],
            "router_grad_norm": summary.get("router_grad_norm"),
            "tokens": summary["num_tokens"],
        }
    curve = read_metrics(workdir)
    result["curves"] = {
        "train": [[r["step"], r["ce_loss"]] for r in curve if r.get("split") == "train" and "ce_loss" in r],
        "eval": [[r["step"], r["loss"]] for r in curve if r.get("split") == "eval"],
    }
    tmp = os.path.join(workdir, RESULT_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, default=float)
    os.replace(tmp, os.path.join(workdir, RESULT_FILE))
    log(f"{workdir}: val loss {val['loss']:.4f}, test loss {test['loss']:.4f} "
        f"({wall:.0f}s)")
    return result


def tensorboard_scalars(workdir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar in the run's TensorBoard event files (read without TensorFlow:
    TFRecord framing + tensorboardX's Event proto)."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "*tfevents*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            if len(record) < length:
                break
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.tag == tag:
                    out.append((int(event.step), float(value.simple_value)))
    return sorted(out)


def median_step_time(workdir: str, tokens_per_step: int) -> float | None:
    """Median over logging intervals of the train step time (s), from TensorBoard's
    train/tokens_per_sec (the loop times only the steps, not evals or checkpoints)."""
    try:
        values = [v for _, v in tensorboard_scalars(workdir, "train/tokens_per_sec") if v > 0]
    except Exception:  # a missing or unreadable event file: no timing
        return None
    return float(np.median([tokens_per_step / v for v in values])) if values else None


def _same_config(saved, current) -> bool:
    """Equal on every field both have. A field only one side has (a field added to or removed
    from the schema by a code change since the run) does not make a finished run stale."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return all(_same_config(saved[k], current[k]) for k in saved.keys() & current.keys())
    return saved == current


def load_result(workdir: str, config, *, eval_batches: int | None = None,
                test_split: str | None = None) -> dict | None:
    """The finished result of a run, or None when missing, trained with a different config, or
    evaluated differently (then the run is only re-evaluated: its checkpoint is complete)."""
    path = os.path.join(workdir, RESULT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    if not _same_config(result.get("config"), _config_json(config)):
        return None
    if eval_batches is not None and result.get("eval_batches") != eval_batches:
        return None
    if test_split is not None and result.get("test_split") != test_split:
        return None
    return result


# -- aggregation ----------------------------------------------------------------------------------

def _stats(values: Sequence[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "n": int(v.size), "values": v.tolist()}


def aggregate(results: Mapping[str, Mapping[int, dict]], baseline: str | None) -> dict:
    """Per router: mean/std over seeds of every metric; paired (same-seed) deltas vs baseline."""
    rows = {}
    byte = None
    for router, by_seed in results.items():
        seeds = sorted(by_seed)
        rs = [by_seed[s] for s in seeds]
        if not rs:
            continue
        byte = "bits_per_byte" in rs[0]["validation"]
        row = {
            "router": router,
            "label": ROUTERS[router].label if router in ROUTERS else router,
            "seeds": seeds,
            "step": rs[0]["step"],
            "tokens_seen": rs[0]["tokens_seen"],
            "params_total": rs[0]["params"]["total"],
            "params_active": rs[0]["params"]["active"],
            "params_router": rs[0]["params"]["router"],
            "val_loss": _stats([r["validation"]["loss"] for r in rs]),
            "test_loss": _stats([r["test"]["loss"] for r in rs]),
            "step_time_s": _stats([r.get("step_time_s") for r in rs]),
        }
        if byte:
            row["val_bpc"] = _stats([r["validation"]["bits_per_byte"] for r in rs])
            row["test_bpc"] = _stats([r["test"]["bits_per_byte"] for r in rs])
        if all("analysis" in r for r in rs):
            a = [r["analysis"] for r in rs]
            row["mi"] = _stats([x["mi_offdiagonal"] for x in a])
            row["gate_entropy"] = _stats([float(np.mean(x["gate_entropy"])) for x in a])
            row["inner_balance"] = _stats([float(np.mean(x["inner_balance"])) for x in a])
            row["outer_balance"] = _stats([float(np.mean(x["outer_balance"])) for x in a])
            row["expert_similarity"] = _stats([float(np.mean(x["expert_similarity"])) for x in a])
            g = [x.get("router_grad_norm") or {} for x in a]
            row["grad_lm"] = _stats([x.get("lm") for x in g])
            row["grad_balance"] = _stats([x.get("balance") for x in g])
        rows[router] = row
    if baseline in results:
        base = results[baseline]
        metric = "bits_per_byte" if byte else "loss"
        for router, row in rows.items():
            common = sorted(set(results[router]) & set(base))
            for split in ("validation", "test"):
                deltas = [results[router][s][split][metric] - base[s][split][metric] for s in common]
                row[f"delta_{split}"] = _stats(deltas)
    return {"rows": rows, "baseline": baseline, "metric": "bpc" if byte else "loss"}


def _pm(stat: Mapping | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def _signed(stat: Mapping | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    s = f"{stat['mean']:+.{digits}f}"
    return s + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def markdown_table(agg: Mapping) -> str:
    rows = agg["rows"]
    bpc = agg["metric"] == "bpc"
    m = "BPC" if bpc else "loss"
    head = ["router", "seeds", f"val {m}", f"test {m}"]
    if agg.get("baseline"):
        head += [f"Δ test {m} vs {agg['baseline']} (paired)"]
    if bpc:
        head += ["val loss", "test loss"]
    head += ["params (router)", "step time (s)"]
    has_analysis = any("mi" in r for r in rows.values())
    if has_analysis:
        head += ["MI", "entropy", "IB", "OB", "expert sim.", "router grad LM / bal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [f"{name} ({r['label']})", str(len(r["seeds"]))]
        if bpc:
            cells += [_pm(r["val_bpc"]), _pm(r["test_bpc"])]
        else:
            cells += [_pm(r["val_loss"]), _pm(r["test_loss"])]
        if agg.get("baseline"):
            cells.append(_signed(r.get("delta_test")) if name != agg["baseline"] else "—")
        if bpc:
            cells += [_pm(r["val_loss"]), _pm(r["test_loss"])]
        cells.append(f"{r['params_total'] / 1e6:.3f}M ({r['params_router'] / 1e3:.1f}K)")
        cells.append(_pm(r["step_time_s"], 3))
        if has_analysis:
            if "mi" in r:
                cells += [_pm(r["mi"], 3), _pm(r["gate_entropy"], 3), _pm(r["inner_balance"], 2),
                          _pm(r["outer_balance"], 3), _pm(r["expert_similarity"], 3),
                          f"{r['grad_lm']['mean']:.3g} / {r['grad_balance']['mean']:.3g}"
                          if r["grad_lm"]["mean"] is not None else "-"]
            else:
                cells += ["-"] * 6
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(agg: Mapping, results: Mapping, path: str) -> None:
    metrics = ["val_loss", "test_loss", "val_bpc", "test_bpc", "delta_validation", "delta_test",
               "step_time_s", "mi", "gate_entropy", "inner_balance", "outer_balance",
               "expert_similarity", "grad_lm", "grad_balance"]
    header = ["router", "label", "seeds", "step", "tokens_seen", "params_total", "params_active",
              "params_router"]
    for k in metrics:
        header += [f"{k}_mean", f"{k}_std", f"{k}_per_seed"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for name, r in agg["rows"].items():
            row = [name, r["label"], " ".join(map(str, r["seeds"])), r["step"], r["tokens_seen"],
                   r["params_total"], r["params_active"], r["params_router"]]
            for k in metrics:
                s = r.get(k)
                if s and s.get("mean") is not None:
                    row += [f"{s['mean']:.6g}", f"{s['std']:.6g}", " ".join(f"{v:.6g}" for v in s["values"])]
                else:
                    row += ["", "", ""]
            w.writerow(row)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    return np.convolve(y, kernel, mode="valid")


def plot_results(results: Mapping[str, Mapping[int, dict]], out: str) -> list[str]:
    """Loss curves, and per-router routing analyses side by side; returns the files written."""
    from rmoe_jax import analysis

    plt = analysis._pyplot()
    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (router, by_seed) in enumerate(results.items()):
        c = colors[i % len(colors)]
        for j, (seed, r) in enumerate(sorted(by_seed.items())):
            tr = np.asarray(r["curves"]["train"], np.float64)
            if tr.size:
                window = max(1, len(tr) // 40)
                ax_t.plot(tr[window - 1:, 0], _smooth(tr[:, 1], window), color=c, alpha=0.8,
                          linestyle="-" if j == 0 else "--",
                          label=f"{router} seed {seed}")
            ev = np.asarray(r["curves"]["eval"], np.float64)
            if ev.size:
                ax_e.plot(ev[:, 0], ev[:, 1], color=c, marker="o", markersize=3, alpha=0.8,
                          linestyle="-" if j == 0 else "--", label=f"{router} seed {seed}")
    for ax, title in ((ax_t, "train cross-entropy (moving average)"), (ax_e, "validation loss (in-loop eval: first train.eval_batches batches)")):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    # zoom on the second half, where the routers differ
    for ax, key in ((ax_t, "train"), (ax_e, "eval")):
        ys = [np.asarray(r["curves"][key], np.float64) for s in results.values() for r in s.values()]
        ys = [y for y in ys if y.size]
        if ys:
            tail = np.concatenate([y[len(y) // 3:, 1] for y in ys])
            lo, hi = np.percentile(tail, 1), np.percentile(tail, 99)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.15 * (hi - lo + 1e-3))
    fig.tight_layout()
    path = os.path.join(out, "loss_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    with_analysis = {k: v for k, v in results.items() if v and all("analysis" in r for r in v.values())}
    if with_analysis:
        n = len(with_analysis)
        fig, axes = plt.subplots(1, n, figsize=(3.3 * n + 0.8, 3.4), squeeze=False, layout="constrained")
        vmax = max(np.max(r["analysis"]["mi_matrix"]) for v in with_analysis.values() for r in v.values())
        for i, (ax, (router, by_seed)) in enumerate(zip(axes[0], with_analysis.items())):
            mi = np.mean([r["analysis"]["mi_matrix"] for r in by_seed.values()], axis=0)
            im = ax.imshow(mi, cmap="magma", vmin=0, vmax=vmax)
            off = mi[~np.eye(len(mi), dtype=bool)].mean() if len(mi) > 1 else float("nan")
            ax.set_title(f"{router}: MI (off-diag. mean {off:.2f})", fontsize=9)
            ax.set_xlabel("layer")
            if i == 0:
                ax.set_ylabel("layer")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="nats")
        path = os.path.join(out, "mutual_information.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for i, (router, by_seed) in enumerate(with_analysis.items()):
            c = colors[i % len(colors)]
            for key, ax, ylabel in (("gate_entropy", axes[0], "gate entropy (nats)"),
                                    ("inner_balance", axes[1], "IB: median top1/top2"),
                                    ("outer_balance", axes[2], "OB: mean top-k prob. sum")):
                vals = np.asarray([r["analysis"][key] for r in by_seed.values()])
                ax.plot(range(vals.shape[1]), vals.mean(0), marker="o", color=c, label=router)
                if len(vals) > 1:
                    ax.fill_between(range(vals.shape[1]), vals.min(0), vals.max(0), color=c, alpha=0.15)
                ax.set_xlabel("layer")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
        num = len(next(iter(next(iter(with_analysis.values())).values()))["analysis"]["expert_load"][0])
        axes[0].axhline(math.log(num), color="gray", linestyle="--", linewidth=0.8, label="ln E")
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, "gate_entropy.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, axes = plt.subplots(1, n, figsize=(3.0 * n + 0.8, 3.4), squeeze=False, layout="constrained")
        loads = {router: np.mean([r["analysis"]["expert_load"] for r in by_seed.values()], axis=0)
                 for router, by_seed in with_analysis.items()}
        vmax = max(2.0, max(float(load.max() * load.shape[1]) for load in loads.values()))
        for i, (ax, (router, load)) in enumerate(zip(axes[0], loads.items())):
            im = ax.imshow(load * load.shape[1], cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
            ax.set_title(f"{router}: load x uniform", fontsize=9)
            ax.set_xlabel("expert")
            if i == 0:
                ax.set_ylabel("layer")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="load / (1/E), mean over seeds")
        path = os.path.join(out, "expert_load.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(results: Mapping[str, Mapping[int, dict]], out: str, *, baseline: str | None,
                 command: str, config, plots: bool = True) -> dict:
    agg = aggregate(results, baseline)
    table = markdown_table(agg)
    total_runs = sum(len(v) for v in results.values())
    any_r = next((r for v in results.values() for r in v.values()), None)
    lines = [
        "# Router comparison",
        "",
        f"Command: `{command}`",
        "",
        f"Finished runs: {total_runs}. Each: {agg['rows'][next(iter(agg['rows']))]['step'] if agg['rows'] else 0} "
        f"steps, {any_r['tokens_seen'] if any_r else 0:,} training tokens; dataset "
        f"`{config.data.dataset}` ({config.data.tokenizer} tokens, seq {config.data.seq_len}); "
        f"{config.model.num_layers} layers, d_model {config.model.d_model}, "
        f"{config.model.moe.num_experts} experts top-{config.model.moe.top_k} (FFN "
        f"{config.model.moe.expert_hidden}), dispatch {config.model.moe.dispatch}.",
        f"Validation = first {any_r['eval_batches'] if any_r else '?'} batches of "
        f"`{config.data.eval_split}`, test = the same of `{any_r['test_split'] if any_r else '?'}` "
        "(0 = whole split). Mean ± sample std over seeds; the Δ column pairs runs of the same seed "
        "(same init seed and data order) and gives mean ± std of the per-seed differences "
        "(negative = better than the baseline).",
        "",
        table,
        "",
        "Columns: MI = mean off-diagonal cross-layer mutual information of routing (nats, 100 bins); "
        "entropy = mean gate entropy over layers (nats); IB = inner balance, median top-1/top-2 "
        "probability ratio (mean over layers); OB = outer balance, mean top-k probability sum; "
        "expert sim. = mean expert-signature cosine (diagonal included); router grad = norm of the "
        "LM-loss and balance-loss gradients w.r.t. router params. Analyses are on validation "
        "tokens of the final checkpoint. Step time is the median over logging intervals of the "
        "wall time per train step (evals and checkpoints excluded; on a shared CPU it is noisy).",
        "",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    write_csv(agg, results, os.path.join(out, "results.csv"))
    summary = {"command": command, "aggregate": agg,
               "runs": {r: {str(s): {k: v for k, v in res.items() if k not in ("curves", "config")}
                            for s, res in by_seed.items()} for r, by_seed in results.items()}}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    if plots and total_runs:
        plot_results(results, out)
    return agg


# -- the runner -----------------------------------------------------------------------------------

def compare(base_config, routers: Sequence[str], seeds: Sequence[int], out: str, *,
            eval_batches: int | None = None, test_split: str = "test", analysis_batches: int = 4,
            baseline: str | None = None, command: str = "", log=print) -> dict:
    """Train and evaluate every (router, seed) not already finished in `out`; write the report."""
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    eval_batches = int(base_config.train.eval_batches if eval_batches is None else eval_batches)
    if baseline is None:
        baseline = "smoe" if "smoe" in routers else routers[0]
    results: dict[str, dict[int, dict]] = {r: {} for r in routers}
    # seed-major order: with a time limit, every router gets its seed 0 before any seed 1
    for seed in seeds:
        for router in routers:
            config = run_config(base_config, router, seed)
            workdir = os.path.join(out, "runs", run_name(router, seed))
            result = load_result(workdir, config, eval_batches=eval_batches, test_split=test_split)
            if result is None:
                log(f"== {run_name(router, seed)}: training ({ROUTERS[router].label})")
                result = train_and_evaluate(config, workdir, eval_batches=eval_batches,
                                            test_split=test_split, analysis_batches=analysis_batches,
                                            log=log)
            else:
                log(f"== {run_name(router, seed)}: already finished, skipped")
            results[router][seed] = result
            write_report(results, out, baseline=baseline, command=command, config=base_config)
    agg = write_report(results, out, baseline=baseline, command=command, config=base_config)
    log(markdown_table(agg))
    return agg


def main(argv=None) -> int:
    from absl import app, flags, logging
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).",
                                                  lock_config=True)
    routers_flag = flags.DEFINE_string("routers", "smoe,rmoe",
                                       "Comma-separated router names ('help' lists them).")
    seeds_flag = flags.DEFINE_integer("seeds", 1, "Seeds per router: 0 .. seeds-1.")
    first_seed_flag = flags.DEFINE_integer("first_seed", 0, "First seed.")
    out_flag = flags.DEFINE_string("out", None, "Output folder (runs, table, plots).")
    eval_flag = flags.DEFINE_integer("eval_batches", None,
                                     "Final val/test eval batches (default train.eval_batches; 0 = whole split).")
    test_flag = flags.DEFINE_string("test_split", "test", "Split for the test column.")
    analysis_flag = flags.DEFINE_integer("analysis_batches", 4,
                                         "Validation batches for the routing analyses (0 = skip).")
    baseline_flag = flags.DEFINE_string("baseline", None, "Router the Δ column compares to "
                                        "(default smoe if listed, else the first).")
    flags.mark_flags_as_required(["config", "out"])

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
        if routers_flag.value == "help":
            print(router_help())
            return 0
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        from rmoe_jax.config import ConfigError

        try:
            routers = parse_routers(routers_flag.value)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if baseline_flag.value and baseline_flag.value not in routers:
            print(f"error: --baseline {baseline_flag.value} is not in --routers", file=sys.stderr)
            return 2
        seeds = list(range(first_seed_flag.value, first_seed_flag.value + seeds_flag.value))
        command = "python -m rmoe_jax.compare " + " ".join(sys.argv[1:] if argv is None else argv[1:])
        try:
            compare(config_flag.value, routers, seeds, out_flag.value, eval_batches=eval_flag.value,
                    test_split=test_flag.value, analysis_batches=analysis_flag.value,
                    baseline=baseline_flag.value, command=command)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    from rmoe_jax import cli

    cli.run(_main, argv=argv)  # a flag or config mistake: one line, exit 2
    return 0


if __name__ == "__main__":
    main()
