"""The run skeleton every writing job shares: caption, score, select and features.

    spec = JobSpec("select", out, settings={"shards": s, "scores": c, "where": w}, identity=("shards", "scores", "where"),
                   schema=schema, summary={"written": 0}, describe=select_line)
    with job_run(spec) as run:          # locked, settings checked and recorded, leftovers cleaned
        for batch in batches:           # the job's engine: its input and its per-batch function
            run.write(per_batch(batch))
        return run.finish(rows=n)       # the last shard, the ledger, the manifest -> Summary

`job_run`, holding the output's lock (shards.lock), before the body:
  - checks the settings against the run record (`run.json`; directories of earlier versions:
    their manifest's config). A job declares its identity settings, those that shape its rows:
    while the output holds committed shards, a change of one is refused in one line. The other
    settings (batch size, workers, engine, ...) may change on resume;
  - writes the run record, before any shard;
  - finishes an interrupted retry swap and deletes a crash's leftovers;
  - reads the keys already done, starts the ledger and opens the ShardWriter.
`Run.finish`: the last shard, the ledger's record, the manifest, and the Summary.

Data-parallel jobs (features' ranks) open one run per process: the leader (rank 0) locks,
checks, records and cleans; `sync` (e.g. a barrier) runs on every process before it reads the
done keys; only the leader writes the manifest.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import pyarrow as pa

from shards import fs
from shards.errors import UserError
from shards.hub import local_model_digest
from shards.layout import RUN_RECORD
from shards.ledger import Ledger
from shards.lock import output_lock
from shards.reader import clean_incomplete, complete_shards, done_keys, read_manifest
from shards.retry import finish_interrupted_retry
from shards.schema import CAPTION_SCHEMA
from shards.writer import ROWS_PER_SHARD, ShardWriter, write_manifest

MODEL_DIGESTS = "model_digests"  # the run record's identity key for the local model folders' digests


class Summary(dict):
    """What one run of a job did, as named values: a dict (so it goes into manifests and
    summaries as is) whose values also read and write as attributes (`s.failed += 1`).
    `line()` is what the CLI prints, in the job's words (`describe`)."""

    def __init__(self, describe: Callable[[Mapping[str, Any]], str] | None = None, /, **values: Any) -> None:
        super().__init__(values)
        object.__setattr__(self, "_describe", describe)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self:
            raise AttributeError(name)
        return self[name]

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def line(self) -> str:
        """The job's report of this run (select: one line per condition, then the kept line)."""
        describe = getattr(self, "_describe", None)
        return describe(self) if describe else ", ".join(f"{k} {v}" for k, v in self.items() if isinstance(v, (int, float)))

    def shards_line(self, out: Any) -> str:
        """`line()` and the complete shards the output `out` holds (what caption and score print)."""
        return f"{self.line()}; {len(self.shards)} shards in {out}"


@dataclass
class JobSpec:
    """What a job hands the skeleton: its name, output, settings, and how it writes and reports.

    settings: every setting of the run (the manifest's `config`, and the run record's);
    identity: the settings a resume must keep (they shape the rows): their names in `settings`,
    or their values by name (e.g. paths resolved, so two spellings of one model are one);
    schema: the rows' schema (None: the job writes its shards itself, as features' encoders do);
    summary: the summary's values at start; describe: the summary's line;
    models: the identity settings that name models: a local model folder is also recorded by
    its contents' digest (shards.hub.local_model_digest), so a resume refuses a folder whose
    weights were changed in place (a refit into the same path)."""

    job: str
    out: fs.Location  # a local directory or an object-store / fsspec URI
    settings: dict[str, Any]
    identity: tuple[str, ...] | dict[str, Any]
    schema: pa.Schema | None = CAPTION_SCHEMA
    rows_per_shard: int = ROWS_PER_SHARD
    prefix: str = "part"
    device: str | None = None  # the ledger's (None: CUDA when there is one)
    summary: dict[str, Any] = field(default_factory=dict)
    describe: Callable[[Mapping[str, Any]], str] | None = None
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.identity, dict):
            self.identity = {name: self.settings.get(name) for name in self.identity}
        digests = {name: local_model_digest(str(self.identity[name])) for name in self.models if self.identity.get(name)}
        if digests := {name: d for name, d in digests.items() if d is not None}:
            self.identity[MODEL_DIGESTS] = digests


class Run:
    """One run of a job on its output, from `job_run` to `finish`: the keys already `done`, the
    `writer`, the `ledger` and the `summary` the job fills."""

    def __init__(self, spec: JobSpec, out: fs.Location) -> None:
        self.spec, self.out, self.settings = spec, out, dict(spec.settings)
        self.done = frozenset(done_keys(out))
        self.summary = Summary(spec.describe, **spec.summary)
        self.ledger = Ledger(out, spec.job, spec.device)
        self.writer = None if spec.schema is None else ShardWriter(out, spec.rows_per_shard, spec.schema, spec.prefix)
        self.t0 = time.perf_counter()

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        """Queue rows for the shards (a shard is committed every `rows_per_shard` rows)."""
        self.writer.add_many(rows)

    def seconds(self) -> float:
        """Seconds since the run started (or since `restart_clock`)."""
        return time.perf_counter() - self.t0

    def restart_clock(self) -> None:
        """Count the summary's seconds from now (a job that first loads its model)."""
        self.t0 = time.perf_counter()

    def finish(self, extra: dict[str, Any] | None = None, manifest: bool = True, **work: Any) -> Summary:
        """Commit the last shard, close the ledger (`work`: what the run did, e.g. images=N) and,
        with `manifest`, rewrite the manifest (`extra` added to it). Returns the summary, with
        `seconds`, `ledger` and `shards` (every complete shard's name) filled in."""
        if self.writer is not None:
            self.writer.flush()
        s = self.summary
        s.seconds = self.seconds()
        s.ledger = self.ledger.close(**work)
        if manifest:
            last = {k: v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            m = write_manifest(self.out, config=self.settings, extra={**(extra or {}), "last_run": {
                **last, "seconds": round(s.seconds, 3), "ledger": s.ledger}})  # fmt: skip
            s.shards = [x["shard"] for x in m["shards"]]
        else:
            s.shards = [fs.basename(p) for p in complete_shards(self.out)]
        return s


@contextlib.contextmanager
def job_run(spec: JobSpec, leader: bool = True, sync: Callable[[], None] | None = None) -> Iterator[Run]:
    """Run `spec`'s job on its output: the lock, the settings check and record, the clean-up
    (all by the `leader` only), then `sync` (every process), then the Run (see the module docstring)."""
    out = fs.as_location(spec.out)
    with output_lock(out, spec.job) if leader else contextlib.nullcontext():
        if leader:
            check_settings(out, spec)
            record_settings(out, spec)
            finish_interrupted_retry(out)
            clean_incomplete(out)
        if sync is not None:
            sync()
        yield Run(spec, out)


def check_settings(out: fs.Location, spec: JobSpec, committed: bool | None = None) -> None:
    """UserError (one line) when `out` holds committed output (default: complete shards; a job
    that writes something else says whether it has any) made by another job, or with other
    identity settings than `spec`'s (see the module docstring)."""
    if not (complete_shards(out) if committed is None else committed):
        return  # nothing committed: nothing to mix with
    record = _read_json(fs.join(out, RUN_RECORD))
    legacy = record is None  # written before run records: the manifest's config says what it can
    if not legacy and record.get("job") != spec.job:
        raise UserError(f"{out} holds the output of a {record.get('job')} run, not {spec.job}: pass another --out")
    before = read_manifest(out).get("config", {}) if legacy else record.get("identity", {})
    for name, value in spec.identity.items():
        if name == MODEL_DIGESTS:
            continue
        if legacy and name not in before:
            continue
        old, new = _plain(before.get(name)), _plain(spec.settings.get(name) if legacy else value)
        if old != new:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{out} holds {spec.job} output made with {flag} {_show(old)} (this run: {_show(new)}): "
                            f"pass the same {flag} to resume, or another --out")
    _check_model_digests(out, spec, before.get(MODEL_DIGESTS, {}))


def _check_model_digests(out: fs.Location, spec: JobSpec, before: Mapping[str, str]) -> None:
    """UserError (one line) when a local model folder named as before (the identity check ran
    first) holds other files now. Output recorded before digests were kept is not checked."""
    for name, digest in spec.identity.get(MODEL_DIGESTS, {}).items():
        if before.get(name) not in (None, digest):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{out} holds {spec.job} output made with {flag} {spec.identity[name]}, whose files have changed "
                            f"since (another model in the same folder): pass another --out, or put that model's files back")


def record_settings(out: fs.Location, spec: JobSpec) -> None:
    """Write the run record (`run.json`: the job, its identity settings, all its settings), before any shard."""
    record = {"job": spec.job, "identity": spec.identity, "settings": spec.settings,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    fs.write_text(fs.join(out, RUN_RECORD), json.dumps(record, indent=2, sort_keys=True, default=str))


def _read_json(path: fs.Location) -> dict | None:
    try:
        return json.loads(fs.read_text(path)) if fs.exists(path) else None
    except ValueError:  # damaged: as if absent
        return None


def _plain(value: Any) -> Any:
    """`value` as JSON holds it (tuples as lists, paths as strings), so records compare equal."""
    return json.loads(json.dumps(value, default=str))


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    if value is None or value == "":
        return "(none)"
    return repr(value) if isinstance(value, str) and " " in value else str(value)
