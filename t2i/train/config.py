"""A training stage's settings (`TrainConfig`) and the checks they pass before any work."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shards.checks import SEED, WORKERS, Range, check_ranges
from shards.errors import UserError
from t2i.caption_fields import parse_fields, parse_weights
from t2i.feature_config import FeatureConfig, check_dtypes

if TYPE_CHECKING:
    from t2i.data import Holdout
    from t2i.encoders import VaeFactors

# The checks below import the model code they need (torch) when they run, so that the settings
# and their defaults read without it (the CLI's --help).

# The range of every numeric setting (shards.checks: one line naming it and its range); the
# objective's own settings (timestep_power, snr_gamma, flow_shift, ...) are checked by their objective.
REPA_RANGES = {"repa_weight": Range(0, 100), "repa_block": Range(0, 4096), "repa_proj": Range(0, 65536)}
TRAIN_RANGES: dict[str, Range] = {
    "resolution": Range(8, 4096), "max_tokens": Range(1, 1024), "batch_size": Range(1, 65536),
    "global_batch": Range(0, 10_000_000), "grad_accum": Range(1, 4096), "steps": Range(1, 10**9),
    "lr": Range(0, 10),  # 0: the weights stay as they are (an import check)
    "warmup_steps": Range(0, 10**9), "weight_decay": Range(0, 10),
    "grad_clip": Range(0, 10**6), "ema_decay": Range(0, 1), "ema_every": Range(1, 10**6),
    "caption_dropout": Range(0, 1, hi_open=True),
    "logit_mean": Range(-10, 10), "val_keys": Range(0, 10**9), "val_every": Range(0, 10**9),
    "checkpoint_every": Range(1, 10**9), "keep_checkpoints": Range(0, 10**6), "log_every": Range(1, 10**9),
    "seed": SEED, "threads": WORKERS, "loader_workers": WORKERS,
    **REPA_RANGES,
}  # fmt: skip


@dataclass
class TrainConfig:
    """One training stage's settings (a manifest's [[stages]] entry, or the train command's flags)."""

    name: str = "train"
    kind: str = "text-to-image"  # t2i.conditioning: text-to-image (PixArt) | class-cond (a class-conditional DiT)
    class_column: str = ""  # class-cond: the caption-shard column holding each image's label
    preset: str = "PixArt-XL/2"
    init: str = "scratch"  # scratch | dit:PATH | pixart:DIR | checkpoint:DIR
    # t2i.sigma: alpha (PixArt-alpha) | sigma (PixArt-Sigma: no micro-conditions, positions at resolution / 512,
    # PixArtSigmaPipeline); its 300 tokens and SDXL VAE are the features' settings (manifests/pixart-sigma.toml)
    family: str = "alpha"
    kv_compress: int = 1  # key/value token compression in self-attention: the stride (1: off; Sigma's 2)
    kv_compress_layers: tuple = ()  # the blocks that compress (empty: all)
    # the features' settings (t2i.feature_config.FeatureConfig), with its defaults
    resolution: int = FeatureConfig.resolution
    buckets: bool = FeatureConfig.buckets
    vae: str = FeatureConfig.vae
    text_encoder: str = FeatureConfig.text_encoder
    max_tokens: int = FeatureConfig.max_tokens
    text_dtype: str = FeatureConfig.text_dtype  # int8 | fp8: compact (t2i.text_codec); ids: encoded on demand (t2i.text_ondemand)
    latent_dtype: str = FeatureConfig.latent_dtype  # how features store latents
    batch_size: int = 64  # per process, per micro-batch (ignored when global_batch is set)
    global_batch: int = 0  # samples per micro-batch over all processes; 0: batch_size x processes
    grad_accum: int = 1
    steps: int = 1000  # optimizer steps
    lr: float = 2e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.03
    grad_clip: float = 0.01
    ema_decay: float = 0.9999
    ema_every: int = 1  # average the EMA on every k-th optimizer step only, with the decay of k steps (t2i.train.ema)
    caption_dropout: float = 0.1
    # several captions per image (Sana-style): each sample trains on one of these caption-shard
    # fields per epoch, drawn with caption_weights (default equal); t2i.caption_fields
    caption_fields: tuple = FeatureConfig.caption_fields
    caption_weights: tuple = ()
    # or drawn by how well each field matches its image (t2i.caption_scores, Sana-style): a score
    # directory with clip_score_<field> columns (`score --scorers captions`); softmax(points / T),
    # points = 100 x cosine; fields below the threshold are dropped (none left: the best one)
    caption_scores: str = ""
    caption_score_temperature: float = 3.0
    caption_score_threshold: float = float("-inf")  # -inf: no threshold (Sana's configs use 25)
    # the objective (t2i.objective: DDPM with the IDDPM hybrid loss, t2i.diffusion, or flow matching,
    # t2i.flow); another objective's setting is refused, and so is any change on --resume
    learned_sigma: bool = True  # ddpm: the model also outputs the variance (IDDPM); flow predicts v only and ignores it
    prediction_type: str = "epsilon"  # epsilon (the paper's) | v_prediction (better on small latents)
    # ddpm: timesteps drawn as floor(T * u**p) (draw_timesteps): 1 is uniform, the paper's; p < 1
    # trains the noisy steps, where an object's outline is decided, more often
    timestep_power: float = 1.0
    objective: str = "ddpm"  # ddpm (the paper's, t2i.diffusion) | flow (rectified flow, t2i.flow)
    loss_weighting: str = "none"  # ddpm: none | min_snr (min-SNR-gamma); flow: none | sigma_sqrt | cosmap (SD3's)
    snr_gamma: float = 5.0  # ddpm, min_snr: the gamma
    timestep_density: str = "uniform"  # flow: uniform | logit_normal (t = sigmoid(N(logit_mean, logit_std)))
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 1.0  # flow: SD3's resolution shift t' = s t / (1 + (s - 1) t) in training and sampling (1: none)
    # token dropping (TREAD-style routing, t2i.routing): in training, this share of the patch tokens
    # skips blocks [token_drop_start, token_drop_end) (negative: from the end); 0: off
    token_drop: float = 0.0
    token_drop_start: int = 1
    token_drop_end: int = -1
    # REPA (t2i.repa): the output of the first repa_block blocks (0: a third of the depth), through a
    # projector repa_proj wide (0: REPA's 2048, at most 4 x the width), trained to match by cosine
    # the patch tokens of `teacher` that features stored (t2i.teacher); loss += repa_weight x
    # (1 - cos); 0: off. `teacher` also makes features store its tokens, in teacher_dtype
    teacher: str = FeatureConfig.teacher
    teacher_dtype: str = FeatureConfig.teacher_dtype
    repa_weight: float = 0.0
    repa_block: int = 0
    repa_proj: int = 0
    # a validation loss on held-out keys (t2i.train.validate): a share of the keys, or a number of
    # them, chosen by key hash and never trained on; fixed noise and timesteps per key
    val_fraction: float = 0.0
    val_keys: int = 0
    val_every: int = 0  # optimizer steps between validations (0: at every checkpoint)
    val_timesteps: int = 4  # timesteps per held-out sample, averaged (stratified over the objective's density)
    mixed_precision: str = "no"  # no | bf16 | fp16
    # t2i.precision: bfloat16 runs forward/backward on bf16 copies of fp32 master weights (FSDP2's
    # mixed precision, a bf16 residual stream; needs mixed_precision bf16); float32: autocast only
    param_dtype: str = "float32"
    float8: bool = False  # the blocks' linear layers multiply in float8 (torchao Float8Linear; the fp8 extra)
    grad_checkpointing: bool = False
    compile: bool = False
    attention: str = "auto"  # SDPA kernel order (t2i.models.ATTENTION_ORDERS): auto | flash | efficient | cudnn
    fsdp: bool = False  # shard weights, grads, AdamW state and EMA over the processes (t2i.sharding)
    trace_keys: bool = False  # write <out>/trace/rank-<r>.jsonl: the sample keys each rank consumed
    loader_workers: int = 2  # DataLoader worker processes reading feature rows ahead (0: in the training process)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    threads: int = 0  # CPU threads for torch (0: leave torch's default)
    # LoRA (t2i.lora, through peft): lora_rank > 0 trains only an adapter on these modules of the
    # transformer (names or dotted suffixes), everything else frozen; checkpoints hold the adapter alone
    lora_rank: int = 0  # 0: off (full fine-tune)
    lora_alpha: float = 0.0  # the adapter's scale is alpha / rank; 0: alpha = rank
    lora_targets: tuple = ("to_q", "to_k", "to_v", "to_out.0")  # t2i.lora.DEFAULT_TARGETS
    lora_variant: str = "lora"  # lora | dora (peft's weight-decomposed LoRA)
    report_to: str = ""  # experiment trackers, comma-separated: tensorboard | wandb | mlflow (t2i.trackers)
    sample_prompts: str = ""  # '|'-separated prompts sampled at every checkpoint for the trackers

    def __post_init__(self) -> None:
        # a TOML list, a comma-separated CLI string or a tuple; bad names fail here, before any work
        self.caption_fields = parse_fields(self.caption_fields)
        self.caption_weights = parse_weights(self.caption_weights, self.caption_fields)
        self.kv_compress_layers = parse_layers(self.kv_compress_layers)
        if isinstance(self.lora_targets, (str, list)):
            self.lora_targets = tuple(t.strip() for t in (self.lora_targets.split(",") if isinstance(self.lora_targets, str) else self.lora_targets))

    @classmethod
    def field_names(cls) -> list[str]:
        """The settings' names (what a manifest stage may set)."""
        return [f.name for f in fields(cls)]

    def feature_config(self) -> FeatureConfig:
        """The settings of the features this stage trains on."""
        return FeatureConfig(vae=self.vae, text_encoder=self.text_encoder, resolution=self.resolution,
                             buckets=self.buckets, max_tokens=self.max_tokens, text_dtype=self.text_dtype,
                             latent_dtype=self.latent_dtype, caption_fields=self.caption_fields, teacher=self.teacher,
                             teacher_dtype=self.teacher_dtype)

    def validate(self) -> None:
        """A UserError naming the first bad setting (and its fix)."""
        from t2i.kinds import conditioning_class
        from t2i.models import ATTENTION_ORDERS, get_preset
        from t2i.objective import check_objective
        from t2i.trackers import check_report_to

        if self.init == "scratch":
            get_preset(self.preset)
        conditioning_class(self.kind).check_config(self)
        check_objective(vars(self))
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise UserError(f"mixed_precision {self.mixed_precision!r} is not one of no, bf16, fp16: pick one")
        for name in ("batch_size", "grad_accum", "steps", "checkpoint_every", "log_every", "max_tokens", "resolution"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}: fix the stage settings")
        if self.attention not in ATTENTION_ORDERS:
            raise UserError(f"attention {self.attention!r} is not one of {', '.join(ATTENTION_ORDERS)}: pick one")
        if self.loader_workers < 0:
            raise UserError(f"loader_workers must be >= 0 (0: read in the training process), got {self.loader_workers}")
        if self.global_batch < 0:
            raise UserError(f"global_batch must be >= 0 (0: batch_size x processes), got {self.global_batch}")
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        self._validate_levers()
        check_ranges(self, TRAIN_RANGES, dashes=False)
        from t2i.precision import check_precision

        check_precision(self)
        from t2i.sigma import check_family

        check_family(self)
        from t2i.lora import check_settings, check_targets_early

        check_settings(self)
        check_targets_early(self)
        check_report_to(self.report_to)
        if self.caption_scores:
            self.caption_scoring().check()

    def caption_scoring(self):
        """The caption-score draw's settings (t2i.caption_scores.CaptionScoring), or None without caption_scores."""
        from t2i.caption_scores import CaptionScoring

        if not self.caption_scores:
            return None
        threshold = None if self.caption_score_threshold == float("-inf") else self.caption_score_threshold
        return CaptionScoring(self.caption_scores, self.caption_score_temperature, threshold)

    def _validate_levers(self) -> None:
        """Token dropping, REPA and the validation loss settings."""
        from t2i.models import get_preset
        from t2i.repa import check_repa
        from t2i.routing import routed_blocks

        if not 0 <= self.token_drop < 1:
            raise UserError(f"token_drop must be in [0, 1) (the share of patch tokens routed past the middle blocks), got {self.token_drop}")
        if self.token_drop and self.init == "scratch":
            routed_blocks(get_preset(self.preset).depth, self.token_drop_start, self.token_drop_end)
        check_ranges(self, REPA_RANGES, dashes=False)
        check_dtypes(self, dashes=False)  # text_dtype, latent_dtype, teacher_dtype
        check_repa(vars(self), get_preset(self.preset).depth if self.init == "scratch" else None)
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"val_fraction must be in [0, 1) (the share of keys held out for the validation loss), got {self.val_fraction}")
        if self.val_keys < 0 or (self.val_keys and self.val_fraction):
            raise UserError(f"val_keys = {self.val_keys} with val_fraction = {self.val_fraction}: hold out keys by one of them "
                            "(val_keys >= 1 or val_fraction in (0, 1)), set the other to 0")
        if self.val_every < 0 or self.val_timesteps < 1:
            raise UserError(f"val_every must be >= 0 (0: at every checkpoint) and val_timesteps >= 1, got {self.val_every} "
                            f"and {self.val_timesteps}: fix the stage settings")

    def holdout(self) -> Holdout:
        """The held-out keys of the validation loss (none when val_fraction and val_keys are 0)."""
        from t2i.data import Holdout

        return Holdout(self.val_fraction, self.val_keys)


def parse_layers(value) -> tuple[int, ...]:
    """kv_compress_layers from a TOML list, a comma-separated CLI string or a tuple."""
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise UserError(f"kv_compress_layers {value!r} is not a comma-separated list of block indices: e.g. 14,15,16") from None
    return tuple(value)


def per_process_batch(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(per-process micro-batch, global micro-batch) for `world` processes.

    The global batch is what fixes the data order, the noise and the resume position; a run may
    resume on another number of processes as long as the global batch stays the same."""
    if cfg.global_batch:
        if cfg.global_batch % world:
            raise UserError(f"global_batch {cfg.global_batch} is not divisible by {world} processes: pick a multiple of {world}")
        return cfg.global_batch // world, cfg.global_batch
    return cfg.batch_size, cfg.batch_size * world


def preflight(cfg: TrainConfig) -> VaeFactors:
    """The checks a stage passes before any work (features included): its settings, and a
    resolution that splits into whole patches of latent cells. Returns the VAE's factors."""
    from t2i.encoders import vae_factors

    cfg.validate()
    check_models(cfg)
    vae = vae_factors(cfg.vae)
    check_resolution(cfg.resolution, _patch_of(cfg), vae.spatial)
    return vae


def check_models(cfg: TrainConfig) -> None:
    """Every model a stage loads, checked before any work (shards.hub: one line within seconds
    for a hub id that cannot be reached, a folder that is missing or empty): the VAE, the text
    encoder, REPA's teacher (its config and processor: a patch grid), and a `pixart:` (a local
    folder or a hub id) or `dit:` init."""
    from shards.hub import check_model
    from t2i.feature_config import check_teacher

    kind, _, arg = cfg.init.partition(":")
    if kind != "pixart":  # a released model is named first: the one a fine-tune is about
        check_model(cfg.vae, "the VAE", "vae")
        check_model(cfg.text_encoder, "the text encoder", "text_encoder")
    if kind == "pixart":
        check_model(arg, "PixArt model", "init pixart:")
        from t2i.text_cond import check_pipeline_family, check_pixart_folder

        check_pixart_folder(arg)
        check_pipeline_family(arg, cfg.family)
        check_model(cfg.vae, "the VAE", "vae")
        check_model(cfg.text_encoder, "the text encoder", "text_encoder")
    check_teacher(cfg.teacher)
    if kind == "dit" and Path(arg).is_file():  # a .pt/.safetensors: readable as weights (mapped, not read)
        from shards.hub import load_weights_file

        load_weights_file(arg, "DiT checkpoint", "init dit:", mmap=True)
    elif kind == "dit":
        from t2i.dit_source import dit_directory

        dit_directory(arg)  # a missing path, or a folder that holds no DiT


def _patch_of(cfg: TrainConfig) -> int:
    from t2i.models import get_preset

    if cfg.init == "scratch":
        return get_preset(cfg.preset).patch
    return 0  # known only once the init model is loaded; checked then


def check_resolution(resolution: int, patch: int, spatial: int) -> None:
    """The image side must split into whole patches of latent cells (patch 0: not known yet)."""
    if patch and resolution % (patch * spatial):
        raise UserError(f"resolution {resolution} is not divisible by patch x VAE factor ({patch} x {spatial} = {patch * spatial}): pick a multiple of {patch * spatial}")


@dataclass
class TrainRun:
    """The train command: where the run goes and what it trains on (caption shards, features, or
    a manifest's stages), and `overrides`, the TrainConfig settings given as flags (over a
    manifest's stages, or over TrainConfig's defaults for a single stage)."""

    out: Path
    shards: str | None = None  # caption shards: features are computed from them first, as their own step
    features: Path | None = None  # a features directory or root (default OUT/features)
    manifest: str | None = None  # a TOML stage recipe: every stage in order
    stage: str | None = None  # only this manifest stage
    resume: bool = False  # continue from the last checkpoint in `out`
    threads: int = 0  # torch CPU threads for the whole run, features included (0: torch's default)
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> TrainRun:
        """A run from the flags given: the run's own (out, shards, ..., threads), and the others,
        each named after the TrainConfig field it sets, as overrides."""
        own = {f.name for f in fields(cls)} - {"overrides"}
        overrides = {k: v for k, v in flags.items() if k not in own}
        return cls(**{k: v for k, v in flags.items() if k in own}, overrides=overrides)

    def validate(self) -> None:
        """A UserError for flags that contradict each other or leave nothing to train on."""
        if self.manifest and "kind" in self.overrides:
            raise UserError("--kind sets a single stage's kind: set kind per stage in the manifest instead")
        if not self.manifest and self.shards is None and self.features is None and not self.resume:
            raise UserError("no --shards or --features given: pass caption shards, features, "
                            "or --manifest with shards per stage")
        WORKERS.check("threads", self.threads)
        if not self.manifest:
            TrainConfig(**self.overrides).validate()

    def check_models(self) -> None:
        """A single stage's models (a hub id in seconds), before the model code loads; a
        manifest's stages are checked by preflight, each before its own work."""
        if not self.manifest:
            check_models(TrainConfig(**self.overrides))
