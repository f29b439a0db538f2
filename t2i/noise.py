"""Per-sample training noise, drawn for a whole micro-batch in a few numpy array operations.

Every random number a sample trains with (its posterior draw, its diffusion noise, its timestep,
its caption-drop flag) is a pure function of the sample's key and the number's index: word j of
a sample is SplitMix64's output function of `key + (j + 1) * golden_gamma`, i.e. the SplitMix64
stream seeded by the key (Steele, Lea & Flood 2014), computed for all samples and all j at once.
The key is a hash of (seed, epoch, global batch index, position in the global batch), so a sample
draws the same numbers whatever its batch neighbours, the batch size of its process, the number
of processes, and after an exact resume. Normals come from the words by Box-Muller (24-bit
uniforms, as torch's CPU randn uses for float32).
"""

from __future__ import annotations

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio, odd)
_MASK64 = (1 << 64) - 1
_TWO_PI_2_24 = np.float32(2 * np.pi / (1 << 24))
_2_24 = np.float32(1.0 / (1 << 24))


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijection of uint64 with full avalanche), element-wise.
    uint64 arrays wrap on overflow, which the hash relies on."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _fold(h: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The hash h combined with one more integer per element (uint64 arrays that broadcast)."""
    return _mix((h ^ values) + _GAMMA)


def sample_keys(seed: int, epoch: int, batch_pos: int, positions) -> np.ndarray:
    """The 64-bit noise key of each sample at `positions` (its places in global batch `batch_pos`
    of `epoch`): its place in the global batch, not the rank that trains it, so a global batch
    gets the same noise on any number of processes (and after a resume)."""
    h = np.zeros(1, np.uint64)
    for v in (seed, epoch, batch_pos):  # any Python int, taken modulo 2^64
        h = _fold(h, np.array([int(v) & _MASK64], np.uint64))
    return _fold(h, np.asarray(positions, np.int64).astype(np.uint64))


def random_words(keys, n: int) -> np.ndarray:
    """(len(keys), n) uint64: words 0..n-1 of each key's stream (row i depends on keys[i] alone)."""
    keys = np.asarray(keys).astype(np.uint64)
    return _mix(keys[:, None] + np.arange(1, n + 1, dtype=np.uint64) * _GAMMA)


def normals(words: np.ndarray) -> np.ndarray:
    """(B, 2n) float32 standard normals from (B, n) words by Box-Muller: word j gives normals j
    (cosine) and n + j (sine) from its top and middle 24 bits."""
    u1 = ((words >> np.uint64(40)).astype(np.float32) + 1) * _2_24  # (0, 1]: the log is finite
    angle = ((words >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float32) * _TWO_PI_2_24
    radius = np.sqrt(np.float32(-2) * np.log(u1))
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def below(words: np.ndarray, n: int) -> np.ndarray:
    """Integers uniform in [0, n) (int64), one per word: the top 32 bits scaled by n (Lemire's
    multiply-shift; the bias, under n / 2^32, is far below any training effect)."""
    return ((words >> np.uint64(32)) * np.uint64(n) >> np.uint64(32)).astype(np.int64)


def uniforms(words: np.ndarray) -> np.ndarray:
    """Floats uniform in [0, 1) (float64), one per word, from its top 53 bits."""
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
