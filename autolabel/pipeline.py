"""The caption loop: prefetching workers -> batches -> captioner -> shards, resumable.

The run is the job skeleton's (shards.job: lock, settings checked and recorded, a crash's
leftovers deleted, done keys skipped, writer, ledger, manifest); this module supplies the
per-batch function both engines call (`caption_batch`) and the local engine's loop. Rows only
become visible when their shard is committed, so `kill -9` at any moment loses at most the
unfinished shard, which the rerun redoes.

`retry_failed` (exactly one row per key): rows whose `error` is set are captioned again and
held until the pass ends, then written into their shards by shards.retry (each shard rewritten
in place, so no reader ever sees a key twice).

`out_dir` may be a local path or an object-store / fsspec URI (shards.fs).
"""

from __future__ import annotations

import functools
from contextlib import closing
from typing import Any, Iterable, Iterator, Mapping

import pyarrow as pa

from shards.errors import UserError
from shards.job import JobSpec, Run, Summary
from shards.prefetch import prefetch
from shards.reader import done_keys
from shards.retry import replace_rows
from autolabel.backends import Captioner, GenParams
from autolabel.config import CaptionConfig, PrepareOptions
from autolabel.hygiene import clean_caption, is_degenerate
from autolabel.prepare import prepare_for_model
from shards.images import ImageError
from shards.images.fit import Prepared
from autolabel.prompts import question_for
from autolabel.sizing import SizePolicy
from shards.images.sources import TRUNCATED, ImageItem


def caption_line(s: Mapping[str, Any]) -> str:
    """The caption summary's line: captioned, failed, skipped (already done), retried, rate."""
    rate = s["captioned"] / s["seconds"] if s.get("seconds") else 0.0
    line = f"captioned {s['captioned']}, failed {s['failed']}, skipped as already done {s['skipped']}"
    if s["retried"]:
        line += f", retried {s['retried']}"
    return line + f" ({rate:.2f} images/s)"


def caption_spec(cfg: CaptionConfig, model: str, backend: str) -> JobSpec:
    """The caption job for the run skeleton (shards.job): its settings (`model` and `backend`:
    those that run), identity, shard size and summary."""
    return JobSpec("caption", cfg.out, settings=cfg.recorded(model, backend), identity=CaptionConfig.IDENTITY,
                   rows_per_shard=cfg.shard_size, summary=dict(captioned=0, failed=0, skipped=0, retried=0),
                   describe=caption_line, models=("model",))  # fmt: skip


def _prepare(item: ImageItem, opts: PrepareOptions) -> tuple[ImageItem, Prepared | None, str | None, bytes | None]:
    """Runs in a worker thread (PIL decoding and resizing release the GIL)."""
    if item.error:
        return item, None, item.error, None
    try:
        data = item.read_bytes()  # plain files by address (a path or a URI: shards.fs)
    except (OSError, pa.ArrowException, UserError) as e:
        return item, None, f"unreadable file: {e}", None
    try:
        return item, prepare_for_model(data, opts.policy, opts.max_short, opts.max_long, opts.max_pixels), None, data
    except ImageError as e:
        return item, None, str(e), data


class _Pulled:
    """The requests an engine has pulled so far from a (possibly lazy) stream; after a failure,
    `everything()` pulls the rest, so the batch can be retried image by image."""

    def __init__(self, requests: Iterable[tuple]) -> None:
        self.source, self.seen, self.source_failed = iter(requests), [], False

    def __iter__(self) -> "_Pulled":
        return self

    def __next__(self) -> tuple:
        try:
            request = next(self.source)
        except StopIteration:
            raise
        except BaseException:
            self.source_failed = True  # the input broke, not an image: nothing to isolate
            raise
        self.seen.append(request)
        return request

    def everything(self) -> list[tuple]:
        self.seen.extend(self.source)
        return self.seen


def _generate(captioner: Captioner, requests: Iterable[tuple], params: GenParams) -> list:
    """One call for all `requests` ((image, prompt) pairs): streamed into engines that take a
    lazy stream (VllmCaptioner.generate_streamed), collected into lists for the others."""
    streamed = getattr(captioner, "generate_streamed", None)
    if streamed is not None:
        return streamed(requests, params)
    pairs = list(requests)
    if not pairs:
        return []
    return captioner.generate([im for im, _ in pairs], [text for _, text in pairs], params)


def generate_or_isolate(captioner: Captioner, requests: Iterable[tuple], params: GenParams) -> list:
    """Captions for a batch of (image, prompt) requests (both engines; `requests` may be lazy).
    If the batch fails, image by image, so one bad image becomes an error row (the exception in
    its place) instead of crashing every rerun at the same place. If every image fails alone
    too, the problem is not the images: raise."""
    pulled = _Pulled(requests)
    try:
        return _generate(captioner, pulled, params)
    except Exception as batch_error:
        if pulled.source_failed:
            raise
        pairs = pulled.everything()
        if len(pairs) == 1:
            raise
        results: list = []
        for image, text in pairs:
            try:
                results.append(captioner.generate([image], [text], params)[0])
            except Exception as e:  # noqa: BLE001 - recorded in the row
                results.append(e)
        if all(isinstance(r, Exception) for r in results):
            raise batch_error
        return results


class RunRecorder:
    """Where one caption run's rows go, for both engines (local and Ray), on the skeleton's Run.

    At start, the keys already done are skipped, except (with `retry_failed`) the failed ones,
    which are captioned again. During the run: `emit` each row (retried keys are held back and
    written into their old shards at the end). `finish` commits, swaps, and returns the summary.
    """

    def __init__(self, run: Run, retry_failed: bool) -> None:
        self.run, self.summary = run, run.summary
        self.to_retry = run.done - done_keys(run.out, where_ok=True) if retry_failed else frozenset()
        self.skip_keys = run.done - self.to_retry
        self.retried_rows: dict[str, dict | None] = {}
        self.seen: set[str] = set()
        run.restart_clock()  # the rate counts from here: the model is loaded

    def first_sight(self, key: str) -> bool:
        """False for a key seen before in this run's input (the first one is kept)."""
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def emit(self, row: dict) -> None:
        if row["key"] in self.to_retry:
            self.retried_rows[row["key"]] = row
            self.summary.retried += 1
        else:
            self.run.write([row])
        if row["error"] is None:
            self.summary.captioned += 1
        else:
            self.summary.failed += 1

    def rate(self) -> str:
        done = self.summary.captioned + self.summary.failed
        return f"{done / max(self.run.seconds(), 1e-9):.2f}"

    def finish(self) -> Summary:
        s = self.summary
        self.run.writer.flush()
        for key in self.to_retry - self.retried_rows.keys():
            if key.endswith(TRUNCATED):  # the tar reads to its end now: its "ended early" row goes
                self.retried_rows[key] = None
        replace_rows(self.run.out, self.retried_rows)
        return self.run.finish(images=s.captioned + s.failed)


def base_row(captioner: Captioner, params: GenParams, image: bytes | None, **fields) -> dict:
    """A caption row's fields that do not depend on the caption (both engines): `fields` are the
    item's key, source, member, address, image_id, width, height, alt_text."""
    return dict(fields, model=captioner.model_name, prompt=None, backend=captioner.name, temperature=params.temperature,
                max_new_tokens=params.max_new_tokens, seed=params.seed, image=image, error=None)


def caption_batch(captioner: Captioner, cfg: CaptionConfig, entries: Iterable[tuple[dict, Any]]) -> list[dict]:
    """Caption one batch of (row, prepared image) `entries` (both engines): the prompt for each
    row's alt-text (and each of `cfg.extra_prompts()`), one generate call for all of them (image
    by image if it fails), and the caption fields (or the error) filled into the rows in place;
    returns the rows. `entries` may be lazy: the local engine hands each image over as its
    worker finishes it, and the vLLM engine starts on it while the next ones are prepared."""
    rows: list[dict] = []
    images: list = []
    questions: list[str] = []
    extra = cfg.extra_prompts()
    rendered: dict[str, str] = {}  # a chat template renders in ~0.1 ms: once per question, not per image

    def render(question: str) -> str:
        if question not in rendered:
            rendered[question] = captioner.format_prompt(question)
        return rendered[question]

    def requests() -> Iterator[tuple]:
        for row, image in entries:
            rows.append(row)
            images.append(image)
            questions.append(question_for(cfg.first_prompt(), row["alt_text"], cfg.use_alt))
            yield image, render(questions[-1])
        # every prompt of every image in one call, in today's order (all first prompts, then
        # each extra prompt for every image): the engine batches them together
        for _, eq in extra:
            yield from ((image, render(eq)) for image in images)

    gens = generate_or_isolate(captioner, requests(), cfg.gen_params())
    n = len(rows)
    for i, (row, q, g) in enumerate(zip(rows, questions, gens)):
        row["prompt"] = q
        extras = {name: (eq, gens[n * (k + 1) + i]) for k, (name, eq) in enumerate(extra)}
        failed = next((x for x in (g, *(x for _, x in extras.values())) if isinstance(x, Exception)), None)
        if failed is not None:
            row["error"] = f"captioning failed: {type(failed).__name__}: {failed}"
            continue
        caption = clean_caption(g.text, q)
        # image_tokens: None from a captioner that does not count them (its own Generation-like objects)
        row.update(caption=caption, num_tokens=g.num_tokens, image_tokens=getattr(g, "image_tokens", None), finish_reason=g.finish_reason,
                   truncated=g.finish_reason == "length", degenerate=is_degenerate(caption), error=None,
                   **{f"caption_{name}": clean_caption(x.text, eq) for name, (eq, x) in extras.items()})  # fmt: skip
    return rows


def caption_items(items: Iterable[ImageItem], captioner: Captioner, run: Run, cfg: CaptionConfig, policy: SizePolicy,
                  total: int | None = None) -> Summary:
    """Caption every not-yet-done item into `run`'s shards with `cfg`'s settings (images
    prepared at `policy`'s size: autolabel.sizing). See the module docstring."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    rec = RunRecorder(run, cfg.retry_failed)
    params = cfg.gen_params()

    def todo() -> Iterator[ImageItem]:
        for item in items:
            if not rec.first_sight(item.key):
                continue  # the same key twice in the input: keep the first
            if item.key in rec.skip_keys:
                rec.summary.skipped += 1
                bar.advance(task)
                continue
            yield item

    def row_of(item: ImageItem, prep: Prepared | None, data: bytes | None) -> dict:
        return base_row(captioner, params, data if cfg.embed_images else None, key=item.key, source=item.source,
                        member=item.member, address=item.address, image_id=item.image_id,
                        width=item.width or (prep.width if prep else None), height=item.height or (prep.height if prep else None),
                        alt_text=item.alt)  # fmt: skip

    def emit(row: dict) -> None:
        rec.emit(row)
        bar.update(task, advance=1, rate=rec.rate())

    def next_batch(ready: Iterator[tuple]) -> Iterator[tuple[dict, Any]]:
        """The next `batch_size` prepared images, each handed over as soon as its worker is done
        (so the engine starts on the first instead of waiting for the whole batch); an image that
        could not be prepared becomes its error row at once. Pulls nothing past the batch."""
        taken = 0
        while taken < cfg.batch_size:
            got = next(ready, None)
            if got is None:
                return
            item, prep, error, data = got
            if error is not None:
                emit(dict(row_of(item, None, data), error=error))
                continue
            taken += 1
            yield row_of(item, prep, data), prep.image

    columns = [TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} img/s"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, disable=not cfg.progress, transient=False) as bar:
        task = bar.add_task("caption", total=total, rate="0.00")
        prepare = functools.partial(_prepare, opts=cfg.prepare_options(policy))
        with closing(prefetch(prepare, todo(), cfg.prepare_workers(), cfg.prefetch_depth(), "prepare")) as ready:
            while rows := caption_batch(captioner, cfg, next_batch(ready)):  # empty: the input is done
                for row in rows:
                    emit(row)
    return rec.finish()
