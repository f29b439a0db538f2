"""The settings of a features run (`FeatureConfig`), in a module of their own that imports no
model code: the CLI reads their defaults, t2i.features (the job) and t2i.train.config use them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from shards.checks import WORKERS, Range, check_ranges
from shards.errors import UserError
from shards.images import DEFAULT_MAX_PIXELS
from shards.writer import ROWS_PER_SHARD
from t2i.caption_fields import DEFAULT_FIELDS, parse_fields

FEATURE_VERSION = 2  # 2: shared decode policy (EXIF, draft), latent_dtype
DTYPES = ("float32", "float16", "bfloat16")
# int8, fp8: one byte a value + a scale per token (t2i.text_codec); ids: token ids, encoded on demand (t2i.text_ondemand)
TEXT_DTYPES = DTYPES + ("int8", "fp8", "ids")
ENGINES = ("local", "ray")
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_TEXT_ENCODER = "google/t5-v1_1-xxl"
MODEL_ROLES = {"vae": ("VAE", "--vae"), "text_encoder": ("text encoder", "--text-encoder"), "teacher": ("REPA teacher", "--teacher")}


# the range of every numeric setting (shards.checks); a resolution past 4096 px would only
# allocate images for minutes before failing
FEATURE_RANGES = {"resolution": Range(8, 4096), "max_tokens": Range(1, 1024), "batch_size": Range(1, 65536),
                  "rows_per_shard": Range(1, 10_000_000, flag="--shard-size"), "workers": WORKERS,
                  "max_pixels": Range(1, 10**10), "replicas": Range(1, 4096)}


@dataclass
class FeatureConfig:
    """Every setting of a features run. IDENTITY: the settings that shape the features (hashed
    into the cache key, so they name the directory); the others may change on resume."""

    IDENTITY: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "resolution", "buckets", "max_tokens", "text_dtype",
                                           "latent_dtype", "draft", "caption_fields", "teacher", "teacher_dtype")  # fmt: skip

    vae: str = DEFAULT_VAE
    text_encoder: str = DEFAULT_TEXT_ENCODER
    resolution: int = 256
    buckets: bool = False  # multi-aspect: the 256/512/1024 aspect-ratio bins of PixArt
    max_tokens: int = 120
    text_dtype: str = "float16"  # int8 | fp8: half float16's bytes (t2i.text_codec); ids: token ids (t2i.text_ondemand)
    latent_dtype: str = "float32"  # how latents are stored; float16/bfloat16 halve the disk
    draft: bool = True  # JPEG DCT-scaled decoding down to what the resize needs
    batch_size: int = 16
    rows_per_shard: int = ROWS_PER_SHARD
    workers: int = 0  # decode threads (0: cores, at most 8)
    max_pixels: int = DEFAULT_MAX_PIXELS  # bomb guard: larger images are recorded as failures
    # speed settings (not in the cache key: the features are the same to float rounding)
    channels_last: bool = False  # the VAE encodes in channels_last (NHWC) memory format
    compile_text: bool = False  # the T5 encoder's blocks torch.compiled (t2i.encoders.compile_text_encoder)
    compile_vae: bool = False  # the VAE's encoder torch.compiled (t2i.encoders.compile_vae_encoder)
    caption_fields: tuple[str, ...] = DEFAULT_FIELDS  # caption-shard fields to encode, each its own T5 features
    teacher: str = ""  # REPA's teacher (t2i.teacher): a vision model by HF id or directory whose patch tokens are stored
    teacher_dtype: str = "float16"  # how its patch tokens are stored
    engine: str = "local"  # "local": this process (torchrun / accelerate ranks: its share); "ray": t2i.features_ray
    ray_address: str | None = None  # engine "ray": this cluster (default: a local Ray)
    replicas: int = 1  # engine "ray": encoder actors, one GPU each on a GPU cluster

    def __post_init__(self) -> None:
        self.caption_fields = parse_fields(self.caption_fields)

    def identity(self) -> dict[str, Any]:
        """The identity settings as they are compared: a local model directory by its absolute path."""
        ident: dict[str, Any] = {k: getattr(self, k) for k in self.IDENTITY}
        ident["caption_fields"] = list(self.caption_fields)
        for k in ("vae", "text_encoder", "teacher"):
            p = Path(ident[k])
            ident[k] = str(p.resolve()) if ident[k] and p.exists() else ident[k]
        if not self.teacher:  # so features made (and runs recorded) before the option keep their key and identity
            del ident["teacher"], ident["teacher_dtype"]
        return ident

    def model_digests(self) -> dict[str, str]:
        """The content digest of each model given as a local folder (shards.hub.local_model_digest),
        recorded beside the features: a folder's path names the features, its weights may change."""
        from shards.hub import local_model_digest

        digests = {k: local_model_digest(getattr(self, k)) for k in MODEL_ROLES if getattr(self, k)}
        return {k: d for k, d in digests.items() if d is not None}

    def cache_key(self) -> str:
        """A digest of the identity settings (and the feature version): the directory's name."""
        ident = self.identity()
        if self.caption_fields == DEFAULT_FIELDS:  # so features made before the option keep their key
            del ident["caption_fields"]
        ident["version"] = FEATURE_VERSION
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        """UserError (one line) for a setting out of range."""
        check_dtypes(self)
        if self.engine not in ENGINES:
            raise UserError(f"unknown --engine {self.engine!r}: use local or ray")
        check_ranges(self, FEATURE_RANGES)

    def check_models(self) -> None:
        """The VAE and the text encoder, checked before any row is read (shards.hub: a hub id in
        seconds, a missing or empty folder); the encoders themselves load on the first batch."""
        from shards.hub import check_model

        check_model(self.vae, "the VAE", "--vae")
        check_model(self.text_encoder, "the text encoder", "--text-encoder")
        check_teacher(self.teacher)


def check_model_digests(fdir: Path, made: dict[str, Any], now: dict[str, str]) -> None:
    """UserError (one line) when a local model folder that made the features in `fdir` (their
    config.json, `made`) holds other weights now (`now`: FeatureConfig.model_digests). Features
    recorded before digests were kept are accepted."""
    for role, digest in now.items():
        before = made.get("model_digests", {}).get(role)
        if before is not None and before != digest:
            name, flag = MODEL_ROLES[role]
            raise UserError(f"{fdir} holds features made with the {name} at {made.get(role)} before its weights changed "
                            f"(content digest {before}, now {digest}): delete {fdir} and make the features again, "
                            f"or restore that {name}'s weights, or pass another {flag}")


def check_dtypes(cfg: Any, dashes: bool = True) -> None:
    """A UserError (one line) for a stored dtype of `cfg` (FeatureConfig, TrainConfig) that is not known."""
    for name in ("text_dtype", "latent_dtype", "teacher_dtype"):
        allowed, value = TEXT_DTYPES if name == "text_dtype" else DTYPES, getattr(cfg, name)
        flag = f"--{name.replace('_', '-')}" if dashes else name
        if value not in allowed:
            raise UserError(f"{flag} {value!r} is not one of {', '.join(allowed)}: pick one")
    if cfg.text_dtype == "fp8":
        from t2i.text_codec import fp8_supported  # torch: only when fp8 is asked for

        if not fp8_supported():
            raise UserError("text_dtype fp8 needs torch >= 2.1 (float8_e4m3fn): use int8, or upgrade torch")


def check_teacher(teacher: str) -> None:
    """A UserError (one line, within seconds) for a REPA teacher that cannot be loaded or has no
    patch tokens, before any work (its config and processor only: the weights load with the encoders)."""
    if teacher:
        from t2i.teacher import teacher_shape

        teacher_shape(teacher)


@dataclass
class FeaturesRun:
    """The features command: the caption shards, the features root (shards go to
    `out/<cache key>/`), torch CPU threads (0: torch's default) and the FeatureConfig."""

    shards: str
    out: Path
    threads: int = 0
    config: FeatureConfig = field(default_factory=FeatureConfig)

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> FeaturesRun:
        """A run from the flags given: the run's own (shards, out, threads), and the others, each
        named after the FeatureConfig field it sets."""
        own = {f.name for f in fields(cls)} - {"config"}
        config = FeatureConfig(**{k: v for k, v in flags.items() if k not in own})
        return cls(**{k: v for k, v in flags.items() if k in own}, config=config)
