"""Per-sample training noise, drawn for a whole micro-batch in a few numpy array operations.

Every random number a sample trains with (its posterior draw, its diffusion noise, its timestep,
its caption-drop flag) is a pure function of the sample's key and the number's index: word j of
a sample is SplitMix64's output function of `key + (j + 1) * golden_gamma`, i.e. the SplitMix64
stream seeded by the key (Steele, Lea & Flood 2014), computed for all samples and all j at once.
The key is a hash of (seed, epoch, global batch index, position in the global batch), so a sample
draws the same numbers whatever its batch neighbours, the batch size of its process, the number
of processes, and after an exact resume. Normals come from the words by Box-Muller (two 24-bit
uniforms a word: float32's precision).

Numbers tied to a sample's identity rather than to its place in training (the held-out keys of
the validation loss and their fixed noise) come from its key string: `string_hashes`, FNV-1a over
the key's bytes finished by SplitMix64, the same on every machine, process and version.
"""

from __future__ import annotations

import numpy as np

from shards.hashing import hash_strings, string_hashes  # noqa: F401 - the key hashes live in shards (curate uses them too)
from shards.hashing import mix as _mix

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio, odd)
_MASK64 = (1 << 64) - 1
_TWO_PI_2_24 = np.float32(2 * np.pi / (1 << 24))
_2_24 = np.float32(1.0 / (1 << 24))
_BLOCK_WORDS = 1 << 15  # words hashed at once (256 KiB): the temporaries stay in cache


def _fold(h: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The hash h combined with one more integer per element (uint64 arrays that broadcast)."""
    return _mix((h ^ values) + _GAMMA)


def derive_keys(keys, index: int) -> np.ndarray:
    """Keys of independent streams derived from `keys` (one per `index`: 0, 1, ...)."""
    return _fold(np.asarray(keys).astype(np.uint64), np.uint64(index))


def sample_keys(seed: int, epoch: int, batch_pos: int, positions) -> np.ndarray:
    """The 64-bit noise key of each sample at `positions` (its places in global batch `batch_pos`
    of `epoch`): its place in the global batch, not the rank that trains it, so a global batch
    gets the same noise on any number of processes (and after a resume)."""
    h = np.zeros(1, np.uint64)
    for v in (seed, epoch, batch_pos):  # any Python int, taken modulo 2^64
        h = _fold(h, np.array([int(v) & _MASK64], np.uint64))
    return _fold(h, np.asarray(positions, np.int64).astype(np.uint64))


def random_words(keys, n: int, first: int = 0) -> np.ndarray:
    """(len(keys), n) uint64: words first..first+n-1 of each key's stream (row i depends on keys[i]
    alone)."""
    keys = np.asarray(keys).astype(np.uint64)
    return _mix(keys[:, None] + np.arange(first + 1, first + n + 1, dtype=np.uint64) * _GAMMA)


def normal_pairs(keys, n: int, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two independent (len(keys), n) float32 arrays of standard normals from words first..
    first+n-1 of each key's stream, by Box-Muller: word first+j gives element j of the first
    (cosine) and of the second (sine). Made a block of words at a time, small enough to stay in
    cache (element-wise, so the blocks do not change the values)."""
    keys = np.asarray(keys).astype(np.uint64)
    cos_part, sin_part = np.empty((len(keys), n), np.float32), np.empty((len(keys), n), np.float32)
    step = max(1, _BLOCK_WORDS // max(1, len(keys)))
    for start in range(0, n, step):
        stop = min(n, start + step)
        _box_muller(random_words(keys, stop - start, first + start), cos_part[:, start:stop], sin_part[:, start:stop])
    return cos_part, sin_part


def _box_muller(words: np.ndarray, cos_out: np.ndarray, sin_out: np.ndarray) -> None:
    """Two normals per word, from its top 24 bits (radius) and the next 24 (angle)."""
    radius = (words >> np.uint64(40)).astype(np.float32)
    radius += 1  # uniform in (0, 1] once scaled: the log is finite
    radius *= _2_24
    np.log(radius, out=radius)
    radius *= -2
    np.sqrt(radius, out=radius)
    angle = ((words >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float32)
    angle *= _TWO_PI_2_24
    np.multiply(np.cos(angle), radius, out=cos_out)
    np.multiply(np.sin(angle, out=angle), radius, out=sin_out)


def below(words: np.ndarray, n: int) -> np.ndarray:
    """Integers uniform in [0, n) (int64), one per word: the top 32 bits scaled by n (Lemire's
    multiply-shift; the bias, under n / 2^32, is far below any training effect)."""
    return ((words >> np.uint64(32)) * np.uint64(n) >> np.uint64(32)).astype(np.int64)


def uniforms(words: np.ndarray) -> np.ndarray:
    """Floats uniform in [0, 1) (float64), one per word, from its top 53 bits."""
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
