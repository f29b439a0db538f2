"""`run_stats`: the whole `t2i-data stats` job, called by the CLI (and usable from Python)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from shards.checks import SEED, Range, check_output_dir, check_ranges
from shards.errors import UserError

from dataset_stats.metrics import DatasetCounts, NounAccumulator, size_matched
from dataset_stats.nouns import DEFAULT_BATCH_TOKENS, NounConfig, TaggerPool, default_workers, model_name
from dataset_stats.readers import CaptionSource, iter_caption_batches, validate
from dataset_stats.sources import resolve_source

ENGINES = ("local", "ray")


@dataclass
class StatsOptions:
    """Every knob of the stats job (CLI flags map 1:1)."""

    column: Optional[str] = None
    pos: str = "noun+propn"
    lemma: bool = False
    tokens: str = "letters"  # which noun-tagged tokens count: letters (the paper's 6.4) | alpha | all
    valid_min: int = 10  # VN: distinct nouns seen more than this many times
    sample_size: Optional[int] = None  # size-matched comparison; default: the smallest dataset
    repeats: int = 5
    seed: int = 0
    top: int = 20
    workers: Optional[int] = None  # default: one per core
    batch_tokens: int = DEFAULT_BATCH_TOKENS  # spaCy tokens per tagging batch (bounds worker memory)
    lang: Optional[str] = None  # "en": analyse only captions not identified as another language
    skip_bad_lines: bool = False  # count and skip malformed lines instead of failing
    chunk_size: int = 512  # captions per task sent to a worker (small: even load at the end)
    engine: str = "local"
    ray_address: Optional[str] = None
    progress: bool = True
    out: Optional[Path] = None  # write report.md, report.json and the PNG plots here
    json_out: bool = False  # print the report as JSON instead of the table

    def validate(self) -> None:
        """A one-line UserError for an unknown engine, a number out of range or an --out that
        cannot be written: before any caption is read or tagged (hours at scale), not after."""
        if self.engine not in ENGINES:
            raise UserError(f"unknown --engine {self.engine!r}: use local or ray")
        if self.valid_min < 0 or self.repeats < 1 or (self.sample_size is not None and self.sample_size < 1):
            raise UserError("--valid-min must be >= 0, --repeats >= 1 and --sample-size >= 1: fix the flag")
        check_ranges(self, STATS_RANGES)
        if self.out is not None:
            check_output_dir(self.out)


STATS_RANGES = {"valid_min": Range(0, 10**9), "sample_size": Range(1, 10**10), "repeats": Range(1, 10_000), "seed": SEED,
                "top": Range(0, 100_000), "workers": Range(1, 1024), "batch_tokens": Range(1, 10**7),
                "chunk_size": Range(1, 10**6)}


def stats_command(datasets: list[str], options: StatsOptions, note: Callable[[str], None] = print) -> str:
    """`t2i-data stats`: the report, written to `options.out` when set (`note` says where), then
    what the command prints: the JSON, or the table with the paper's Table 1."""
    from dataset_stats.report import table_text, to_json, write_outputs

    report = run_stats(datasets, options)
    if options.out is not None:
        written = write_outputs(report, options.out)
        note(f"wrote {', '.join(p.name for p in written)} to {options.out}")
    return to_json(report) if options.json_out else table_text(report)


def run_stats(
    datasets: list[str],
    options: StatsOptions = StatsOptions(),
    on_counts: Optional[Callable[[str, dict[str, int]], None]] = None,
) -> dict[str, Any]:
    """Count nouns in each dataset and build the report (a JSON-ready dict). `on_counts`, if
    given, receives each dataset's name and full noun -> count mapping (benchmarks, checks)."""
    if not datasets:
        raise UserError("no dataset given: pass at least one path, e.g. `t2i-data stats laion.parquet`")
    options.validate()
    if options.engine == "ray":
        from shards.ray_session import import_ray

        import_ray()  # the install hint before any work
    config = NounConfig(pos=options.pos, lemma=options.lemma, tokens=options.tokens, batch_tokens=options.batch_tokens, lang=options.lang)
    sources = [resolve_source(d, options.column, options.skip_bad_lines) for d in datasets]
    _dedupe_names(sources)
    for s in sources:  # every input opened and checked before any tagging
        validate(s)
    model = model_name()  # fail before any work if no model is installed
    workers = options.workers or default_workers()

    counted: list[DatasetCounts] = []
    try:
        for source in sources:
            counted.append(_count(source, config, workers, options))
            if on_counts is not None:
                c = counted[-1]
                on_counts(source.name, {w: int(n) for w, n in zip(c.words, c.counts) if n})
        return _build_report(sources, counted, config, model, workers, options)
    finally:
        for c in counted:
            c.close()


def _dedupe_names(sources: list[CaptionSource]) -> None:
    seen: dict[str, int] = {}
    for s in sources:
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}#{seen[s.name]}"
        else:
            seen[s.name] = 1


def _count(source: CaptionSource, config: NounConfig, workers: int, options: StatsOptions) -> DatasetCounts:
    acc = NounAccumulator()
    try:
        if options.engine == "ray":
            from dataset_stats.engine_ray import count_with_ray  # ray only imported here

            with _progress(source, options.progress) as advance:
                count_with_ray(source, config, acc, workers, options.chunk_size, options.ray_address, advance)
        else:
            # the pool forks before the progress bar starts its thread
            with TaggerPool(config, workers) as tagger, _progress(source, options.progress) as advance:
                for result in tagger.map(_chunks(source, acc, options.chunk_size)):
                    acc.add_result(result.nouns, result.lengths, result.words)
                    acc.add_flags(result.foreign, result.kept, result.split)
                    advance(acc)
        counts = acc.finish()
    except BaseException:
        acc.store.close()
        raise
    counts.extra = dict(source.extra)
    if counts.rows == 0:
        counts.close()
        raise UserError(f"dataset {source.name!r} is empty (0 captions in {len(source.files)} file(s)): point it at files with captions")
    if counts.captions == 0 and counts.dropped:
        counts.close()
        raise UserError(f"dataset {source.name!r}: all {counts.dropped} non-empty captions are identified as not English: drop --lang en")
    if counts.captions == 0:
        counts.close()
        raise UserError(
            f"dataset {source.name!r} has {counts.rows} rows but every caption is null or empty: "
            f"check --column (now {source.column or 'auto-detected'})"
        )
    return counts


def _chunks(source: CaptionSource, acc: NounAccumulator, chunk_size: int) -> Iterator[list[str]]:
    """Non-empty captions in chunks of `chunk_size`; nulls and empties are counted on the way."""
    pending: list[str] = []
    for batch in iter_caption_batches(source, batch_rows=chunk_size):
        pending.extend(acc.add_raw(batch))
        while len(pending) >= chunk_size:
            yield pending[:chunk_size]
            pending = pending[chunk_size:]
    if pending:
        yield pending


class _progress:
    """A rich progress bar with captions/s on stderr; `advance(acc)` updates it."""

    def __init__(self, source: CaptionSource, enabled: bool) -> None:
        self.source, self.enabled = source, enabled

    def __enter__(self):
        if not self.enabled:
            return lambda acc: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} captions/s"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar.start()
        task = self.bar.add_task(self.source.name, total=self.source.known_rows(), rate="-")

        def advance(acc: NounAccumulator) -> None:
            self.bar.update(task, completed=acc.rows)
            speed = self.bar.tasks[task].speed
            self.bar.update(task, rate=f"{speed:,.0f}" if speed else "-")

        return advance

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()


def _build_report(
    sources: list[CaptionSource],
    counted: list[DatasetCounts],
    config: NounConfig,
    model: str,
    workers: int,
    options: StatsOptions,
) -> dict[str, Any]:
    from shards.models.language import DESCRIPTION as LANGUAGE_ID
    from dataset_stats.nouns import PIECE_CHARS
    from dataset_stats.report import PAPER_TABLE1

    sample = options.sample_size
    if sample is None and len(counted) > 1:
        sample = min(c.captions for c in counted)
    datasets = []
    for source, c in zip(sources, counted):
        entry = {"name": source.name, "files": [str(f) for f in source.files], "column": source.column or source.extra.get("column")}
        entry.update(c.summary(valid_min=options.valid_min, top=options.top))
        entry["rank_frequency"] = _rank_frequency(c)
        if sample:
            entry["size_matched"] = size_matched(c, sample, options.repeats, options.seed, options.valid_min)
        datasets.append(entry)
    return {
        "definition": {
            "noun": config.describe(),
            "pos": config.pos,
            "lemma": config.lemma,
            "tokens": config.tokens,
            "lang": config.lang,
            "language_id": LANGUAGE_ID,
            "batch_tokens": config.batch_tokens,
            "long_captions": f"captions longer than {PIECE_CHARS:,} characters are tagged in pieces (split_captions)",
            "valid_noun": f"distinct noun occurring more than {options.valid_min} times",
            "valid_min": options.valid_min,
            "words": "whitespace-separated words",
            "per_caption": "averages over non-empty captions; null and empty captions are counted, not analysed",
            "model": model,
        },
        "engine": options.engine,
        "workers": workers,
        "sample_size": sample,
        "datasets": datasets,
        "paper_table1": PAPER_TABLE1,
    }


def _rank_frequency(c: DatasetCounts, points: int = 200) -> list[list[int]]:
    """(rank, count) at ~`points` log-spaced ranks: enough for the long-tail plot, small in JSON."""
    import numpy as np

    freq = np.sort(c.counts[c.counts > 0])[::-1]
    if len(freq) == 0:
        return []
    ranks = np.unique(np.geomspace(1, len(freq), num=min(points, len(freq))).astype(np.int64))
    return [[int(r), int(freq[r - 1])] for r in ranks]
