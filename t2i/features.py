"""The features job: encode every captioned image once (VAE posterior mean + std, T5 features + mask).

    run_features("out/", "feats/", FeatureConfig(vae=..., engine="local"))   # the engine from the config

    caption shards -> rows (this rank's keys, not yet done) -> decode workers (threads: read by
    address + the shared decode policy + resize/crop) -> batches of one size -> VAE + T5 (bf16 on
    GPU, fp32 on CPU) -> feature shards in `<root>/<cache key>/`

The run is the job skeleton's (shards.job: lock, settings checked and recorded, clean-up, done
keys, writer, ledger, manifest); the per-batch function is t2i.feature_encoder.encode_rows, the
rows' pixels come from t2i.feature_images, their sizes from t2i.geometry, the ranks from t2i.ranks.

- Images are read through the image layer (shards.images): by the absolute `address` each
  caption row records (tar members by offset, Parquet rows by row group), decoded under the same
  policy as `caption` (EXIF orientation, RGB, bomb guard, JPEG draft decode). Caption shards
  written before addresses existed (schema 1) are read by (source, member).
- The cache key hashes everything that changes the features (VAE, text encoder, resolution,
  buckets, token count, dtypes, draft decode: FeatureConfig.IDENTITY), so a different setting
  never reuses stale features, and a rerun skips keys already encoded (resume; `kill -9` loses at
  most the rows not yet in a complete shard). A model given as a local folder enters the key by
  its path; `config.json` also records the folder's content digest (shards.hub.local_model_digest),
  so a folder refitted in place is refused, by this job and by training, instead of mixing weights.
- Data-parallel: under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) each rank reads only
  its share of the caption shards' row groups (round robin over all row groups in shard name
  order: no rank reads another's rows or image bytes) and writes its own shards
  (`features-r<rank>-...`); rank 0 cleans up before and writes the manifest after (then the
  loader's index cache, `index.npz`, t2i.feature_index), the summary's counts are summed over the
  ranks (gloo). Any world size resumes any other's directory (done keys are skipped, whoever
  wrote them). `engine = "ray"`: t2i.features_ray.
- An image that cannot be read or decoded is recorded (key + error) in `failures-<writer>.json`
  and in the manifest's `failures`, skipped (not retried by reruns), and counted in the summary.
- Several caption fields (`caption_fields`, t2i.caption_fields; default `caption` alone): T5
  features of each field an image has, each in its own columns; a field an image lacks is
  skipped for that image (counted per field in the summary's `missing_fields`).
- Latents are stored in `latent_dtype` (float32 | float16 | bfloat16, column `latent_dtype`;
  shards without the column hold float32), text features in `text_dtype` (int8 | fp8: one byte
  a value and a float32 scale per token, in `text_scale`; t2i.text_codec).
- With a `teacher` (REPA's, t2i.teacher: a ViT-family vision model by HF id or directory), its
  patch tokens of the same clean image the VAE encodes, in `teacher_dtype`: columns `teacher_emb`
  (rows x columns x channels values, row-major over the patch grid), `teacher_shape` and
  `teacher_dtype` (t2i.repa trains on them; training never runs the teacher). The teacher and
  its dtype join the cache key: features made with a teacher never mix with ones made without.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pyarrow as pa

from shards import ShardError, UserError, done_keys
from shards import fs as shard_fs
from shards.checks import WORKERS, check_output_dir
from shards.job import JobSpec, Run, Summary, job_run
from shards.reader import Shard, complete_shards, iter_rows, open_shards
from t2i.caption_fields import DEFAULT_FIELDS, parse_fields, text_columns
from t2i.feature_config import FEATURE_VERSION, FeatureConfig, FeaturesRun, check_model_digests
from t2i.feature_encoder import FeatureEncoder, encode_rows
from t2i.feature_images import RowImages
from t2i.feature_index import open_index
from t2i.ranks import Ranks, default_device, ranks_from_env, set_threads
from t2i.text_codec import is_compact


FEATURE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("height", pa.int32()),  # pixel size the image was resized/cropped to (its bucket)
        pa.field("width", pa.int32()),
        pa.field("latent_shape", pa.list_(pa.int32())),  # (C, h, w)
        pa.field("latent_mean", pa.binary()),  # raw posterior (not yet scaled), in `latent_dtype`
        pa.field("latent_std", pa.binary()),  # in `latent_dtype`
        pa.field("text_emb", pa.binary()),  # (text_len, text_channels) in `text_dtype`
        pa.field("text_len", pa.int32()),  # tokens kept by the attention mask (incl. </s>)
        pa.field("text_channels", pa.int32()),
        pa.field("text_dtype", pa.string()),
        pa.field("latent_dtype", pa.string()),  # float32 | float16 | bfloat16; null/absent: float32
    ],
    metadata={b"t2i_data.schema": b"features", b"t2i_data.schema_version": str(FEATURE_VERSION).encode()},
)


# a teacher's patch tokens (REPA, t2i.repa), with features --teacher
TEACHER_COLUMNS = [
    pa.field("teacher_emb", pa.binary()),  # (rows x columns, channels) patch tokens, row-major, in `teacher_dtype`
    pa.field("teacher_shape", pa.list_(pa.int32())),  # (rows, columns, channels) of the teacher's patch grid
    pa.field("teacher_dtype", pa.string()),
]


def feature_schema(fields: tuple[str, ...], teacher: bool = False, compact: bool = False) -> pa.Schema:
    """FEATURE_SCHEMA for the default `caption` field; with other caption fields, the text
    columns of each (t2i.caption_fields.text_columns) in place of caption/text_emb/text_len;
    with a `teacher`, its columns (TEACHER_COLUMNS) at the end; with `compact` text features
    (text_dtype int8 or fp8, t2i.text_codec), each field's per-token scales last."""
    schema = FEATURE_SCHEMA
    if tuple(fields) != DEFAULT_FIELDS:
        base = [f for f in FEATURE_SCHEMA if f.name not in ("caption", "text_emb", "text_len")]
        per_field = [pa.field(name, kind) for c in map(text_columns, fields)
                     for name, kind in ((c.text, pa.string()), (c.emb, pa.binary()), (c.len, pa.int32()))]  # fmt: skip
        schema = pa.schema(base[:1] + per_field + base[1:], metadata=FEATURE_SCHEMA.metadata)
    scales = [pa.field(text_columns(f).scale, pa.binary()) for f in fields] if compact else []  # (text_len,) float32
    return pa.schema(list(schema) + (TEACHER_COLUMNS if teacher else []) + scales, metadata=schema.metadata)


def features_dir(root: str | Path, cfg: FeatureConfig) -> Path:
    """Where features of `cfg`'s settings live under the features root `root`."""
    return Path(root) / cfg.cache_key()


def run_features(shards_dir: str | Path, root: str | Path, cfg: FeatureConfig, progress: bool = True) -> Summary | None:
    """The features job on the engine `cfg.engine` names: "local" (this process; under torchrun
    or accelerate launch, this rank's share) or "ray" (t2i.features_ray). Returns the summary on
    the process that reports it, None on the other ranks."""
    cfg.validate()
    cfg.check_models()
    if cfg.engine == "ray":
        from t2i.features_ray import compute_features_ray  # Ray is imported only here

        return compute_features_ray(shards_dir, root, cfg, progress=progress)
    ranks = ranks_from_env()
    try:
        summary = compute_features(shards_dir, root, cfg, progress=progress, ranks=ranks)
    finally:
        ranks.close()
    return summary if ranks.rank == 0 else None


def features_command(run: FeaturesRun) -> str | None:
    """`t2i-data features`: the job on `run.threads` torch threads; returns its summary line on
    the reporting process (rank 0 of a torchrun / accelerate launch), None on the others."""
    run.config.validate()
    WORKERS.check("threads", run.threads)
    check_output_dir(run.out)  # under a file, read-only: one line before any model loads
    set_threads(run.threads)
    summary = run_features(run.shards, run.out, run.config)
    return summary.line() if summary is not None else None


def features_line(r: Mapping[str, Any]) -> str:
    """The features summary's line (also of a train stage's features step)."""
    missing = "".join(f", {n} without {f} (that field skipped)" for f, n in r.get("missing_fields", {}).items())
    return (f"{r['rows']} samples in {r['dir']} ({r['new']} new here, {r['skipped_invalid']} rows without caption{missing}, "
            f"{r['failed']} unreadable images skipped, listed in {r['dir']}/manifest.json)")


def feature_spec(cfg: FeatureConfig, out: Path, device: str | None = None, prefix: str | None = None) -> JobSpec:
    """The features job for the run skeleton; with `prefix`, this process writes feature shards
    (its own: each rank's prefix differs), without, its encoders do (Ray actors)."""
    return JobSpec("features", out, settings={**asdict(cfg), "cache_key": cfg.cache_key()}, identity=cfg.identity(),
                   schema=feature_schema(cfg.caption_fields, bool(cfg.teacher), is_compact(cfg.text_dtype)) if prefix else None, rows_per_shard=cfg.rows_per_shard,
                   prefix=prefix or "features", device=device, describe=features_line,
                   summary={"dir": str(out), "new": 0, "skipped_invalid": 0, "failed": 0, "failures": [], "valid": 0,
                            "missing_fields": {}})  # fmt: skip


# ---- the caption shards ------------------------------------------------------------------------

CAPTION_COLUMNS = ("key", "caption", "error", "image", "source", "member", "address")


def row_columns(fields: tuple[str, ...]) -> tuple[str, ...]:
    """The caption-shard columns features reads for `fields` (caption fields)."""
    return CAPTION_COLUMNS + tuple(f for f in fields if f not in CAPTION_COLUMNS)


def caption_shards(shards_dir: str | Path, fields: tuple[str, ...] = DEFAULT_FIELDS) -> list[Shard]:
    """Every complete caption shard (its footer read once), checked before any work; shards of
    caption schema 1 have no `address` (their rows are located by source + member). With other
    caption fields than the default, a field no shard holds a value of is an error."""
    shards = open_shards(shards_dir, "caption")  # a local path or a URI
    for shard in shards:
        if not {"caption", "key"} <= set(shard.columns):
            raise ShardError(f"{shard.location} has no caption/key column: pass caption shards written by `t2i-data caption`")
    if tuple(fields) != DEFAULT_FIELDS:
        for f, n in _values_written([s.location for s in shards], fields).items():
            if n == 0:
                raise UserError(f"caption field {f!r} has no value in any caption shard of {shards_dir}: caption with the "
                                f"prompt that writes it (`t2i-data caption --prompts ...`) or drop it from caption_fields")
    return shards


def _values_written(shards: list, fields: tuple[str, ...]) -> dict[str, int | None]:
    """Non-null values of each field over `shards`, from the Parquet footers' statistics alone
    (None: not known, a shard without statistics)."""
    counts: dict[str, int | None] = dict.fromkeys(fields, 0)
    for shard in shards:
        md = shard_fs.parquet_file(shard).metadata
        for g in range(md.num_row_groups):
            group = md.row_group(g)
            leaf = {group.column(j).path_in_schema: j for j in range(group.num_columns)}
            for f in fields:
                if counts[f] is None or f not in leaf:
                    continue
                st = group.column(leaf[f]).statistics
                counts[f] = None if st is None or not st.has_null_count else counts[f] + group.num_rows - st.null_count
    return counts


def usable(row: dict[str, Any], fields: tuple[str, ...] = DEFAULT_FIELDS) -> bool:
    """A caption row features encode: without an error, with text in at least one of `fields`."""
    return row["error"] is None and any(row.get(f) for f in fields)


def count_row(row: dict[str, Any], fields: tuple[str, ...], stats: dict[str, Any]) -> bool:
    """Tally one caption row into the summary (valid, skipped_invalid, and per caption field the
    usable rows without it: that field is skipped for that image); whether it is encoded."""
    if not usable(row, fields):
        stats["skipped_invalid"] += 1
        return False
    stats["valid"] += 1
    for f in fields:
        if not row.get(f):
            stats["missing_fields"][f] = stats["missing_fields"].get(f, 0) + 1
    return True


def read_failures(out: Path) -> dict[str, str]:
    """key -> error of every image recorded as unreadable in `out` (all ranks, all runs)."""
    failures: dict[str, str] = {}
    for p in sorted(out.glob("failures-*.json")):
        failures.update(json.loads(p.read_text()))
    return failures


# ---- the job -----------------------------------------------------------------------------------


def compute_features(
    shards_dir: str | Path, root: str | Path, cfg: FeatureConfig, device: str | None = None, progress: bool = True,
    ranks: Ranks | None = None,
) -> Summary:  # fmt: skip
    """Encode every valid caption row of `shards_dir` not yet in `root/<cache key>/` in this
    process; it takes `ranks`' share (default: all). See the module docstring.

    The summary has "dir", "rows" (total encoded), "new", "skipped_invalid", "failed" (images
    recorded as unreadable in the directory), "failures" (the first 20, "key: error"), "valid",
    "missing_fields" (caption field -> usable rows without it, that field skipped for them).
    """
    from rich.progress import Progress

    cfg.validate()
    ranks = ranks or Ranks()
    shards_dir = shard_fs.as_location(shards_dir)  # caption shards may be on an object store (s3://, gs://, ...)
    shards = caption_shards(shards_dir, cfg.caption_fields)  # bad shards or fields: before the output is touched
    out, device = features_dir(root, cfg), device or default_device(ranks)
    digests = unchanged_models(out, cfg)  # every rank: one that refused alone would leave the others waiting

    def start() -> None:  # every rank: the leader has locked, checked and cleaned
        if ranks.rank == 0:
            start_output(out, cfg, digests)
            _write_plan(out, shards)
        ranks.barrier()  # nobody reads what is done, or writes, before the leftovers of a crash are gone
        _check_plan(out, shards, shards_dir)  # every rank shares out the same row groups

    spec = feature_spec(cfg, out, device, prefix=f"features-r{ranks.rank:03d}")
    with job_run(spec, leader=ranks.rank == 0, sync=start) as run:  # rank 0 holds the lock for all ranks
        stats, images, share = run.summary, RowImages(cfg), ranks.share(shards)
        with Progress(disable=not progress or ranks.rank != 0) as bar:
            task = bar.add_task("features", total=sum(s.group_rows[g] for s, groups in share for g in groups))
            todo = _todo(share, cfg.caption_fields, run.done, read_failures(out), stats, lambda: bar.advance(task))
            stats.new += encode_rows(todo, images, FeatureEncoder(run.writer, cfg, device))
        images.close()
        _sum_counts(stats, cfg.caption_fields, ranks)  # each rank counted the rows it read; also waits for every rank
        return finish_output(run, cfg, shards_dir, write=ranks.rank == 0)


def _todo(share: list[tuple[Shard, list[int]]], fields: tuple[str, ...], done: frozenset[str], failed: dict[str, str],
          stats: dict, advance: Callable) -> Iterator[dict]:  # fmt: skip
    """The rows of this rank's row groups (Ranks.share) still to encode, counted into `stats`."""
    for r in iter_rows(share, row_columns(fields)):  # streamed: never all rows (and image bytes) in memory
        advance()
        if count_row(r, fields, stats) and r["key"] not in done and r["key"] not in failed:
            yield r


def _sum_counts(stats: dict[str, Any], fields: tuple[str, ...], ranks: Ranks) -> None:
    """The summary's row counts over all ranks (each read only its own row groups)."""
    names = ["valid", "skipped_invalid"]
    summed = ranks.total([stats[n] for n in names] + [stats["missing_fields"].get(f, 0) for f in fields])
    stats.update(zip(names, summed))
    stats["missing_fields"] = {f: n for f, n in zip(fields, summed[len(names):]) if n}


PLAN = "plan.json"


def _plan(shards: list[Shard]) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps([[str(s.location), list(s.group_rows)] for s in shards]).encode()).hexdigest()
    return {"shards": len(shards), "row_groups": sum(len(s.group_rows) for s in shards), "sha256": digest}


def _write_plan(out: Path, shards: list[Shard]) -> None:
    """What rank 0 shares out (Ranks.share): the caption shards and their row groups."""
    shard_fs.write_text(out / PLAN, json.dumps(_plan(shards)))


def _check_plan(out: Path, shards: list[Shard], shards_dir) -> None:
    """Every rank saw the caption shards rank 0 saw: otherwise the shares could overlap."""
    if json.loads((out / PLAN).read_text()) != _plan(shards):
        raise ShardError(f"the caption shards in {shards_dir} changed while features started (this rank sees other shards "
                         "than rank 0): rerun once the caption job has finished")


def unchanged_models(out: Path, cfg: FeatureConfig) -> dict[str, str]:
    """The digest of each local model folder of `cfg` (FeatureConfig.model_digests), after
    checking that features already committed in `out` were made with the same weights: a folder
    refitted in place keeps its path, so its features' key, and must not add rows of new weights."""
    digests, made = cfg.model_digests(), out / "config.json"
    if made.is_file() and complete_shards(out):
        check_model_digests(out, json.loads(made.read_text()), digests)
    return digests


def start_output(out: Path, cfg: FeatureConfig, digests: dict[str, str]) -> None:
    """Before any rank writes: the settings as the training loader reads them (`config.json`),
    with the model folders' digests (`unchanged_models`)."""
    record = {**asdict(cfg), "cache_key": cfg.cache_key(), "model_digests": digests}
    shard_fs.write_text(out / "config.json", json.dumps(record, indent=2))


def finish_output(run: Run, cfg: FeatureConfig, shards_dir, write: bool = True) -> Summary:
    """After every writer is done: the summary (rows, failures) and, when `write` (the one
    finishing process), the manifest and then the loader's index cache."""
    out, stats = run.out, run.summary
    if not stats["valid"]:
        raise ShardError(f"{shards_dir} has no rows with a caption (all null or errored): caption the images first")
    failures = read_failures(out)
    stats.update(failed=len(failures), failures=[f"{k}: {e}" for k, e in list(failures.items())[:20]], rows=len(done_keys(out)))
    extra = {"schema": "features", "schema_version": FEATURE_VERSION, "source": str(shards_dir), "failed": len(failures),
             "failures": [{"key": k, "error": e} for k, e in failures.items()]}  # fmt: skip
    summary = run.finish(extra=extra, manifest=write, images=stats["new"])
    if write and stats["rows"]:
        # the directory is complete now: build the index once here (a valid cache is only loaded),
        # not in the first training open, nor on each node of a run on per-node local disks
        open_index(out, [str(s) for s in complete_shards(out)], parse_fields(cfg.caption_fields))
    return summary
