"""`t2i-data eval`: sample checkpoints and score what they generate, so they can be compared.

For every checkpoint of a training run (or one checkpoint directory, or an exported
PixArtAlphaPipeline folder) the same prompts are sampled with the same seeds (DPM-Solver++,
learned null caption, `t2i.sample.generate`), and the samples are scored:
- CLIPScore: cosine of each sample's CLIP image embedding with its prompt's text embedding
  (`shards.models.clip`, the same model and numbers as `t2i-data score`'s `clip_score`);
- aesthetic: the LAION aesthetic predictor v2 head on those image embeddings (`shards.models.aesthetic`);
- FID and KID against a folder of reference images (`t2i.fid`: torchmetrics, Inception weights
  from a local file, or CLIP features; KID's mean and std over subsets).
Results: `<out>/eval.json` and `<out>/eval.html` (one row per checkpoint, a sample grid each).
Each checkpoint's result is written to `<out>/<name>/result.json` once complete, so a rerun with
the same settings skips the checkpoints already scored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from shards import fs as shard_fs
from shards.checks import Range, check_output_dir, check_ranges, read_text_input
from shards.errors import UserError
from shards.models import DEFAULT_CLIP
from t2i.sample import SampleConfig

# The model code (torch) is imported by the functions that sample and score, so that EvalConfig
# and its defaults read without it (the CLI's --help).

GRID_IMAGES = 16  # samples shown per checkpoint on the page (all are saved as PNGs)
INCEPTION_DIMS = (64, 192, 768, 2048)  # t2i.fid's layers (checked here without importing torch)
# what a checkpoint's result depends on: a rerun into the same --out with another value is refused
IDENTITY = ("prompts", "clip", "aesthetic", "reference", "inception", "fid_features", "fid_dims", "steps", "guidance", "seed",
            "which", "vae", "text_encoder")  # fmt: skip


@dataclass
class EvalConfig:
    """What `evaluate_checkpoints` samples and how it scores (the eval command's flags map 1:1).
    `prompts` is the prompt list, or a text file of them, one per line (read here)."""

    prompts: list[str] | str | Path
    out: str | Path = "eval"
    clip: str = DEFAULT_CLIP
    aesthetic: str | None = None  # LAION aesthetic v2 head: .pth/.safetensors file or HF id
    reference: str | Path | None = None  # folder of reference images for FID
    inception: str | Path | None = None  # torch-fidelity Inception v3 weights file
    fid_features: str = "inception"  # inception | clip
    fid_dims: int = 2048  # Inception layer: 64 | 192 | 768 | 2048 (the standard FID)
    steps: int = SampleConfig.steps
    guidance: float = SampleConfig.guidance
    seed: int = SampleConfig.seed  # batch b is sampled with seed + b, the same for every checkpoint
    batch_size: int = 16
    which: str = SampleConfig.which  # ema | model (checkpoints only)
    vae: str | None = None
    text_encoder: str | None = None
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.prompts, (str, Path)):  # a file of prompts (the CLI's --prompts)
            self.prompts = read_prompts(self.prompts)

    def identity(self) -> dict[str, Any]:
        """The settings a checkpoint's result depends on (not where it is written, nor the
        display, nor the batch size): a rerun into the same --out must keep them. The prompts by
        their digest."""
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items() if k in IDENTITY}
        settings["prompts"] = hashlib.sha256(json.dumps(settings["prompts"]).encode()).hexdigest()[:12]
        return settings

    def fingerprint(self) -> str:
        """What a checkpoint's cached result depends on (not where it is written, nor the display)."""
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items() if k in IDENTITY}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        """A UserError for a setting out of range or unknown weights (before any model loads)."""
        from t2i.sample import SAMPLER_RANGES, check_overrides, check_weights

        check_ranges(self, {**SAMPLER_RANGES, "batch_size": Range(1, 4096)})
        check_weights(self.which)
        check_overrides(self.vae, self.text_encoder)
        if self.fid_dims not in INCEPTION_DIMS:
            raise UserError(f"--fid-dims {self.fid_dims} is not an Inception feature size: use one of "
                            f"{', '.join(map(str, INCEPTION_DIMS))}")


@dataclass
class Target:
    """One model to sample: a training checkpoint or an exported pipeline folder."""

    name: str
    path: Path
    kind: str  # checkpoint | export
    step: int | None = None


@dataclass
class Scored:
    """Per-checkpoint running totals while its samples stream through."""

    clip: list[float] = field(default_factory=list)
    aesthetic: list[float] = field(default_factory=list)
    grid: list = field(default_factory=list)


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    text = read_text_input(path, "prompts file", "pass --prompts FILE with one prompt per line")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts: write one prompt per line")
    return prompts


def find_targets(path: str | Path, which: str = "ema") -> list[Target]:
    """An exported pipeline folder, one checkpoint directory, or every checkpoint of a run
    directory (oldest step first). Checkpoints are verified first (t2i.recovery: sizes, headers,
    checksums of the files sampling reads): one given alone must verify; of a run's, the damaged
    ones are left out with one warning."""
    from t2i import checkpoint as ckpt
    from t2i.recovery import DamagedCheckpoint, usable_checkpoint, verify_checkpoint, warn

    p = Path(path)
    if (p / "model_index.json").is_file():
        return [Target(p.name, p, "export")]
    if (p / "model.safetensors").is_file():
        return [Target(p.name, usable_checkpoint(p, which), "checkpoint", _step(p))]
    found, damaged = [], []
    for ck in reversed(ckpt.checkpoint_dirs(p)):
        try:
            verify_checkpoint(ck, (which,))
            found.append(ck)
        except DamagedCheckpoint as e:
            damaged.append(f"{ck.name} ({e})")
    if damaged:
        warn(f"left out damaged checkpoint(s) {'; '.join(damaged)}")
    if not found:
        raise UserError(f"nothing to evaluate at {path}: pass a `t2i-data train` run directory, one of its "
                        "checkpoints/step-* directories, or a `t2i-data export` folder")  # fmt: skip
    return [Target(ck.name, ck, "checkpoint", _step(ck)) for ck in found]


def _step(ck: Path) -> int | None:
    from t2i import checkpoint as ckpt

    state = ck / ckpt.TRAINER_STATE
    if state.is_file():
        return json.loads(state.read_text()).get("step")
    return ckpt.parse_step(ck.name)


def _check(cfg: EvalConfig) -> None:
    if not cfg.prompts:
        raise UserError("no prompts: pass --prompts FILE with one prompt per line")
    cfg.validate()
    if cfg.reference is not None:
        from t2i.fid import check_options

        if not Path(cfg.reference).is_dir():
            raise UserError(f"--reference {cfg.reference} is not a directory: pass a folder of reference images")
        if len(cfg.prompts) < 2:
            raise UserError("FID needs at least 2 samples: pass at least 2 prompts")
        check_options(cfg.fid_features, cfg.inception, cfg.fid_dims)
    from shards.hub import check_model

    check_model(cfg.clip, "CLIP model", "--clip")  # in seconds; its answer is kept for the load (shards.hub)


def load_scorers(cfg: EvalConfig, device: str):
    """(ClipEmbedder, aesthetic head or None, FidMeter or None), all checked before any sampling."""
    from shards.models.aesthetic import load_head
    from shards.models.clip import ClipEmbedder

    clip = ClipEmbedder(cfg.clip, device=device, flag="--clip")
    head = load_head(cfg.aesthetic, clip.dim, flag="--aesthetic") if cfg.aesthetic else None
    fid = None
    if cfg.reference is not None:
        from t2i.fid import FidMeter

        fid = FidMeter(cfg.fid_features, cfg.inception, clip, device=device, dims=cfg.fid_dims)
    return clip, head, fid


def _load_pipeline(target: Target, cfg: EvalConfig, device: str):
    if target.kind == "export":
        from t2i.export import load_exported

        return load_exported(target.path, device=device)
    from t2i.sample import pipeline_from_checkpoint

    return pipeline_from_checkpoint(target.path, cfg.vae, cfg.text_encoder, cfg.which, device=device)


def _batches(prompts: Sequence[str], size: int):
    for b, start in enumerate(range(0, len(prompts), size)):
        yield b, start, list(prompts[start : start + size])


def sample_and_score(target: Target, cfg: EvalConfig, scorers, out_dir: Path, advance: Callable[[int], None]) -> dict[str, Any]:
    """Sample every prompt from `target` in batches (seed: cfg.seed + batch index, the same for
    every checkpoint), save the PNGs, score them, and return this checkpoint's result."""
    from shards.models.clip import clip_scores
    from t2i.sample import generate, image_grid

    clip, head, fid = scorers
    pipe, null = _load_pipeline(target, cfg, clip.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    acc = Scored()
    with (out_dir / "samples.jsonl.tmp").open("w") as log:
        for b, start, prompts in _batches(cfg.prompts, cfg.batch_size):
            images = generate(pipe, null, prompts, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed + b)
            image_emb = clip.embed_images(images)
            scores = clip_scores(image_emb, clip.embed_texts(prompts))
            aesthetic = head.predict(image_emb) if head is not None else [None] * len(images)
            for i, (im, prompt, s, a) in enumerate(zip(images, prompts, scores, aesthetic)):
                name = f"sample-{start + i:06d}.png"
                im.save(out_dir / name)
                log.write(json.dumps({"prompt": prompt, "image": name, "clip_score": float(s),
                                      "aesthetic": None if a is None else float(a)}) + "\n")  # fmt: skip
            acc.clip += [float(s) for s in scores]
            acc.aesthetic += [float(a) for a in aesthetic if a is not None]
            acc.grid += images[: max(0, GRID_IMAGES - len(acc.grid))]
            if fid is not None:
                fid.add(images, real=False)
            advance(len(prompts))
    (out_dir / "samples.jsonl.tmp").replace(out_dir / "samples.jsonl")
    image_grid(acc.grid, cols=min(8, len(acc.grid))).save(out_dir / "grid.png")
    del pipe
    return _result(target, acc, fid, out_dir)


def _result(target: Target, acc: Scored, meter, out_dir: Path) -> dict[str, Any]:
    import numpy as np

    fid = meter.compute() if meter is not None else None
    kid, kid_std = meter.kid if meter is not None else (None, None)
    clip = np.asarray(acc.clip)
    return {
        "name": target.name, "path": str(target.path), "kind": target.kind, "step": target.step, "samples": len(clip),
        "clip_score": float(clip.mean()), "clip_score_std": float(clip.std()),
        "aesthetic": float(np.mean(acc.aesthetic)) if acc.aesthetic else None, "fid": fid,
        "kid": kid, "kid_std": kid_std, "grid": f"{out_dir.name}/grid.png", "samples_file": f"{out_dir.name}/samples.jsonl",
    }  # fmt: skip


def _cached_result(out_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    path = out_dir / "result.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["result"] if saved.get("fingerprint") == fingerprint else None


def eval_command(target: str | Path, cfg: EvalConfig) -> str:
    """`t2i-data eval`: score every checkpoint at `target`, then what the command prints."""
    from t2i.eval_report import summary_lines

    return summary_lines(evaluate_checkpoints(target, cfg))


def evaluate_checkpoints(target: str | Path, cfg: EvalConfig | None = None, **options: Any) -> dict[str, Any]:
    """Sample and score every checkpoint at `target`; write `<out>/eval.json` and `<out>/eval.html`.
    Settings: an EvalConfig, or its fields as keywords (`prompts=[...], clip="dir", out="eval"`).
    Returns the JSON's dict: {"checkpoints": [one result per checkpoint, oldest first: name, step,
    samples, clip_score, clip_score_std, aesthetic, fid, kid, kid_std, grid], "settings", "reference", "files"}.
    A rerun with the same settings skips the checkpoints already scored; one with other identity
    settings into the same `out` is refused."""
    from shards.lock import output_lock

    cfg = cfg if cfg is not None else EvalConfig(**options)
    _check(cfg)
    check_output_dir(cfg.out)  # under a file, read-only: one line before any model loads
    targets = find_targets(target, cfg.which)
    out = Path(cfg.out)
    with output_lock(out, "eval"):  # one eval per --out; its settings recorded before any result
        _record_settings(out, cfg)
        return _evaluate(target, targets, cfg, out)


def _record_settings(out: Path, cfg: EvalConfig) -> None:
    """Refuse a rerun into `out` (results written) with other identity settings, in one line;
    then record this run's (`run.json`, as the shard jobs do: shards.job)."""
    from shards.job import JobSpec, check_settings, record_settings

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "prompts"}
    spec = JobSpec("eval", out, settings=settings, identity=cfg.identity(), schema=None,
                   models=("clip", "aesthetic", "inception", "vae", "text_encoder"))
    check_settings(out, spec, committed=any(out.glob("*/result.json")))
    record_settings(out, spec)


def _evaluate(target: str | Path, targets: list[Target], cfg: EvalConfig, out: Path) -> dict[str, Any]:
    """evaluate_checkpoints' work, once its output is locked and its settings recorded."""
    import torch

    from t2i.eval_report import write_report

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fingerprint = cfg.fingerprint()
    scorers = load_scorers(cfg, device)
    reference = _add_reference(cfg, scorers[2]) if scorers[2] is not None else None
    results = []
    with _progress(cfg.progress) as bar:
        task = bar.add_task("sampling", total=len(targets) * len(cfg.prompts), info="")
        for t in targets:
            ck_dir = out / _safe_name(t.name)
            result = _cached_result(ck_dir, fingerprint)
            if result is None:
                bar.update(task, info=t.name)
                result = sample_and_score(t, cfg, scorers, ck_dir, lambda n: bar.advance(task, n))
                shard_fs.write_text(ck_dir / "result.json", json.dumps({"fingerprint": fingerprint, "result": result}, indent=2))
            else:
                bar.advance(task, len(cfg.prompts))
            results.append(result)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("prompts", "progress")}
    report = {"target": str(target), "checkpoints": results, "prompts": len(cfg.prompts),
              "grid_prompts": cfg.prompts[:GRID_IMAGES], "settings": settings, "reference": reference}
    report["files"] = [str(p) for p in write_report(out, report)]
    return report


def _add_reference(cfg: EvalConfig, fid) -> dict[str, Any]:
    """Feed the reference folder to the FID meter once; returns what was read."""
    from t2i.fid import read_reference, reference_files

    files, failed = reference_files(cfg.reference), []
    with _progress(cfg.progress) as bar:
        task = bar.add_task("reference", total=len(files), info=str(cfg.reference))
        for batch in read_reference(files, cfg.batch_size, failed, fid.size):
            fid.add(batch, real=True)
            bar.advance(task, len(batch))
    if fid.reference_count < 2:
        raise UserError(f"--reference {cfg.reference}: only {fid.reference_count} readable images, FID needs at least 2")
    return {"folder": str(cfg.reference), "images": fid.reference_count, "unreadable": failed,
            "features": cfg.fid_features if cfg.fid_features == "clip" else f"inception-{cfg.fid_dims}"}


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), disable=not enabled)  # fmt: skip


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


# public names for the suite evals (evals.suite) that sample the same checkpoints the same way
load_pipeline, safe_name = _load_pipeline, _safe_name
