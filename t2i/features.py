"""Encode every captioned image once: VAE posterior mean + std and T5 features + mask.

Output: feature shards (shards.ShardWriter, atomic + done markers) keyed by sample key, in
`<root>/<cache key>/`. The cache key hashes everything that changes the features (VAE, text
encoder, resolution, buckets, token count, dtype), so a different setting never reuses stale
features, and a rerun skips keys already encoded (resume).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from shards import ShardError, UserError, clean_incomplete, complete_shards, done_keys, iter_batches
from shards.lock import output_lock
from shards.writer import write_manifest

FEATURE_VERSION = 1
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_TEXT_ENCODER = "google/t5-v1_1-xxl"

FEATURE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("height", pa.int32()),  # pixel size the image was resized/cropped to (its bucket)
        pa.field("width", pa.int32()),
        pa.field("latent_shape", pa.list_(pa.int32())),  # (C, h, w)
        pa.field("latent_mean", pa.binary()),  # float32, raw posterior (not yet scaled)
        pa.field("latent_std", pa.binary()),  # float32
        pa.field("text_emb", pa.binary()),  # (text_len, text_channels) in `text_dtype`
        pa.field("text_len", pa.int32()),  # tokens kept by the attention mask (incl. </s>)
        pa.field("text_channels", pa.int32()),
        pa.field("text_dtype", pa.string()),
    ],
    metadata={b"t2i_data.schema": b"features", b"t2i_data.schema_version": str(FEATURE_VERSION).encode()},
)


@dataclass
class FeatureConfig:
    vae: str = DEFAULT_VAE
    text_encoder: str = DEFAULT_TEXT_ENCODER
    resolution: int = 256
    buckets: bool = False  # multi-aspect: the 256/512/1024 aspect-ratio bins of PixArt
    max_tokens: int = 120
    text_dtype: str = "float16"
    batch_size: int = 16
    rows_per_shard: int = 1000

    def cache_key(self) -> str:
        ident = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "rows_per_shard")}
        for k in ("vae", "text_encoder"):  # a local directory is identified by its absolute path
            p = Path(ident[k])
            ident[k] = str(p.resolve()) if p.exists() else ident[k]
        ident["version"] = FEATURE_VERSION
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


# ---- models ------------------------------------------------------------------------------------

def _subfolder(spec: str, name: str) -> str | None:
    """Pipeline-layout repos keep each model in a subfolder; plain model repos do not."""
    p = Path(spec)
    if p.is_dir():
        return name if (p / name).is_dir() else None
    return name  # hub id: a pipeline repo is the common case (PixArt-alpha/PixArt-XL-2-1024-MS)


def load_vae(spec: str, device="cpu", dtype=torch.float32):
    from diffusers import AutoencoderKL

    try:
        sub = _subfolder(spec, "vae")
        try:
            vae = AutoencoderKL.from_pretrained(spec, subfolder=sub)
        except (OSError, EnvironmentError):
            if sub is None:
                raise
            vae = AutoencoderKL.from_pretrained(spec)
    except (OSError, EnvironmentError, ValueError) as e:
        raise UserError(f"cannot load the VAE {spec!r} ({e.__class__.__name__}): pass a local AutoencoderKL directory or a reachable HF id") from e
    return vae.to(device, dtype).eval().requires_grad_(False)


def load_text_encoder(spec: str, device="cpu", dtype=torch.float32):
    """(tokenizer, T5 encoder) from a pipeline-layout or plain T5 directory / HF id."""
    from transformers import AutoTokenizer, T5EncoderModel

    try:
        tsub, msub = _subfolder(spec, "tokenizer"), _subfolder(spec, "text_encoder")
        try:
            tok = AutoTokenizer.from_pretrained(spec, subfolder=tsub or "")
            enc = T5EncoderModel.from_pretrained(spec, subfolder=msub or "")
        except (OSError, EnvironmentError):
            if tsub is None and msub is None:
                raise
            tok = AutoTokenizer.from_pretrained(spec)
            enc = T5EncoderModel.from_pretrained(spec)
    except (OSError, EnvironmentError, ValueError) as e:
        raise UserError(f"cannot load the text encoder {spec!r} ({e.__class__.__name__}): pass a local T5 directory or a reachable HF id") from e
    return tok, enc.to(device, dtype).eval().requires_grad_(False)


@torch.no_grad()
def encode_text(tokenizer, encoder, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 features (B, max_tokens, C) and attention mask (B, max_tokens), tokenised exactly as
    PixArtAlphaPipeline does (padding to max_length, truncation, special tokens)."""
    t = tokenizer(captions, max_length=max_tokens, padding="max_length", truncation=True, add_special_tokens=True, return_tensors="pt")
    dev = next(encoder.parameters()).device
    ids, mask = t.input_ids.to(dev), t.attention_mask.to(dev)
    return encoder(ids, attention_mask=mask)[0], mask


# ---- images ------------------------------------------------------------------------------------

def aspect_ratio_table(resolution: int) -> dict[str, list[float]]:
    """PixArt's aspect-ratio bins (h/w -> [h, w]) shipped by diffusers for 256/512/1024."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )

    tables = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN}
    if resolution not in tables:
        raise UserError(f"aspect-ratio buckets exist for resolutions 256, 512 and 1024, not {resolution}: set buckets = false or pick one of those")
    return tables[resolution]


def target_size(width: int, height: int, resolution: int, buckets: bool) -> tuple[int, int]:
    """(height, width) in pixels: the square `resolution`, or the closest aspect-ratio bin."""
    if not buckets:
        return resolution, resolution
    table = aspect_ratio_table(resolution)
    ratio = min(table, key=lambda r: abs(float(r) - height / width))
    h, w = table[ratio]
    return int(h), int(w)


def load_image(row: dict[str, Any]):
    """PIL image from embedded bytes, a file path, a tar member, or a parquet path + row index."""
    from PIL import Image

    if row.get("image"):
        return Image.open(io.BytesIO(row["image"])).convert("RGB")
    src, member = row.get("source"), row.get("member")
    if not src:
        raise ValueError("row has neither embedded image bytes nor a source path")
    if member is None:
        return Image.open(src).convert("RGB")
    if src.endswith(".parquet"):
        import pyarrow.parquet as pq

        t = pq.read_table(src)
        rec = t.slice(int(member), 1).to_pylist()[0]
        for col in ("image", "jpg", "png", "bytes", "img"):
            v = rec.get(col)
            if isinstance(v, dict):
                v = v.get("bytes")
            if isinstance(v, (bytes, bytearray)):
                return Image.open(io.BytesIO(v)).convert("RGB")
        raise ValueError(f"{src} row {member} has no image bytes column")
    with tarfile.open(src) as tf:
        f = tf.extractfile(member)
        if f is None:
            raise ValueError(f"{member} not found in {src}")
        return Image.open(io.BytesIO(f.read())).convert("RGB")


def image_to_tensor(img, height: int, width: int) -> torch.Tensor:
    """Resize to cover (height, width), centre-crop, scale to [-1, 1]; (3, H, W)."""
    from PIL import Image

    s = max(height / img.height, width / img.width)
    nw, nh = max(width, round(img.width * s)), max(height, round(img.height * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    img = img.crop((left, top, left + width, top + height))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


# ---- the step ----------------------------------------------------------------------------------

def _caption_rows(shards_dir: str | Path) -> Iterator[dict[str, Any]]:
    cols = ["key", "caption", "error", "image", "source", "member", "width", "height"]
    from shards import fs as shard_fs

    for shard in complete_shards(shards_dir):
        names = shard_fs.read_schema(shard).names  # a local path or a URI
        if "caption" not in names or "key" not in names:
            raise ShardError(f"{shard} has no caption/key column: pass caption shards written by `t2i-data caption`")
    for batch in iter_batches(shards_dir, columns=cols, batch_size=256):
        yield from batch.to_pylist()


def features_dir(root: str | Path, cfg: FeatureConfig) -> Path:
    return Path(root) / cfg.cache_key()


def compute_features(shards_dir: str | Path, root: str | Path, cfg: FeatureConfig, device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Encode every valid caption row of `shards_dir` not yet in `root/<cache key>/`.

    Returns {"dir", "rows" (total encoded), "new", "skipped_invalid", "failed"}.
    """
    from shards import fs as shard_fs

    shards_dir = shard_fs.as_location(shards_dir)  # caption shards may be on an object store (s3://, gs://, ...)
    if not complete_shards(shards_dir):
        raise ShardError(f"no complete caption shards in {shards_dir}: run `t2i-data caption --out {shards_dir}` first")
    out = features_dir(root, cfg)
    with output_lock(out, "features"):  # one writer per features directory, before any clean-up
        return _compute_features_locked(shards_dir, out, cfg, device, progress)


def _compute_features_locked(shards_dir, out: Path, cfg: FeatureConfig, device: str | None, progress: bool) -> dict[str, Any]:
    """compute_features, run while this process holds `out`'s lock."""
    clean_incomplete(out)
    (out / "config.json").write_text(json.dumps({**asdict(cfg), "cache_key": cfg.cache_key()}, indent=2))
    done = done_keys(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    from rich.progress import Progress

    from shards import read_manifest

    stats = {"dir": str(out), "new": 0, "skipped_invalid": 0, "failed": 0, "failures": [], "valid": 0}
    models = None
    writer = None
    pending: list[dict[str, Any]] = []

    def encode(chunk: list[dict[str, Any]]) -> None:
        nonlocal models, writer
        if models is None:  # loaded lazily: a fully cached run never touches the VAE or T5
            models = (load_vae(cfg.vae, device), *load_text_encoder(cfg.text_encoder, device))
            writer = ShardWriterFeatures(out, cfg)
        ok = []
        for r in chunk:
            try:
                img = load_image(r)
                h, w = target_size(img.width, img.height, cfg.resolution, cfg.buckets)
                ok.append((r, image_to_tensor(img, h, w)))
            except Exception as e:  # an unreadable image is recorded, not fatal
                stats["failed"] += 1
                stats["failures"].append(f"{r['key']}: {e}")
        by_size: dict[tuple[int, int], list] = {}
        for r, x in ok:
            by_size.setdefault(tuple(x.shape[1:]), []).append((r, x))
        for group in by_size.values():
            writer.add_batch(group, models[0], models[1], models[2], device)
            stats["new"] += len(group)

    total = read_manifest(shards_dir).get("rows")
    with Progress(disable=not progress) as bar:
        task = bar.add_task("features", total=total)
        for r in _caption_rows(shards_dir):  # streamed: never all rows (and image bytes) in memory
            bar.advance(task)
            if r["error"] is not None or not r["caption"]:
                stats["skipped_invalid"] += 1
                continue
            stats["valid"] += 1
            if r["key"] in done:
                continue
            pending.append(r)
            if len(pending) >= cfg.batch_size:
                encode(pending)
                pending = []
        if pending:
            encode(pending)
    if writer is not None:
        writer.close()
    if not stats["valid"]:
        raise ShardError(f"{shards_dir} has no rows with a caption (all null or errored): caption the images first")
    stats["failures"] = stats["failures"][:20]
    stats["rows"] = len(done_keys(out))
    write_manifest(out, config={**asdict(cfg), "cache_key": cfg.cache_key()}, extra={"schema": "features", "source": str(shards_dir)})
    return stats


class ShardWriterFeatures:
    """Encodes groups of same-size images and hands rows to a ShardWriter in FEATURE_SCHEMA."""

    def __init__(self, out: Path, cfg: FeatureConfig) -> None:
        from shards import ShardWriter

        self.cfg = cfg
        self.writer = ShardWriter(out, rows_per_shard=cfg.rows_per_shard, schema=FEATURE_SCHEMA, prefix="features")

    @torch.no_grad()
    def add_batch(self, group, vae, tok, enc, device) -> None:
        x = torch.stack([t for _, t in group]).to(device, vae.dtype)
        post = vae.encode(x).latent_dist
        mean, std = post.mean.float().cpu(), post.std.float().cpu()
        emb, mask = encode_text(tok, enc, [r["caption"] for r, _ in group], self.cfg.max_tokens)
        emb = emb.to(getattr(torch, self.cfg.text_dtype)).cpu()
        lens = mask.sum(1).cpu()
        for i, (r, img) in enumerate(group):
            n = int(lens[i])
            self.writer.add(
                {
                    "key": r["key"],
                    "caption": r["caption"],
                    "height": img.shape[1],
                    "width": img.shape[2],
                    "latent_shape": list(mean.shape[1:]),
                    "latent_mean": mean[i].numpy().tobytes(),
                    "latent_std": std[i].numpy().tobytes(),
                    "text_emb": emb[i, :n].contiguous().view(torch.uint8).numpy().tobytes(),
                    "text_len": n,
                    "text_channels": emb.shape[-1],
                    "text_dtype": self.cfg.text_dtype,
                }
            )

    def close(self) -> None:
        self.writer.flush()


def read_feature_config(features: str | Path) -> dict[str, Any]:
    p = Path(features) / "config.json"
    if not p.exists():
        raise UserError(f"{features} is not a feature directory (no config.json): run `t2i-data features` first")
    return json.loads(p.read_text())
