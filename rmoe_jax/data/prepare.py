"""Prepare a dataset (and a SentencePiece model) ahead of time; print what was written.

    python -m rmoe_jax.data.prepare --dataset shakespeare --data_dir DIR
    python -m rmoe_jax.data.prepare --dataset shakespeare --data_dir DIR \\
        --tokenizer sentencepiece --sentencepiece_vocab_size 8000
    python -m rmoe_jax.data.prepare --dataset enwik8 --data_dir DIR   # zip in DIR/downloads/manual
    python -m rmoe_jax.data.prepare --dataset lm1b --data_dir DIR     # TFDS catalog, downloads

Building is idempotent: what is already there is reused (pass --force to retrain the
SentencePiece model). Multi-host runs should prepare once, before training, into a shared
data dir. The SentencePiece model is trained on the train split only and saved beside the
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
    p.add_argument("--dataset", default=defaults.dataset,
                   help="shakespeare | enwik8 | a TFDS catalog name (lm1b, c4/en, ...)")
    p.add_argument("--data_dir", default=defaults.data_dir,
                   help="TFDS data dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--feature_key", default=defaults.feature_key,
                   help="catalog datasets: the text feature")
    p.add_argument("--tokenizer", default="byte", choices=("byte", "sentencepiece"),
                   help="sentencepiece: also train a model on the train split")
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
                  "enwik8_validation_bytes", "enwik8_test_bytes"):
        data[field] = getattr(args, field)
    data.allow_download = not args.no_download
    return data


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    data = config_from_args(args)
    problems = data_problems(data)
    if problems:
        print("invalid arguments:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2

    # Imported here so `--help` and argument errors do not pay for TFDS/grain imports.
    from rmoe_jax.config import ConfigError
    from rmoe_jax.data import loader, sources, tokenizers
    from rmoe_jax.data.errors import DataNotPreparedError

    try:
        start = time.perf_counter()
        builder = sources.prepare_dataset(data, download_catalog=True)
        print(f"dataset {data.dataset}: {builder.data_dir} "
              f"({time.perf_counter() - start:.1f}s)")
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
    except (DataNotPreparedError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
