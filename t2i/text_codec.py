"""Compact text features: `text_dtype = "int8"` or `"fp8"` stores each T5 feature value in one
byte, with a float32 scale per token row beside it (column `text_scale`, t2i.caption_fields),
and the loader decodes them to float16 on the fly (t2i.data): training sees float tensors.

- int8: q = round(x / s), s = absmax(row) / 127 (the row: one token's channels). Decoded q x s;
  |decoded - x| <= s / 2 = absmax(row) / 254.
- fp8: float8 e4m3 (torch.float8_e4m3fn: 3 mantissa bits) of x / s, s = absmax(row) / 448.
  |decoded - x| <= |x| / 16 + s / 1024 (round to nearest: half a step of 2^-3 relative, or of
  the subnormal step 2^-9 below 2^-6).
- Each bound is against the encoder's output; the decoded float16 adds its own rounding
  (<= |x| / 2048), as stored float16 features already carry.
- Bytes per token: channels + 4 (int8, fp8) against 2 x channels (float16): at T5-XXL's 4096
  channels, 50.05 % of float16, 25.02 % of float32. Padded tokens (past the attention mask) are
  never stored, in any dtype.
- ids (t2i.text_ondemand): no features at all, each kept token's T5 id (int32, 4 bytes a token:
  at T5-XXL's 4096 channels 0.05 % of float16's 8192 bytes a token); the training step encodes
  them with the frozen text encoder on its device. The loader's text tensor holds the ids
  (int32, one "channel").
"""

from __future__ import annotations

import numpy as np
import torch

COMPACT = {"int8": 127.0, "fp8": 448.0}  # stored one byte a value -> the largest code magnitude
DECODED = torch.float16  # what compact features decode to (the loader's text tensors)
IDS = "ids"  # text_dtype storing token ids, encoded on demand by the training step (t2i.text_ondemand)


def is_compact(text_dtype: str) -> bool:
    return text_dtype in COMPACT


def fp8_supported() -> bool:
    """Whether this torch has float8 e4m3 (torch >= 2.1) for fp8 text features."""
    return hasattr(torch, "float8_e4m3fn")


def decoded_dtype(text_dtype: str) -> torch.dtype:
    """The dtype the loader's text tensors have for features stored in `text_dtype` (ids: int32)."""
    if text_dtype == IDS:
        return torch.int32
    return DECODED if is_compact(text_dtype) else getattr(torch, text_dtype)


def encode(emb: torch.Tensor, text_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of (..., tokens, channels) features: codes as uint8 of the same shape, one
    float32 scale per token row (..., tokens). On any device (the encoder's: the GPU at scale)."""
    x = emb.float()
    absmax = x.abs().amax(-1)
    scale = torch.where(absmax > 0, absmax / COMPACT[text_dtype], torch.ones_like(absmax))  # an all-zero row: codes 0
    y = x / scale[..., None]
    if text_dtype == "int8":
        codes = torch.round(y).clamp_(-127, 127).to(torch.int8)
    else:
        codes = y.clamp_(-448, 448).to(torch.float8_e4m3fn)
    return codes.view(torch.uint8), scale


def _tables() -> dict[str, np.ndarray]:
    """Each compact dtype's value of every byte (float32), so decoding is one numpy lookup."""
    byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    tables = {"int8": byte.view(torch.int8).float().numpy()}
    if fp8_supported():
        tables["fp8"] = byte.view(torch.float8_e4m3fn).float().numpy()
    return tables


TABLES = _tables()


def decode(codes: np.ndarray, scales: np.ndarray, text_dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Float16 features (tokens, channels) of uint8 `codes` (tokens, channels) and float32
    `scales` (tokens,), into `out` when given: in float32, rounded once to float16 (by torch,
    whose float16 cast is vectorised: numpy's costs ten times the rest of the decode)."""
    out = np.empty(codes.shape, np.float16) if out is None else out
    values = codes.view(np.int8).astype(np.float32) if text_dtype == "int8" else np.take(TABLES[text_dtype], codes)
    np.multiply(values, scales[:, None], out=values)
    torch.from_numpy(out).copy_(torch.from_numpy(values))
    return out


def copy_compact(codes: tuple[np.ndarray, np.ndarray], scales: tuple[np.ndarray, np.ndarray], rows: np.ndarray,
                 lens: np.ndarray, out: np.ndarray, positions: np.ndarray, text_dtype: str) -> None:
    """Decode the first lens[i] tokens of row rows[i] into out[positions[i]] (zero-padded): `codes`
    and `scales` are (offsets, data) views of the Arrow binary columns (t2i.data._binary_views),
    `out` a raw byte view (n, max_tokens, channels x 2) of the float16 text tensor."""
    (c_offs, c_data), (s_offs, s_data) = codes, scales
    channels = out.shape[-1] // 2
    for p, r, n in zip(positions, rows, lens):
        start, s_start = c_offs[r], s_offs[r]
        block = c_data[start : start + n * channels].reshape(n, channels)
        scale = s_data[s_start : s_start + 4 * n].view(np.float32)
        decode(block, scale, text_dtype, out=out[p, :n].view(np.float16))
        out[p, n:] = 0
