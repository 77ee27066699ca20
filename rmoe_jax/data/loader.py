"""Batches for training and evaluation, from a data sub-config.

    data config -> documents (sources) -> tokens (tokenizers) -> one stream per split
                -> windows of seq_len + 1 (packing) -> batches (grain)

Every batch is `{'inputs': int32 [B, L], 'targets': int32 [B, L], 'weights': float32 [B, L]}`
with B the PER-PROCESS batch size and L = `data.seq_len`; weights are 0 on padding.

Per-process sharding: in training every process walks the same seeded global order of windows
and takes its own rows of each global batch (so a step sees the same data whatever the number
of processes); in evaluation window w belongs to process `w % process_count`. Either way the
processes' windows are disjoint and together cover the split.

The tokenized stream of a split is cached in memory per process (keyed by everything it
depends on), so repeated evals do not re-read or re-tokenize.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import threading
import time

import grain
import ml_collections
import numpy as np
from absl import logging

from rmoe_jax.data import sources
from rmoe_jax.data.packing import PackedWindows, concat_documents, num_windows
from rmoe_jax.data.token_chunks import TokenChunks
from rmoe_jax.data.tokenizers import Tokenizer, make_tokenizer

_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to agree with: the vocabulary, and the tokenizer itself."""

    dataset: str
    vocab_size: int
    tokenizer: Tokenizer
    seq_len: int
    pad_id: int
    bos_id: int | None  # document separator, None when documents are simply concatenated


def dataset_info(data: ml_collections.ConfigDict) -> DatasetInfo:
    """Vocabulary and tokenizer of `data`; reads no dataset (only a SentencePiece model)."""
    tokenizer = make_tokenizer(data)
    return DatasetInfo(dataset=data.dataset, vocab_size=tokenizer.vocab_size,
                       tokenizer=tokenizer, seq_len=data.seq_len, pad_id=tokenizer.pad_id,
                       bos_id=tokenizer.bos_id)


@dataclasses.dataclass(frozen=True)
class _Stream:
    tokens: np.ndarray  # [N], read-only, tokenizer.stream_dtype
    num_documents: int
    num_bytes: int


_CACHE: collections.OrderedDict[tuple, _Stream] = collections.OrderedDict()
_CACHE_SIZE = 8
_CACHE_LOCK = threading.Lock()


def _stream_key(data: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer) -> tuple:
    """Everything the tokenized stream depends on (the model file's mtime included)."""
    model = getattr(tokenizer, "model_path", None)
    if data.dataset == "files":  # the config name keys the files and the tokenizer
        return (data.dataset, str(sources.dataset_dir(data)), split)
    return (data.dataset, sources.resolve_data_dir(data.data_dir), split,
            sources.text_feature(data), data.enwik8_train_bytes, data.enwik8_validation_bytes,
            data.enwik8_test_bytes, data.tokenizer, model,
            os.stat(model).st_mtime_ns if model else None)


def _slice_bound(text: str | None, windows: int, default: int) -> int:
    if text is None:
        return default
    value = round(float(text[:-1]) * windows / 100) if text.endswith("%") else int(text)
    return min(max(value + windows if value < 0 else value, 0), windows)


def _sliced_stream(data: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer
                   ) -> _Stream | None:
    """An own dataset's `base[start:stop]`: its windows start..stop-1 (percent of its windows,
    or window counts; negative from the end), as the tokens they read; None for other splits.

    Window k of the slice is window start + k of the whole split, so `test[:50%]` and
    `test[50%:]` together count every target of `test` exactly once. `num_bytes` and
    `num_documents` are the split's, scaled by the slice's share of its targets (exact bytes
    for the byte tokenizer).
    """
    import re

    from rmoe_jax.config import OWN_SPLIT_SLICE, ConfigError, own_split_problem

    if not sources.is_own(data.dataset):
        return None
    problem = own_split_problem(split, data.dataset)
    if problem:
        raise ConfigError(f"split {problem}")
    match = re.fullmatch(OWN_SPLIT_SLICE, split)
    if match is None:
        return None
    whole = _load_stream(data, match.group("base"), tokenizer)
    windows = num_windows(whole.tokens.size, data.seq_len)
    start = _slice_bound(match.group("start"), windows, 0)
    stop = _slice_bound(match.group("stop"), windows, windows)
    if start >= stop:
        raise ConfigError(f"split {split!r} of {data.dataset} selects no windows: "
                          f"{match.group('base')} has {windows} windows of data.seq_len="
                          f"{data.seq_len} tokens, the slice keeps [{start}:{stop})")
    length = data.seq_len
    tokens = whole.tokens[start * length: stop * length + 1]
    share = (tokens.size - 1) / max(whole.tokens.size - 1, 1)
    num_bytes = (int(tokens.size) if tokenizer.bos_id is None and data.tokenizer == "byte"
                 else round(whole.num_bytes * share))
    return _Stream(tokens, max(round(whole.num_documents * share), 1), num_bytes)


def _load_stream(data: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer) -> _Stream:
    sliced = _sliced_stream(data, split, tokenizer)
    if sliced is not None:
        return sliced
    key = _stream_key(data, split, tokenizer)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    start = time.perf_counter()
    if data.dataset == "files":  # tokenized when prepared: read from disk as needed
        stream = _files_stream(data, split)
    else:
        docs = sources.read_documents(data, split)
        tokens = concat_documents(tokenizer.encode_batch(docs), tokenizer.bos_id,
                                  tokenizer.stream_dtype)
        tokens.flags.writeable = False  # shared through the cache: nobody may modify it
        stream = _Stream(tokens, len(docs), sum(len(d) for d in docs))
    logging.info("%s/%s: %d documents, %d bytes -> %d tokens (%s) in %.2fs", data.dataset,
                 split, stream.num_documents, stream.num_bytes, stream.tokens.size, data.tokenizer,
                 time.perf_counter() - start)
    with _CACHE_LOCK:
        _CACHE[key] = stream
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return stream


def _files_stream(data: ml_collections.ConfigDict, split: str) -> _Stream:
    """A `files` split (or a sum of splits, 'train+validation') read from its token chunks."""
    builder = sources.ensure_prepared(data)
    meta = builder.info.metadata
    parts, documents, num_bytes = [], 0, 0
    for name in split.split("+"):
        counts = meta["splits"][name]
        parts.append((builder.as_data_source(split=name), counts["num_tokens"]))
        documents += counts["num_documents"]
        num_bytes += counts["num_bytes"]
    tokens = TokenChunks(parts, meta["chunk_tokens"], np.dtype(meta["dtype"]))
    return _Stream(tokens, documents, num_bytes)


def token_stream(data: ml_collections.ConfigDict, split: str) -> np.ndarray | TokenChunks:
    """The tokens [N] of `split`, documents concatenated (read-only, cached); for `files`, a
    `TokenChunks` view that reads from disk (`np.asarray` it for a small split)."""
    return _load_stream(data, split, make_tokenizer(data)).tokens


def packed_windows(data: ml_collections.ConfigDict, split: str) -> PackedWindows:
    """The (seq_len + 1)-token windows of `split`."""
    tokenizer = make_tokenizer(data)
    return PackedWindows(_load_stream(data, split, tokenizer).tokens, data.seq_len,
                         tokenizer.pad_id)


def split_stats(data: ml_collections.ConfigDict, split: str) -> dict[str, int]:
    """Sizes of `split`: documents, raw bytes, tokens, windows, target tokens.

    `num_bytes / num_targets` converts a per-token loss to a per-byte one (1 for bytes).
    """
    tokenizer = make_tokenizer(data)
    stream = _load_stream(data, split, tokenizer)
    windows = PackedWindows(stream.tokens, data.seq_len, tokenizer.pad_id)
    return {"num_documents": stream.num_documents, "num_bytes": stream.num_bytes,
            "num_tokens": int(stream.tokens.size), "num_windows": len(windows),
            "num_targets": max(int(stream.tokens.size) - 1, 0)}


def _check_process(process_index: int, process_count: int) -> None:
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")


class TrainIterator:
    """Infinite, seeded, shuffled batches of one process; checkpointable.

    Epoch e visits the windows in a permutation seeded by (seed, e), so each
    epoch is reshuffled. `get_state()` is a JSON-serialisable dict; `set_state(state)` on a
    fresh iterator of the same config makes it yield exactly what the original would have
    yielded next. The state remembers the settings that define the order, and restoring it
    into an iterator with different ones (seed, batch size, processes, data) is refused.
    """

    def __init__(self, windows: PackedWindows, *, batch_size: int, seed: int,
                 process_index: int, process_count: int, fingerprint: dict):
        global_batch = batch_size * process_count
        if len(windows) < global_batch:
            raise ValueError(f"the split has {len(windows)} windows of seq_len+1 tokens, fewer "
                             f"than one global batch of {global_batch}; use a larger split, a "
                             "smaller data.seq_len or a smaller batch")
        self.num_windows = len(windows) // global_batch * batch_size  # this process's, per epoch
        self.fingerprint = dict(fingerprint)
        rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
        # Every process walks the same global order and takes its rows of each global batch,
        # so the data a step sees does not depend on how many processes share it.
        dataset = (grain.MapDataset.range(len(windows)).shuffle(seed=seed)
                   .repeat()  # reseeds the shuffle every epoch
                   .batch(global_batch, drop_remainder=True)
                   .map(lambda ids: windows.gather(ids[rows])))  # one vectorized gather per batch
        # Synchronous reads: a gather is a few numpy ops, threads would only add overhead
        # and a prefetch buffer that must be accounted for in the state.
        self._iter = dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        return {"version": _STATE_VERSION, "fingerprint": self.fingerprint,
                "grain": self._iter.get_state()}

    def set_state(self, state: dict | str | bytes) -> None:
        """Restore `get_state()` output (or its JSON encoding)."""
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')} is not "
                             f"{_STATE_VERSION}")
        saved = state["fingerprint"]
        diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
        if diff:
            raise ValueError("data iterator state was saved with different settings "
                             "(field: saved vs now): " +
                             ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items()))
        self._iter.set_state(state["grain"])


def make_train_iterator(data: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """Infinite shuffled training batches of `data.train_split` for one process.

    Args:
      data: the data sub-config.
      batch_size: sequences per batch on THIS process.
      seed: shuffle seed, in [0, 2**32).
      process_index, process_count: this process gets rows [p * batch_size, (p + 1) *
        batch_size) of each global batch of batch_size * process_count windows.

    Returns:
      A `TrainIterator` yielding {'inputs', 'targets': int32 [batch_size, seq_len],
      'weights': float32 [batch_size, seq_len]}.
    """
    _check_process(process_index, process_count)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    windows = packed_windows(data, data.train_split)
    fingerprint = dict(dataset=data.dataset, split=data.train_split, tokenizer=data.tokenizer,
                       seq_len=int(data.seq_len), num_windows=len(windows),
                       batch_size=int(batch_size), seed=int(seed),
                       process_index=int(process_index), process_count=int(process_count))
    if data.dataset == "files":  # another corpus or tokenizer is another order of windows
        fingerprint["files_build"] = sources.dataset_dir(data).name
    return TrainIterator(windows, batch_size=batch_size, seed=seed,
                         process_index=process_index, process_count=process_count,
                         fingerprint=fingerprint)


class EvalBatches:
    """A finite, re-iterable, in-order sequence of batches covering one process's windows."""

    def __init__(self, windows: PackedWindows, window_ids: np.ndarray):
        self.windows = windows
        self.window_ids = window_ids  # int64 [num_batches, batch_size], -1 = padding

    def __len__(self) -> int:
        return int(self.window_ids.shape[0])

    def __iter__(self):
        for row in self.window_ids:
            yield self.windows.gather(row)


def make_eval_batches(data: ml_collections.ConfigDict, *, split: str, batch_size: int,
                      process_index: int = 0, process_count: int = 1,
                      max_batches: int = 0) -> EvalBatches:
    """Every window of `split`, in order, in batches of `batch_size`, for one process.

    Over all processes, every target token of the split has weight 1 exactly once; the last
    window and the last batch are padded with weight 0 (no truncation). Every process gets
    the same number of batches, ceil(ceil(W / process_count) / batch_size), so a collective
    eval step never waits on a process that ran out. `max_batches > 0` keeps only the first
    `max_batches` of them.
    """
    _check_process(process_index, process_count)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    windows = packed_windows(data, split)
    ids = np.arange(process_index, len(windows), process_count, dtype=np.int64)
    per_process = -(-len(windows) // process_count)
    num_batches = -(-per_process // batch_size)
    padded = np.full(num_batches * batch_size, -1, dtype=np.int64)
    padded[: ids.size] = ids
    padded = padded.reshape(num_batches, batch_size)
    if max_batches > 0:
        padded = padded[:max_batches]
    return EvalBatches(windows, padded)
