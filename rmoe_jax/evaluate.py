"""Evaluate a checkpoint (or an export) over a whole data split: loss, bits per byte, perplexity.

    python -m rmoe_jax.evaluate --workdir runs/rmoe --split test [--step N] [--batch_size 16]
    python -m rmoe_jax.evaluate --export exports/rmoe --split validation

Every target token of the split counts exactly once: the split is cut into windows of
`data.seq_len` (`rmoe_jax.data.make_eval_batches`), the last window and the last batch are
padded with weight 0, and the loss is (sum of weighted cross-entropies) / (number of real
targets), summed in float64 over batches. No dropout; deterministic. The model runs as it was
trained (its own dtype and dispatch; a capacity-dispatch model drops tokens as in training's
evaluation). Byte tokenizer: bits per byte = loss / ln 2 (BPC on enwik8); subword tokenizers:
perplexity = exp(loss).

Prints one JSON line; `--output FILE` also writes it to FILE.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from rmoe_jax import checkpoint as checkpoint_lib
from rmoe_jax import export as export_lib
from rmoe_jax.config import eval_batch_size


def make_eval_fn(model_config: ml_collections.ConfigDict):
    """jit(params, batch) -> {'ce_sum', 'weight_sum', ...}: the trainer's own eval step."""
    from rmoe_jax.model import build_model
    from rmoe_jax.train.step import make_eval_step

    return jax.jit(make_eval_step(build_model(model_config)))


def evaluate_batches(model_config: ml_collections.ConfigDict, params, batches: Iterable[dict], *,
                     byte_level: bool, eval_fn=None) -> dict:
    """Loss over `batches` ({'inputs', 'targets', 'weights'} of one fixed shape).

    Returns loss (nats per target token), tokens (real targets counted), ce_sum (nats),
    batches, aux_loss, and bits_per_byte (byte_level) or perplexity.
    """
    from rmoe_jax.train.step import eval_sums, finish_eval

    eval_fn = eval_fn or make_eval_fn(model_config)
    sums = eval_sums(eval_fn, jax.device_put(params),
                    ({k: jnp.asarray(v) for k, v in batch.items()} for batch in batches))
    result = finish_eval(sums, byte_level=byte_level)
    result.update(ce_sum=float(sums["ce_sum"]), batches=int(sums["batches"]))
    return result


def evaluate_split(model_config: ml_collections.ConfigDict, params,
                   data_config: ml_collections.ConfigDict, *, split: str, batch_size: int,
                   max_batches: int = 0) -> dict:
    """Evaluate over every window of `split` (or only its first `max_batches` batches)."""
    from rmoe_jax.data import dataset_info, make_eval_batches, split_stats

    info = dataset_info(data_config)
    if info.vocab_size > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {info.vocab_size} tokens, the model only "
                         f"{model_config.vocab_size}")
    batches = make_eval_batches(data_config, split=split, batch_size=batch_size,
                                max_batches=max_batches)
    stats = split_stats(data_config, split)
    result = evaluate_batches(model_config, params, batches,
                              byte_level=data_config.tokenizer == "byte")
    result.update(split=split, seq_len=int(data_config.seq_len), batch_size=int(batch_size),
                  split_targets=stats["num_targets"], split_bytes=stats["num_bytes"],
                  complete=max_batches == 0 or int(result["tokens"]) == stats["num_targets"])
    return result


@dataclasses.dataclass
class LoadedModel:
    model_config: ml_collections.ConfigDict
    params: object  # numpy arrays
    data_config: Optional[ml_collections.ConfigDict]  # None for an export written without one
    eval_batch_size: int  # the run's eval batch size (0 when unknown)
    source: dict  # where it came from: workdir + step, or export folder


def load_model(workdir: Optional[str] = None, export: Optional[str] = None,
               step: Optional[int] = None) -> LoadedModel:
    """The model of a training workdir (latest checkpoint, or `step`) or of an export folder."""
    if (workdir is None) == (export is None):
        raise ValueError("give exactly one of --workdir and --export")
    if workdir is not None:
        ckpt = checkpoint_lib.load_workdir(workdir, step)
        train = ckpt.config.train
        return LoadedModel(ckpt.config.model, ckpt.params, ckpt.config.data,
                           eval_batch_size(train),
                           {"workdir": ckpt.workdir, "step": ckpt.step})
    if step is not None:
        raise ValueError("--step applies to --workdir only (an export holds one step)")
    exported = export_lib.read_export(export)
    source = dict(exported.config_json.get("rmoe_jax", {}).get("source", {}))
    source["export"] = exported.folder
    return LoadedModel(exported.model_config, exported.params, exported.data_config, 0, source)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rmoe_jax.evaluate", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir (train.py --workdir)")
    source.add_argument("--export", help="export folder (python -m rmoe_jax.export --out)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--split", default="test",
                        help="data split: test, validation, train, or a slice of one: "
                             "'test[:10%%]' is the first 10%% of its windows of seq_len tokens "
                             "(shakespeare, enwik8; a TFDS dataset's slices count records); "
                             "default %(default)s")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="sequences per batch (default: the run's eval batch size)")
    parser.add_argument("--data_dir", default=None, help="override the run's data.data_dir")
    parser.add_argument("--max_batches", type=int, default=0,
                        help="evaluate only the first N batches (default 0: the whole split)")
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    checkpoint_lib._quiet_logs()
    from rmoe_jax.config import ConfigError
    from rmoe_jax.data.errors import DataNotPreparedError

    try:
        loaded = load_model(args.workdir, args.export, args.step)
        data_config = loaded.data_config
        if data_config is None:
            raise ValueError(f"{args.export} has no data config (exported without one)")
        if args.data_dir is not None:
            data_config.data_dir = args.data_dir
        batch_size = args.batch_size or loaded.eval_batch_size or 8
        if batch_size <= 0:
            raise ValueError(f"--batch_size must be > 0, got {batch_size}")
        start = time.time()
        result = evaluate_split(loaded.model_config, loaded.params, data_config, split=args.split,
                                batch_size=batch_size, max_batches=args.max_batches)
    except (ValueError, FileNotFoundError, ConfigError, DataNotPreparedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(loaded.source, dataset=data_config.dataset, tokenizer=data_config.tokenizer,
                  seconds=round(time.time() - start, 2))
    line = json.dumps(result, sort_keys=True)
    print(line)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
