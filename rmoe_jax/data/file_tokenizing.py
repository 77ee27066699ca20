"""Stage 1 of preparing a `files` dataset: tokenize every unit of the corpus into a shard.

Each unit (`file_corpus.Unit`) becomes, in the shard folder,
  unit-NNNNN.tokens  its documents' tokens, each document preceded by the tokenizer's
                     separator (if it has one), as raw little-endian `stream_dtype`;
  unit-NNNNN.npz     per document: tokens (separator included), UTF-8 bytes, and a 64-bit
                     score seeded by (seed, file, position) that picks held-out documents.
Both are written under temporary names and renamed, the index last, so a unit is either done
or redone: an interrupted preparation, re-run, tokenizes only the units it had not finished.

Units are tokenized in worker processes (spawned: the parent may have started JAX threads),
each loading the tokenizer once. A progress bar (on a terminal) shows MB, documents/s and
tokens/s.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from array import array
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool  # not loaded by `concurrent.futures`

import ml_collections
import numpy as np

from rmoe_jax.data import file_corpus, tokenizers
from rmoe_jax.data.errors import BadInputError

BATCH_BYTES = 1 << 20  # text handed to the tokenizer at once
_WORKER_TOKENIZERS: dict[str, tokenizers.Tokenizer] = {}


def tokenizer_spec(data: ml_collections.ConfigDict) -> dict:
    """The fields that pick the tokenizer, as a small picklable dict."""
    return {"tokenizer": data.tokenizer, "sentencepiece_model": data.sentencepiece_model,
            "tokenizer_file": data.tokenizer_file}


def load_tokenizer(spec: dict) -> tokenizers.Tokenizer:
    """The tokenizer `spec` names (cached per process)."""
    key = json.dumps(spec, sort_keys=True)
    if key not in _WORKER_TOKENIZERS:
        fields = dict(spec, sentencepiece_vocab_size=0, dataset="files", data_dir="")
        _WORKER_TOKENIZERS[key] = tokenizers.make_tokenizer(ml_collections.ConfigDict(fields))
    return _WORKER_TOKENIZERS[key]


def document_score(seed: int, file_index: int, position: int) -> int:
    """A uniform 64-bit number fixed by (seed, file, position): the held-out splits take the
    documents with the smallest scores."""
    digest = hashlib.blake2b(f"{seed}/{file_index}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _paths(out_dir: str, unit: file_corpus.Unit) -> tuple[str, str]:
    stem = os.path.join(out_dir, f"unit-{unit.index:05d}")
    return stem + ".tokens", stem + ".npz"


@dataclasses.dataclass
class Shard:
    """A finished unit: per-document arrays [D]; its tokens [T] are mapped from disk on use
    (`tokens`), so a corpus of thousands of units never holds thousands of open maps."""

    tokens_path: str
    dtype: np.dtype
    token_counts: np.ndarray
    byte_counts: np.ndarray
    scores: np.ndarray

    @property
    def tokens(self) -> np.ndarray:
        """The unit's tokens, memory-mapped read-only (a new map per access: keep it while needed)."""
        if not int(self.token_counts.sum()):
            return np.zeros(0, self.dtype)
        return np.memmap(self.tokens_path, dtype=self.dtype, mode="r")

    @property
    def starts(self) -> np.ndarray:
        """Where each document's tokens start in `tokens`, int64 [D]."""
        return np.concatenate([[0], np.cumsum(self.token_counts)[:-1]]).astype(np.int64)


def load_shard(out_dir: str, unit: file_corpus.Unit, dtype) -> Shard | None:
    """The shard of `unit`, or None when it is missing or incomplete (sizes disagree)."""
    tokens_path, index_path = _paths(out_dir, unit)
    if not (os.path.exists(index_path) and os.path.exists(tokens_path)):
        return None
    try:
        with np.load(index_path) as index:
            arrays = {k: index[k] for k in ("token_counts", "byte_counts", "scores")}
    except (OSError, ValueError, KeyError):
        return None
    dtype = np.dtype(dtype).newbyteorder("<")
    if os.path.getsize(tokens_path) != int(arrays["token_counts"].sum()) * dtype.itemsize:
        return None
    return Shard(tokens_path, dtype, **arrays)


def tokenize_unit(unit: file_corpus.Unit, options: file_corpus.ReadOptions, spec: dict,
                  out_dir: str, seed: int) -> dict:
    """Tokenize one unit into its shard; returns {'documents', 'bytes', 'tokens'} counts."""
    tokenizer = load_tokenizer(spec)
    dtype = np.dtype(tokenizer.stream_dtype).newbyteorder("<")
    tokens_path, index_path = _paths(out_dir, unit)
    suffix = f".tmp{os.getpid()}"
    token_counts, byte_counts, scores = array("q"), array("q"), array("Q")
    texts: list[str] = []
    pending = 0

    def flush(out) -> None:
        nonlocal pending
        if not texts:
            return
        encoded = tokenizer.encode_batch(texts)
        separator = [] if tokenizer.bos_id is None else [np.array([tokenizer.bos_id], dtype)]
        parts = [p for ids in encoded for p in separator + [ids.astype(dtype)]]
        token_counts.extend(len(ids) + len(separator) for ids in encoded)
        out.write(np.concatenate(parts).tobytes())
        texts.clear()
        pending = 0

    with open(tokens_path + suffix, "wb") as out:
        for position, text, num_bytes in file_corpus.read_documents(unit, options):
            texts.append(text)
            byte_counts.append(num_bytes)
            scores.append(document_score(seed, unit.file_index, position))
            pending += num_bytes
            if pending >= BATCH_BYTES:
                flush(out)
        flush(out)
    with open(index_path + suffix, "wb") as f:
        np.savez(f, token_counts=np.frombuffer(token_counts, np.int64),
                 byte_counts=np.frombuffer(byte_counts, np.int64),
                 scores=np.frombuffer(scores, np.uint64))
    os.replace(tokens_path + suffix, tokens_path)
    os.replace(index_path + suffix, index_path)  # last: the unit counts as done from here on
    return {"documents": len(byte_counts), "bytes": int(sum(byte_counts)),
            "tokens": int(sum(token_counts))}


def _init_worker() -> None:
    # One process per core already: keep the tokenizers' own thread pools out of each other's way.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def _progress(total_bytes: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1 << 20,
                desc="tokenizing", disable=None if enabled else True, file=sys.stderr,
                dynamic_ncols=True)


def tokenize_units(units: Sequence[file_corpus.Unit], options: file_corpus.ReadOptions,
                   spec: dict, out_dir: str, *, seed: int, workers: int,
                   progress: bool = True) -> dict:
    """Tokenize every unfinished unit into `out_dir`, `workers` at a time (0: one per core).

    Returns {'units', 'units_done_before', 'documents', 'bytes', 'tokens', 'seconds',
    'workers'} for the units tokenized by this call.

    Raises:
      BadInputError: from the first unit that cannot be read (the others are cancelled).
    """
    os.makedirs(out_dir, exist_ok=True)
    dtype = load_tokenizer(spec).stream_dtype
    todo = [u for u in units if load_shard(out_dir, u, dtype) is None]
    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    totals = {"documents": 0, "bytes": 0, "tokens": 0}
    start = time.perf_counter()
    bar = _progress(sum(u.size for u in todo), progress)

    def done(unit: file_corpus.Unit, counts: dict) -> None:
        for key in totals:
            totals[key] += counts[key]
        seconds = max(time.perf_counter() - start, 1e-9)
        bar.update(unit.size)
        bar.set_postfix_str(f"{totals['documents'] / seconds:,.0f} docs/s, "
                            f"{totals['tokens'] / seconds:,.0f} tokens/s", refresh=False)

    try:
        if workers <= 1:
            for unit in todo:
                done(unit, tokenize_unit(unit, options, spec, out_dir, seed))
        else:
            with concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker) as pool:
                futures = {pool.submit(tokenize_unit, u, options, spec, out_dir, seed): u
                           for u in todo}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        done(futures[future], future.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    except BrokenProcessPool as e:
        raise BadInputError(f"a tokenizer worker process died ({e}); finished units are kept, "
                            "re-run to continue (data.prepare_workers=1 runs in one process)") from None
    finally:
        bar.close()
    return dict(totals, units=len(todo), units_done_before=len(units) - len(todo),
                seconds=time.perf_counter() - start, workers=workers)
