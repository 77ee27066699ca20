"""TFDS builder `files`: your own text files, tokenized once, stored as array_record of token ids.

Input: `data.train_files` (and optionally `validation_files`, `test_files`): globs or folders
of .txt, .jsonl(.gz) or .parquet files (`rmoe_jax.data.file_corpus`). A split without files
of its own is held out of the train files, whole documents: the `heldout_fraction` of them
(at least one) with the smallest seeded scores, so the choice is reproducible and never
depends on the number of worker processes.

Output: per split, the packed token stream (documents in file order, the tokenizer's
separator before each) as records `{'tokens': bytes, 'index': int64}` of `CHUNK_TOKENS`
tokens (the last one shorter) in little-endian `dtype`, in order (`disable_shuffling`).
`rmoe_jax.data.token_chunks.TokenChunks` reads them back a chunk at a time. The dataset's
metadata (`metadata.json`) holds the dtype, the chunk size, the files and, per split, its
documents, UTF-8 bytes and tokens.

The builder config's name is a key over everything the tokens depend on: every file's path,
size and modification time, the reading options, the held-out choice and the tokenizer
(type and a SHA-256 of its file). A changed corpus or tokenizer is a different dataset,
built in its own folder `<data_dir>/files/<name>/`; an old build is never read back for it,
nor overwritten.

Preparation tokenizes in worker processes into a shard folder first
(`<data_dir>/downloads/rmoe_files/<name>/`, see `rmoe_jax.data.file_tokenizing`), which makes
an interrupted run resumable; TFDS then writes the records into a temporary folder that it
renames only when complete, and the shard folder is removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from rmoe_jax.data import file_corpus, file_tokenizing, tokenizers
from rmoe_jax.data.builders.base import Builder
from rmoe_jax.data.errors import BadInputError

CHUNK_TOKENS = 1 << 16
SPLITS = ("train", "validation", "test")
_FORMAT_VERSION = 1  # bump when the stored layout changes: every key changes with it


@dataclasses.dataclass
class FilesConfig(tfds.core.BuilderConfig):
    """`spec`: JSON of everything the tokens depend on (see `make_config`)."""

    spec: str = "{}"


def corpus_files(data: ml_collections.ConfigDict) -> dict[str, list[str]]:
    """{split: files} for the splits given files, train first.

    Raises:
      BadInputError: a glob names nothing, or a file is given for two splits.
    """
    files = {}
    for split in SPLITS:
        spec = data[f"{split}_files"]
        if spec:
            files[split] = file_corpus.expand_files(spec, f"data.{split}_files", data.file_format)
    seen: dict[str, str] = {}
    for split, paths in files.items():
        for path in paths:
            if path in seen:
                raise BadInputError(
                    f"{path} is both a {seen[path]} file and a {split} file (data.{seen[path]}"
                    f"_files and data.{split}_files overlap): evaluation would score text the "
                    "model trained on; make the globs disjoint")
            seen[path] = split
    return files


def _file_hash(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def make_config(data: ml_collections.ConfigDict) -> FilesConfig:
    """The builder config for `data`: stats every file and hashes the tokenizer's file."""
    files = corpus_files(data)
    stats = {split: [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]
             for split, paths in files.items()}
    tokenizer_path = tokenizers.tokenizer_file(data)
    if tokenizer_path is not None and not tokenizer_path.is_file():
        tokenizers.make_tokenizer(data)  # raises the error naming the missing file
    heldout = [s for s in SPLITS[1:] if s not in files]
    spec = {
        "format_version": _FORMAT_VERSION,
        "chunk_tokens": CHUNK_TOKENS,
        "files": stats,
        "read": dataclasses.asdict(_read_options(data)),
        "heldout": {"splits": heldout, "fraction": data.heldout_fraction if heldout else 0,
                    "seed": data.heldout_seed if heldout else 0},
        "tokenizer": {**file_tokenizing.tokenizer_spec(data),
                      "sha256": _file_hash(tokenizer_path) if tokenizer_path else None},
    }
    text = json.dumps(spec, sort_keys=True)
    name = f"{data.tokenizer}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    total = sum(len(p) for p in files.values())
    return FilesConfig(name=name, spec=text, description=f"{total} files, {data.tokenizer} tokens")


def _read_options(data: ml_collections.ConfigDict) -> file_corpus.ReadOptions:
    return file_corpus.ReadOptions(file_format=data.file_format, text_field=data.text_field,
                                   document_delimiter=data.document_delimiter,
                                   encoding_errors=data.encoding_errors)


def _chunks(pieces: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of token arrays into arrays of exactly `size` (the last one shorter)."""
    pending, count = [], 0
    for piece in pieces:
        while piece.size:
            take = min(size - count, piece.size)
            pending.append(piece[:take])
            count += take
            piece = piece[take:]
            if count == size:
                yield np.concatenate(pending)
                pending, count = [], 0
    if count:
        yield np.concatenate(pending)


class Files(Builder):
    """A user's files as token-id chunks; see the module docstring."""

    name = "files"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Packed token streams in chunks of 65,536 tokens."}
    BUILDER_CONFIGS = []

    def __init__(self, *, workers: int = 0, progress: bool = True, **kwargs):
        """`workers`: tokenizer processes (0: one per core); `progress`: a bar on a terminal."""
        self._workers = workers
        self._progress = progress
        self.tokenize_stats: dict | None = None  # set by a build, for the prepare CLI
        super().__init__(**kwargs)

    @property
    def spec(self) -> dict:
        return json.loads(self.builder_config.spec)

    def shard_dir(self) -> str:
        return os.path.join(self.data_dir_root, "downloads", "rmoe_files", self.builder_config.name)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Scalar(dtype=np.object_, doc="little-endian token ids"),
                "index": tfds.features.Scalar(dtype=np.int64, doc="chunk number in the split"),
            }),
            disable_shuffling=True,  # records stay in stream order
            metadata=tfds.core.MetadataDict(),
        )

    def download_and_prepare(self, *args, **kwargs):
        super().download_and_prepare(*args, **kwargs)
        shutil.rmtree(self.shard_dir(), ignore_errors=True)  # the records hold it all now

    def _units(self) -> list[file_corpus.Unit]:
        files = {split: [p for p, _, _ in entries] for split, entries in self.spec["files"].items()}
        return file_corpus.plan_units(files, self.spec["read"]["file_format"])

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        spec = self.spec
        options = file_corpus.ReadOptions(**spec["read"])
        tokenizer_spec = {k: v for k, v in spec["tokenizer"].items() if k != "sha256"}
        units = self._units()
        self.tokenize_stats = file_tokenizing.tokenize_units(
            units, options, tokenizer_spec, self.shard_dir(), seed=spec["heldout"]["seed"],
            workers=self._workers, progress=self._progress)
        logging.info("files: tokenized %s", self.tokenize_stats)
        dtype = file_tokenizing.load_tokenizer(tokenizer_spec).stream_dtype
        shards = [file_tokenizing.load_shard(self.shard_dir(), u, dtype) for u in units]
        if any(s is None for s in shards):
            raise BadInputError(f"the tokenized shards in {self.shard_dir()} changed while "
                                "preparing; run the preparation again")
        codes = self._assign(units, shards)
        self._write_metadata(spec, units, shards, codes, dtype)
        return {split: self._generate_examples(split, units, shards, codes) for split in SPLITS}

    def _assign(self, units, shards) -> list[np.ndarray]:
        """Per unit, the split index (0 train, 1 validation, 2 test) of each document."""
        heldout = self.spec["heldout"]
        codes = [np.full(s.scores.shape, SPLITS.index(u.role), np.int8)
                 for u, s in zip(units, shards)]
        if not heldout["splits"]:
            return codes
        train = [i for i, u in enumerate(units) if u.role == "train"]
        scores = np.sort(np.concatenate([shards[i].scores for i in train]))
        wanted = max(1, round(heldout["fraction"] * scores.size))
        if scores.size < len(heldout["splits"]) * wanted + 1:
            raise BadInputError(
                f"the train files hold {scores.size} document(s), too few to hold out "
                f"{' and '.join(heldout['splits'])} whole documents: give data."
                f"{heldout['splits'][0]}_files, or split the files into documents "
                "(data.document_delimiter, e.g. '\\n\\n')")
        bounds = [scores[wanted * (k + 1) - 1] for k in range(len(heldout["splits"]))]
        for i in train:
            doc_scores = shards[i].scores
            for k in reversed(range(len(heldout["splits"]))):  # smallest scores: first split
                codes[i][doc_scores <= bounds[k]] = SPLITS.index(heldout["splits"][k])
        return codes

    def _write_metadata(self, spec, units, shards, codes, dtype) -> None:
        splits = {}
        for index, split in enumerate(SPLITS):
            masks = [c == index for c in codes]
            splits[split] = {
                "num_documents": int(sum(m.sum() for m in masks)),
                "num_bytes": int(sum(s.byte_counts[m].sum() for s, m in zip(shards, masks))),
                "num_tokens": int(sum(s.token_counts[m].sum() for s, m in zip(shards, masks))),
            }
            if splits[split]["num_tokens"] < 2:
                raise BadInputError(f"the {split} split would hold {splits[split]['num_tokens']} "
                                    f"token(s); give data.{split}_files more text")
        self.info.metadata.update({
            "dtype": np.dtype(dtype).name, "chunk_tokens": spec["chunk_tokens"],
            "splits": splits, "files": {k: [p for p, _, _ in v] for k, v in spec["files"].items()},
            "tokenizer": spec["tokenizer"], "heldout": spec["heldout"], "read": spec["read"]})

    def _generate_examples(self, split: str, units, shards, codes):
        index = SPLITS.index(split)

        def pieces() -> Iterator[np.ndarray]:
            for shard, code in zip(shards, codes):
                mask = code == index
                if not mask.any():
                    continue
                tokens = shard.tokens  # one map per unit, released before the next
                if mask.all():
                    yield from (tokens[i:i + CHUNK_TOKENS] for i in range(0, tokens.size, CHUNK_TOKENS))
                else:
                    for start, count in zip(shard.starts[mask], shard.token_counts[mask]):
                        yield tokens[start:start + count]
                del tokens

        for number, chunk in enumerate(_chunks(pieces(), CHUNK_TOKENS)):
            yield number, {"tokens": np.ascontiguousarray(chunk).tobytes(), "index": number}
