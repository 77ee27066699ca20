"""Routing analyses of a trained run (the paper, section 6), from the command line.

    python -m rmoe_jax.analyze --workdir runs/enwik8_rmoe [--split validation] [--batches 8]
        [--step N] [--out DIR] [--no_grad_norms]

Restores the run's checkpoint (latest, or --step), records the router outputs over the first
--batches eval batches of --split, and writes into --out (default <workdir>/analysis):

    analysis.json            cross-layer mutual information matrix, gate entropy, inner/outer
                             balance, expert load and capacity drop ratio per layer, expert
                             similarity, router gradient norm (LM vs balance loss), eval loss
    expert_load.png          layer x expert heatmap of the routing-slot share (x uniform)
    mutual_information.png   the layer x layer MI matrix
    gate_entropy.png         gate entropy per layer (ln E = uniform)

Several workdirs may be given (comma-separated): each gets its own analysis, and a
gate-entropy plot comparing them is written to --out when it is given.
Exit status 2 when a workdir has no checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rmoe_jax.analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="training workdir (comma-separated for several)")
    parser.add_argument("--split", default="validation", help="data split to record routing on")
    parser.add_argument("--batches", type=int, default=8, help="eval batches to record (0 = whole split)")
    parser.add_argument("--batch_size", type=int, default=0, help="sequences per batch (0 = the run's eval batch)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--out", default=None, help="output folder (default: <workdir>/analysis)")
    parser.add_argument("--no_grad_norms", action="store_true", help="skip the router gradient norms")
    parser.add_argument("--no_plots", action="store_true", help="write only analysis.json")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from rmoe_jax import analysis, cli

    cli.quiet_logs()

    workdirs = [w for w in args.workdir.split(",") if w]
    summaries = {}
    for workdir in workdirs:
        out = args.out
        if out and len(workdirs) > 1:
            out = os.path.join(out, os.path.basename(os.path.normpath(workdir)))
        try:
            summary = analysis.analyze_workdir(
                workdir, split=args.split, batches=args.batches, batch_size=args.batch_size,
                step=args.step, out_dir=out, plots=not args.no_plots,
                grad_norms=not args.no_grad_norms)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        summaries[workdir] = summary
        print(analysis.format_summary(summary))
        print(f"  written to {out or os.path.join(workdir, analysis.ANALYSIS_DIR)}")
    if len(workdirs) > 1 and args.out and not args.no_plots:
        num = next(iter(summaries.values()))["num_experts"]
        analysis.plot_per_layer(
            {os.path.basename(os.path.normpath(w)): s["gate_entropy"]["per_layer"] for w, s in summaries.items()},
            os.path.join(args.out, "gate_entropy.png"), "gate entropy (nats)", "gate entropy per layer",
            hline=math.log(num))
    return 0


if __name__ == "__main__":
    sys.exit(main())
