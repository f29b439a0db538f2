"""Stable 64-bit hashes of strings, the same on every machine, process and version: FNV-1a over
a string's UTF-8 bytes, finished by SplitMix64's output function (full avalanche). Computed over
Arrow's buffers a byte position at a time, for all strings at once: no Python string per row.

Used where a key's identity must fix a number: the trainer's held-out keys and their noise
(t2i.noise, t2i.feature_index), select's tie order and kept-key sets (curate.rank), the caption
scores' join (t2i.caption_scores).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijection of uint64 with full avalanche), element-wise, in
    place on `z` (a fresh array). uint64 arrays wrap on overflow, which the hash relies on."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def string_hashes(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """uint64 hashes of strings held as Arrow holds them: `offsets` (n + 1) into the bytes `data`.
    FNV-1a over each string's bytes (all strings a byte position at a time), then SplitMix64's
    output function for full avalanche."""
    offsets = np.asarray(offsets, np.int64)
    lens, starts = np.diff(offsets), offsets[:-1]
    h = np.full(len(lens), _FNV_OFFSET, np.uint64)
    live = np.arange(len(lens))
    for j in range(int(lens.max(initial=0))):
        live = live[lens[live] > j]
        h[live] = (h[live] ^ data[starts[live] + j].astype(np.uint64)) * _FNV_PRIME
    return mix(h)


def hash_strings(strings: list[str]) -> np.ndarray:
    """`string_hashes` of Python strings (their UTF-8 bytes)."""
    encoded = [x.encode() for x in strings]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in encoded])])
    return string_hashes(offsets, np.frombuffer(b"".join(encoded), np.uint8))


def column_hashes(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """`string_hashes` of a (large) string column, read from its Arrow buffers (a null hashes as "")."""
    parts = [np.zeros(0, np.uint64)]
    for arr in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        _, offs, data = arr.buffers()
        width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
        offsets = np.frombuffer(offs, width)[arr.offset : arr.offset + len(arr) + 1]
        parts.append(string_hashes(offsets, np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)))
    return np.concatenate(parts)
