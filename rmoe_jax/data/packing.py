"""Packing a token stream into fixed-length (inputs, targets, weights) windows.

A split's documents are concatenated into one stream of N tokens (with `bos_id` before each
document if the tokenizer has one; never for bytes). Window w is the `seq_len + 1` tokens
`stream[w*L : w*L + L + 1]` (L = seq_len): `inputs = window[:-1]`, `targets = window[1:]`.
Consecutive windows share one token, so the targets of windows 0..W-1 are
`stream[1:N]`, each exactly once, with

    W = ceil((N - 1) / L)

windows. The last window is padded with `pad_id` and weight 0 past the end of the stream.
Window id -1 stands for an all-padding window (weights 0), used to fill the last batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def concat_documents(docs: Sequence[np.ndarray], bos_id: int | None, dtype) -> np.ndarray:
    """One stream [N] of `dtype`: `bos_id` (if not None) then the tokens, per document."""
    parts: list[np.ndarray] = []
    bos = None if bos_id is None else np.array([bos_id], dtype=dtype)
    for doc in docs:
        if bos is not None:
            parts.append(bos)
        parts.append(np.asarray(doc).astype(dtype, copy=False))
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts)


def num_windows(num_tokens: int, seq_len: int) -> int:
    """W = ceil((N - 1) / L): windows needed so every token but the first is a target once."""
    return max(-(-(num_tokens - 1) // seq_len), 0)


class PackedWindows:
    """Random access to the windows of one token stream, gathered a batch at a time."""

    def __init__(self, stream: np.ndarray, seq_len: int, pad_id: int = 0):
        if seq_len <= 0:
            raise ValueError(f"data.seq_len: must be > 0, got {seq_len}")
        # A TokenChunks stream (files on disk) is indexed as it is, never loaded whole.
        self.stream = stream if hasattr(stream, "chunk_tokens") else np.asarray(stream)
        self.seq_len = int(seq_len)
        self.pad_id = int(pad_id)

    @property
    def num_tokens(self) -> int:
        return int(self.stream.shape[0])

    def __len__(self) -> int:
        return num_windows(self.num_tokens, self.seq_len)

    def gather(self, window_ids) -> dict[str, np.ndarray]:
        """The windows `window_ids` (int [B], -1 = padding window) as one batch.

        Returns {'inputs': int32 [B, L], 'targets': int32 [B, L], 'weights': float32 [B, L]};
        weights are 1 exactly where the target is a real token of the stream.
        """
        ids = np.asarray(window_ids, dtype=np.int64).reshape(-1)
        if ids.size and ids.max() >= len(self):
            raise IndexError(f"window id {ids.max()} out of range [0, {len(self)})")
        L, N = self.seq_len, self.num_tokens
        positions = ids[:, None] * L + np.arange(L + 1)[None, :]  # [B, L+1]
        real = (ids[:, None] >= 0) & (positions < N)
        if N == 0:
            tokens = np.full(positions.shape, self.pad_id)
        else:
            tokens = np.where(real, self.stream[np.clip(positions, 0, N - 1)], self.pad_id)
        tokens = tokens.astype(np.int32)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "weights": real[:, 1:].astype(np.float32),
        }
