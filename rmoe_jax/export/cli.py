"""The command line: `python -m rmoe_jax.export --workdir RUN --out FOLDER` (`main`).

Exit status 0, or 2 with one `error: ...` line for a mistake (a non-empty --out, a missing
step, a variant the transformers code cannot run, ...).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Optional

from rmoe_jax import config as config_lib
from rmoe_jax.checkpoint import _quiet_logs
from rmoe_jax.export.spec import CONFIG_FILE, DEFAULT_MAX_SHARD_SIZE, EXPORT_DTYPES, ExportError
from rmoe_jax.export.writer import export_workdir


def main(argv: Optional[Iterable[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rmoe_jax.export",
        description="Export a training checkpoint to safetensors + config.json "
                    "(README: Export format); SMoE exports load in transformers' Mixtral.")
    parser.add_argument("--workdir", required=True, help="training workdir (train.py --workdir)")
    parser.add_argument("--out", required=True, help="export folder to create")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES))
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="split the weights into shards of at most this size, with an index "
                             "(e.g. 5GB, 500MB, 2GiB; default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the contents of a non-empty --out")
    parser.add_argument("--tokenizer_file", default=None,
                        help="tokenizer file to include: a SentencePiece .model or a "
                             "tokenizer.json (default: the run's own)")
    parser.add_argument("--skip_tokenizer", action="store_true",
                        help="export without the tokenizer's files")
    parser.add_argument("--skip_remote_code", action="store_true",
                        help="RMoE: export without the transformers modeling code (by default "
                             "it is included, and a variant it cannot run is refused)")
    args = parser.parse_args(argv)
    _quiet_logs()
    try:
        out = export_workdir(args.workdir, args.out, step=args.step, dtype=args.dtype,
                             max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                             tokenizer_file=args.tokenizer_file, skip_tokenizer=args.skip_tokenizer,
                             remote_code=not args.skip_remote_code)
    except (ExportError, FileNotFoundError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(out, CONFIG_FILE)) as f:
        block = json.load(f)["rmoe_jax"]
    files = sorted(os.listdir(out))
    print(f"exported step {block['source'].get('step')} of {block['source'].get('workdir')} to "
          f"{out} ({block['dtype']}): {', '.join(files)}")
    if block["model"]["router"]["name"] in ("linear", "random") and block["transformers_notes"]:
        print("warning: transformers' MixtralForCausalLM loads this export but will not reproduce "
              "the model's logits: " + "; ".join(block["transformers_notes"]), file=sys.stderr)
    return 0
