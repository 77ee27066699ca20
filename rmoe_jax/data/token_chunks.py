"""A token stream stored on disk as fixed-size chunks, read back a chunk at a time.

The `files` dataset stores each split's packed stream (documents concatenated, separators in)
as array_record records of `chunk_tokens` tokens each (the last one shorter). `TokenChunks`
gives random access to it with the parts of the numpy interface `PackedWindows` uses (`shape`,
`size`, `dtype`, `len`, slicing and integer-array indexing), so a corpus far larger than memory
trains and evaluates like an in-memory one; only the chunks a batch touches are read (an LRU
cache keeps the recent ones).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

CACHE_CHUNKS = 64


class TokenChunks:
    """Tokens [start, stop) of the concatenation of `parts`: (record source, tokens in it).

    Each source's record i holds tokens [i * chunk_tokens, (i + 1) * chunk_tokens) of that part
    as raw little-endian `dtype` bytes under `tokens`.
    """

    def __init__(self, parts: Sequence[tuple[Any, int]], chunk_tokens: int, dtype,
                 start: int = 0, stop: int | None = None, *, _cache=None, _lock=None):
        self.parts = list(parts)
        self.chunk_tokens = int(chunk_tokens)
        self.dtype = np.dtype(dtype)
        self._offsets = np.cumsum([0] + [int(n) for _, n in self.parts])
        total = int(self._offsets[-1])
        self.start = int(start)
        self.stop = total if stop is None else int(stop)
        if not 0 <= self.start <= self.stop <= total:
            raise IndexError(f"token range [{self.start}, {self.stop}) outside [0, {total})")
        self._cache = collections.OrderedDict() if _cache is None else _cache
        self._lock = threading.Lock() if _lock is None else _lock

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int]:
        return (self.size,)

    @property
    def ndim(self) -> int:
        return 1

    def __len__(self) -> int:
        return self.size

    def _chunk(self, part: int, index: int) -> np.ndarray:
        key = (part, index)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        record = self.parts[part][0][index]
        chunk = np.frombuffer(record["tokens"], dtype=self.dtype.newbyteorder("<"))
        expected = min(self.chunk_tokens, self.parts[part][1] - index * self.chunk_tokens)
        if chunk.size != expected:
            raise ValueError(f"token chunk {index} of part {part} has {chunk.size} tokens, "
                             f"expected {expected}: the prepared data is damaged; delete it "
                             "and prepare again")
        with self._lock:
            self._cache[key] = chunk
            while len(self._cache) > CACHE_CHUNKS:
                self._cache.popitem(last=False)
        return chunk

    def __getitem__(self, key):
        if isinstance(key, slice):
            first, last, step = key.indices(self.size)
            if step != 1:
                raise IndexError("TokenChunks slices must be contiguous")
            last = max(last, first)
            return TokenChunks(self.parts, self.chunk_tokens, self.dtype, self.start + first,
                               self.start + last, _cache=self._cache, _lock=self._lock)
        positions = np.asarray(key, dtype=np.int64)
        if positions.size and (positions.min() < -self.size or positions.max() >= self.size):
            raise IndexError(f"token index out of range [0, {self.size})")
        flat = np.where(positions < 0, positions + self.size, positions).reshape(-1) + self.start
        out = np.empty(flat.shape, dtype=self.dtype)
        part_of = np.searchsorted(self._offsets, flat, side="right") - 1
        local = flat - self._offsets[part_of]
        chunk_of = local // self.chunk_tokens
        # Group the positions by (part, chunk) with one sort, then read each chunk once.
        group = part_of * (int(chunk_of.max(initial=0)) + 1) + chunk_of
        order = np.argsort(group, kind="stable")
        bounds = np.flatnonzero(np.diff(group[order])) + 1
        for members in np.split(order, bounds) if order.size else []:
            part, index = int(part_of[members[0]]), int(chunk_of[members[0]])
            out[members] = self._chunk(part, index)[local[members] - index * self.chunk_tokens]
        return out.reshape(positions.shape) if positions.ndim else out[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        tokens = self[np.arange(self.size)] if self.size else np.zeros(0, self.dtype)
        return tokens if dtype is None else tokens.astype(dtype)
