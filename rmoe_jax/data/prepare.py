"""Prepare a dataset (and a SentencePiece model) ahead of time; print what was written.

    python -m rmoe_jax.data.prepare --dataset shakespeare --data_dir DIR
    python -m rmoe_jax.data.prepare --dataset shakespeare --data_dir DIR \\
        --tokenizer sentencepiece --sentencepiece_vocab_size 8000
    python -m rmoe_jax.data.prepare --dataset enwik8 --data_dir DIR   # zip in DIR/downloads/manual
    python -m rmoe_jax.data.prepare --dataset lm1b --data_dir DIR     # TFDS catalog, downloads
    python -m rmoe_jax.data.prepare --dataset files --train_files 'corpus/*.jsonl.gz' \
        --tokenizer huggingface --tokenizer_file tokenizer.json --data_dir DIR  # your files
    python -m rmoe_jax.data.prepare --config configs/llama_0p91b.py:files \
        --config.data.train_files='corpus/*.parquet' --config.data.tokenizer_file=tok.json

With --config, the data fields are exactly those the training run reads (the config file's,
then `--config.data.FIELD=VALUE` overrides, as for train.py), so the prepared dataset is the
one training looks for; the other data flags are then refused.

Building is idempotent: what is already there is reused (pass --force to retrain the
SentencePiece model). Multi-host runs should prepare once, before training, into a shared
data dir. `files` tokenizes in worker processes (--workers), shows a progress bar, and an
interrupted preparation re-run continues where it stopped. The SentencePiece model is trained on the train split only and saved beside the
data, at `<data_dir>/<dataset>/sentencepiece_<vocab>.model` (see `tokenizers`).
"""

from __future__ import annotations

import argparse
import sys
import time

import ml_collections

from rmoe_jax.config import data_config, data_problems


def _parser() -> argparse.ArgumentParser:
    defaults = data_config()
    p = argparse.ArgumentParser(prog="python -m rmoe_jax.data.prepare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None,
                   help="a training config file (path[:arg]): prepare its data; override "
                        "fields with --config.data.FIELD=VALUE")
    p.add_argument("--dataset", default=defaults.dataset,
                   help="shakespeare | enwik8 | a TFDS catalog name (lm1b, c4/en, ...)")
    p.add_argument("--data_dir", default=defaults.data_dir,
                   help="TFDS data dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--feature_key", default=defaults.feature_key,
                   help="catalog datasets: the text feature")
    p.add_argument("--tokenizer", default="byte", choices=("byte", "sentencepiece", "huggingface"),
                   help="sentencepiece: a --sentencepiece_model, or train one on the train split; "
                        "huggingface: a --tokenizer_file")
    p.add_argument("--tokenizer_file", default=defaults.tokenizer_file,
                   help="huggingface: the tokenizer.json")
    files = p.add_argument_group("your own files (--dataset files)")
    files.add_argument("--train_files", default="", help="comma-separated globs or folders")
    files.add_argument("--validation_files", default="",
                       help="'' = hold out --heldout_fraction of the train documents")
    files.add_argument("--test_files", default="", help="as --validation_files")
    files.add_argument("--file_format", default=defaults.file_format,
                       choices=("auto", "txt", "jsonl", "parquet"))
    files.add_argument("--text_field", default=defaults.text_field,
                       help="jsonl field / parquet column holding the text")
    files.add_argument("--document_delimiter", default=defaults.document_delimiter,
                       help="txt: '' = a file is a document, else e.g. '\\n\\n'")
    files.add_argument("--encoding_errors", default=defaults.encoding_errors,
                       choices=("error", "replace"))
    files.add_argument("--heldout_fraction", type=float, default=defaults.heldout_fraction)
    files.add_argument("--heldout_seed", type=int, default=defaults.heldout_seed)
    files.add_argument("--workers", type=int, default=defaults.prepare_workers,
                       help="tokenizer processes; 0 = one per core")
    p.add_argument("--sentencepiece_vocab_size", type=int,
                   default=defaults.sentencepiece_vocab_size)
    p.add_argument("--sentencepiece_model", default=defaults.sentencepiece_model,
                   help="where to write the model ('' = beside the data)")
    p.add_argument("--sentencepiece_model_type", default="unigram",
                   choices=("unigram", "bpe", "char", "word"))
    p.add_argument("--sentencepiece_max_sentences", type=int, default=1_000_000,
                   help="train on at most this many (evenly spaced) lines; 0 = all")
    p.add_argument("--train_split", default=defaults.train_split)
    p.add_argument("--seq_len", type=int, default=defaults.seq_len,
                   help="only for the window counts printed")
    p.add_argument("--enwik8_train_bytes", type=int, default=defaults.enwik8_train_bytes)
    p.add_argument("--enwik8_validation_bytes", type=int,
                   default=defaults.enwik8_validation_bytes)
    p.add_argument("--enwik8_test_bytes", type=int, default=defaults.enwik8_test_bytes)
    p.add_argument("--no_download", action="store_true",
                   help="never fetch raw files (enwik8.zip) from the network")
    p.add_argument("--force", action="store_true", help="retrain an existing SentencePiece model")
    return p


def config_from_args(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The data config the command line describes (defaults from `data_config()`)."""
    data = data_config()
    for field in ("dataset", "data_dir", "feature_key", "tokenizer", "sentencepiece_vocab_size",
                  "sentencepiece_model", "train_split", "seq_len", "enwik8_train_bytes",
                  "enwik8_validation_bytes", "enwik8_test_bytes", "tokenizer_file",
                  "train_files", "validation_files", "test_files", "file_format", "text_field",
                  "document_delimiter", "encoding_errors", "heldout_fraction", "heldout_seed"):
        data[field] = getattr(args, field)
    data.prepare_workers = args.workers
    data.allow_download = not args.no_download
    return data


def _throughput(stats: dict) -> str:
    """One line: what the tokenizing stage did and how fast."""
    seconds = max(stats["seconds"], 1e-9)
    resumed = (f", {stats['units_done_before']} done before and kept"
               if stats["units_done_before"] else "")
    return (f"  tokenized {stats['units']} unit(s){resumed}: {stats['documents']:,} documents, "
            f"{stats['bytes'] / 1e6:,.1f} MB, {stats['tokens']:,} tokens in {seconds:.1f}s with "
            f"{stats['workers']} worker(s): {stats['bytes'] / 1e6 / seconds:,.2f} MB/s, "
            f"{stats['tokens'] / seconds:,.0f} tokens/s")


_CONFIG_ONLY_FLAGS = ("workers", "force", "no_download", "sentencepiece_model_type",
                      "sentencepiece_max_sentences", "config")


def _parse_value(text: str, old):
    """`text` as the type of the config's current value `old`."""
    if isinstance(old, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    return text


def config_from_file(args: argparse.Namespace, overrides: list[str]) -> ml_collections.ConfigDict:
    """The data config of `--config` with the `--config.data.FIELD=VALUE` overrides applied.

    Raises:
      CliError: the file does not load, an override is malformed, unknown or of the wrong type.
    """
    from rmoe_jax import cli

    config = cli.load_config_file(args.config)
    fields = {}
    for item in overrides:
        path, sep, text = item[len("--config."):].partition("=")
        if not item.startswith("--config.data.") or not sep:
            raise cli.CliError(f"{item}: with --config, set data fields as "
                               "--config.data.FIELD=VALUE")
        if not cli.field_exists(config, path):
            raise cli.CliError(cli.unknown_field_message(config, path))
        old = config.data[path[len("data."):]] if "." not in path[5:] else None
        try:
            fields[path] = _parse_value(text, old)
        except ValueError as e:
            raise cli.CliError(f"{item}: {e}") from None
    cli.apply_overrides(config, fields, flag="--config.")
    data = config.data
    if args.workers:
        data.prepare_workers = args.workers
    if args.no_download:
        data.allow_download = False
    return data


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if args.config is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        data = config_from_args(args)
    else:
        given = [a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])
                 if a.startswith("--") and not a.startswith("--config")]
        refused = [g for g in given if g[2:] not in _CONFIG_ONLY_FLAGS]
        if refused:
            print(f"error: {', '.join(refused)}: with --config, set data fields as "
                  "--config.data.FIELD=VALUE", file=sys.stderr)
            return 2
        from rmoe_jax.cli import CliError

        try:
            data = config_from_file(args, unknown)
        except CliError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    problems = data_problems(data)
    if problems:
        print("invalid arguments:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2

    # Imported here so `--help` and argument errors do not pay for TFDS/grain imports.
    from rmoe_jax.config import ConfigError
    from rmoe_jax.data import loader, sources, tokenizers
    from rmoe_jax.data.errors import BadInputError, DataNotPreparedError

    try:
        start = time.perf_counter()
        builder = sources.prepare_dataset(data, download_catalog=True, progress=True)
        print(f"dataset {data.dataset}: {builder.data_dir} "
              f"({time.perf_counter() - start:.1f}s)")
        stats = getattr(builder, "tokenize_stats", None)
        if stats is not None:
            print(_throughput(stats))
        for split, info in sorted(builder.info.splits.items()):
            print(f"  {split}: {info.num_examples} records, {info.num_bytes:,} bytes on disk")

        if data.tokenizer == "sentencepiece":
            path = tokenizers.sentencepiece_model_path(data)
            if path.exists() and not args.force:
                print(f"sentencepiece model exists, kept: {path} (--force retrains)")
            else:
                start = time.perf_counter()
                docs = sources.read_documents(data, data.train_split)
                tokenizers.train_sentencepiece(
                    docs, path, data.sentencepiece_vocab_size,
                    model_type=args.sentencepiece_model_type,
                    max_sentences=args.sentencepiece_max_sentences)
                print(f"sentencepiece model: {path} (vocab {data.sentencepiece_vocab_size}, "
                      f"{args.sentencepiece_model_type}, trained on {data.train_split} in "
                      f"{time.perf_counter() - start:.1f}s)")

        if sources.is_own(data.dataset):  # catalog splits may be far too big to tokenize here
            for split in sources.OWN_SPLITS:
                stats = loader.split_stats(data, split)
                print(f"  {split} with {data.tokenizer} tokens: " +
                      ", ".join(f"{k}={v:,}" for k, v in stats.items()) +
                      f" (seq_len={data.seq_len})")
    except (DataNotPreparedError, ConfigError, BadInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
