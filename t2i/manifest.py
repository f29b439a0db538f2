"""Stage recipes in TOML (`manifests/*.toml`), validated with clear errors.

    name = "tiny-cpu"
    [defaults]                 # any TrainConfig key, applied to every stage
    preset = "PixArt-tiny/2"
    [[stages]]
    name = "align"
    init = "scratch"           # scratch | dit:PATH | pixart:DIR | checkpoint:DIR | previous
    shards = "captions/"       # optional; else the --shards given on the command line
    steps = 300
    caption_fields = ["caption", "caption_short"]   # optional: one per sample and epoch (t2i.caption_fields)
    caption_weights = [3, 1]                        # optional: default equal

Each stage trains into `<out>/<stage name>/`; `init = "previous"` starts from the previous
stage's last checkpoint (after a `kind = "class-cond"` stage, t2i.class_cond, a text-to-image
stage imports that DiT through t2i.import_dit, as `init = "dit:<its stage dir>"`).
Rerunning skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from shards.errors import UserError
from t2i.train import TrainConfig, TrainRun

TOP_KEYS = {"name", "description", "defaults", "stages"}
STAGE_EXTRA = {"shards", "gpus"}  # gpus: what `plan` prices the stage on (train uses the processes it runs on)


@dataclass
class Stage:
    config: TrainConfig
    shards: str | None
    gpus: int | None = None
    given: frozenset[str] = frozenset()  # keys the TOML set for this stage (its own or [defaults])


@dataclass
class Manifest:
    name: str
    description: str
    stages: list[Stage]


def _check_keys(where: str, d: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}: allowed keys are {', '.join(sorted(allowed))}")


def _check_types(where: str, d: dict[str, Any]) -> None:
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    for k, v in d.items():
        want = types.get(k)
        if want is None:
            continue
        ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if want is tuple:  # caption_fields, caption_weights: a TOML array (or a comma-separated string)
            ok = isinstance(v, (list, str))
        if not ok:
            raise UserError(f"{where}: {k} = {v!r} should be {'a list' if want is tuple else want.__name__}: fix the value")


def parse_manifest(text: str, source: str = "manifest") -> Manifest:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{source} is not valid TOML ({str(e).splitlines()[0]}): fix the syntax") from None
    _check_keys(source, raw, TOP_KEYS)
    allowed = set(TrainConfig.field_names()) | STAGE_EXTRA
    defaults = raw.get("defaults", {})
    _check_keys(f"{source} [defaults]", defaults, allowed - {"name"})
    _check_types(f"{source} [defaults]", defaults)
    stages_raw = raw.get("stages")
    if not stages_raw:
        raise UserError(f"{source} has no [[stages]]: add at least one stage")
    stages, seen = [], set()
    for i, st in enumerate(stages_raw):
        where = f"{source} stage {st.get('name', i)!r}"
        _check_keys(where, st, allowed)
        _check_types(where, st)
        merged = {**defaults, **st}
        merged.setdefault("name", f"stage{i}")
        if merged["name"] in seen:
            raise UserError(f"{where}: duplicate stage name: give each stage its own name")
        seen.add(merged["name"])
        if merged.get("init") == "previous" and i == 0:
            raise UserError(f"{where}: init = \"previous\" on the first stage: use scratch or dit:PATH")
        given = frozenset(merged)
        shards, gpus = merged.pop("shards", None), merged.pop("gpus", None)
        try:
            cfg = TrainConfig(**merged)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if cfg.init != "previous":
            cfg.validate()
        stages.append(Stage(cfg, shards, gpus, given))
    return Manifest(raw.get("name", source), raw.get("description", ""), stages)


def load_manifest(path: str | Path) -> Manifest:
    """The manifest at `path` (or a built-in one of manifests/ by name); one-line UserError for a
    missing, binary or non-UTF-8 file, or bad TOML."""
    from shards.checks import read_text_input

    path = Path(path)
    if not path.exists():
        builtin = Path(__file__).resolve().parent.parent / "manifests" / f"{path.name}"
        alt = builtin if builtin.exists() else builtin.with_suffix(".toml")
        if not alt.exists():
            raise UserError(f"manifest {path} not found: pass a TOML file (see manifests/)")
        path = alt
    return parse_manifest(read_text_input(path, "manifest", "pass a TOML file (see manifests/)"), str(path))


def _finished(stage_dir: Path, steps: int) -> bool:
    from t2i.checkpoint import latest_checkpoint
    from t2i.recovery import checkpoint_step

    done = checkpoint_step(latest_checkpoint(stage_dir))  # None for a damaged one: resume sorts it out
    return done is not None and done >= steps


def run_manifest(manifest: Manifest, out: str | Path, shards: str | Path | None = None, resume: bool = True,
                 only: str | None = None, overrides: dict[str, Any] | None = None, progress: bool = True,
                 features: str | Path | None = None) -> list[dict]:
    """Train every stage in order (or only stage `only`): features from its shards first, as
    their own step, into `features` (a features root; default `<stage dir>/features`), then the
    training loop on them (t2i.stage.run_stage). Finished stages are skipped; an interrupted one
    resumes from its checkpoint when `resume`."""
    from t2i.kinds import conditioning_class
    from t2i.recovery import has_checkpoints
    from t2i.stage import run_stage

    out = Path(out)
    results = []
    prev: Path | None = None
    prev_kind = None
    names = [s.config.name for s in manifest.stages]
    if only and only not in names:
        raise UserError(f"no stage {only!r} in {manifest.name}: pick one of {', '.join(names)}")
    for stage in manifest.stages:
        cfg = TrainConfig(**{**stage.config.__dict__, **(overrides or {})})
        sdir = out / cfg.name
        if cfg.init == "previous":
            if prev is None:
                prev = out / names[names.index(cfg.name) - 1]
            # as the stages' conditionings hand on: a text-to-image stage imports a class-cond DiT
            # by re-parameterisation
            via = conditioning_class(cfg.kind).init_from_previous(conditioning_class(prev_kind))
            cfg.init = f"{via}:{prev}"
        prev, prev_kind = sdir, cfg.kind
        if only and cfg.name != only:
            continue
        if _finished(sdir, cfg.steps):
            results.append({"stage": cfg.name, "skipped": "finished"})
            continue
        src = stage.shards or shards
        if src is None and features is None:
            raise UserError(f"stage {cfg.name!r} has no shards: pass --shards (or --features) or set shards in the manifest")
        res = run_stage(cfg, sdir, shards=src, features=features, resume=resume and has_checkpoints(sdir), progress=progress)
        results.append({"stage": cfg.name, **res})
    return results


def train_command(run: TrainRun) -> str:
    """`t2i-data train`: every stage of `run.manifest` (a line each), or one stage from the flags
    (the features step's line, then where training ended); returns what the command prints."""
    from shards.checks import check_output_dir

    run.validate()  # the settings: free to check
    check_output_dir(run.out)  # under a file, read-only: one line in no time
    run.check_models()  # a hub id may take seconds; all before the model code loads
    from t2i.features import features_line
    from t2i.ranks import set_threads
    from t2i.stage import run_stage

    set_threads(run.threads)
    if run.manifest:
        done = run_manifest(load_manifest(run.manifest), run.out, run.shards, resume=True, only=run.stage,
                            overrides=run.overrides, features=run.features)  # fmt: skip
        return "\n".join(_stage_line(r) for r in done)
    r = run_stage(TrainConfig(**run.overrides), run.out, shards=run.shards, features=run.features, resume=run.resume)
    lines = [features_line(r["features_step"])] if "features_step" in r else []
    return "\n".join([*lines, f"trained to step {r['step']}; checkpoint {r['checkpoint']}; log {r['log']}"])


def _stage_line(r: dict[str, Any]) -> str:
    """A manifest stage's line: skipped (and why), or the step and checkpoint it reached."""
    return f"stage {r['stage']}: " + (r.get("skipped") or f"step {r['step']}, checkpoint {r['checkpoint']}")
