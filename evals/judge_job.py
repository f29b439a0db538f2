"""`run_judge`: a VLM judges images against yes/no questions, into shards (the job skeleton of
shards.job: locked output, settings recorded, done keys skipped on a rerun, ledger, manifest).

Input: records, each {"image": path, "question": text, "prompt": the prompt the image was made
from (optional), "category": a label to group by (optional), "key": optional (default: a digest
of image and question)}; or a JSONL file of them (`--questions`). Each row written holds the
image path, prompt, question, category, the judgement ("yes" / "no"), the score (P("Yes"),
VQAScore: evals.vqa) and P("No"), the judge model and backend; an unreadable image is a row
with its `error`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa

from shards.checks import Range, check_output_dir, check_ranges, read_text_input
from shards.errors import UserError
from shards.job import JobSpec, Summary, job_run

BACKENDS = ("transformers", "vllm")
JUDGE_SCHEMA = pa.schema([
    ("key", pa.string()), ("image", pa.string()), ("prompt", pa.string()), ("question", pa.string()),
    ("category", pa.string()), ("answer", pa.string()), ("score", pa.float64()), ("p_no", pa.float64()),
    ("model", pa.string()), ("backend", pa.string()), ("error", pa.string()),
])  # fmt: skip


@dataclass
class JudgeConfig:
    """Settings of a judge run. `model`: the judge VLM (HF id or local directory, any family the
    caption job runs); `backend`: transformers | vllm (autolabel.backends)."""

    IDENTITY: ClassVar[tuple[str, ...]] = ("model",)

    out: str | Path = "judged"
    model: str = "llava-hf/llava-1.5-7b-hf"
    backend: str = "transformers"
    batch_size: int = 16
    shard_size: int = 10_000
    dtype: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"unknown --judge-backend {self.backend!r}: use transformers or vllm")
        check_ranges(self, {"batch_size": Range(1, 65536), "shard_size": Range(1, 10_000_000)})

    def recorded(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "progress"}


def record_key(record: Mapping[str, Any]) -> str:
    """A record's key: its own, else a digest of its image path and question."""
    if record.get("key"):
        return str(record["key"])
    return hashlib.sha256(f"{record['image']}\n{record['question']}".encode()).hexdigest()[:20]


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file (one object per line with at least image and question)."""
    text = read_text_input(path, "questions file", "pass --questions FILE, one JSON object per line")
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise UserError(f"{path} line {n} is not JSON: write one object per line with image and question") from None
        if not isinstance(rec, dict) or not rec.get("image") or not rec.get("question"):
            raise UserError(f"{path} line {n} lacks image or question: write {{\"image\": path, \"question\": text}}")
        records.append(rec)
    if not records:
        raise UserError(f"{path} holds no questions: write one JSON object per line with image and question")
    return records


def load_scorer(cfg: JudgeConfig):
    """The judge: cfg.model on cfg.backend, checked first (one line within 15 s when unreachable)."""
    from shards.hub import check_model

    from autolabel.backends import make_captioner
    from evals.vqa import VqaScorer

    check_model(cfg.model, "judge model", "--judge")
    kwargs = {"dtype": cfg.dtype} if cfg.dtype else {}
    return VqaScorer(make_captioner(cfg.backend, cfg.model, **kwargs))


def judge_line(s: Mapping[str, Any]) -> str:
    return (f"judged {s['judged']} (yes {s['yes']}), failed {s['failed']}, skipped as already done {s['skipped']}"
            f" ({s['judged'] / max(s.get('seconds') or 0, 1e-9):.2f} images/s)")  # fmt: skip


def run_judge(records: Sequence[Mapping[str, Any]], cfg: JudgeConfig, scorer=None) -> Summary:
    """Judge every record not yet in `cfg.out` (a rerun resumes); returns the Summary. `scorer`:
    an already loaded evals.vqa.VqaScorer (its model and backend are recorded)."""
    cfg.validate()
    check_output_dir(cfg.out)
    if scorer is None:
        scorer = load_scorer(cfg)
    settings = {**cfg.recorded(), "model": scorer.model_name, "backend": scorer.name}
    spec = JobSpec("judge", cfg.out, settings=settings, identity=JudgeConfig.IDENTITY, schema=JUDGE_SCHEMA,
                   rows_per_shard=cfg.shard_size, summary=dict(judged=0, yes=0, failed=0, skipped=0), describe=judge_line)
    with job_run(spec) as run:
        todo = []
        for rec in records:
            if record_key(rec) in run.done:
                run.summary.skipped += 1
            else:
                todo.append(rec)
        run.restart_clock()
        for batch in _batches(todo, cfg.batch_size):
            rows = judge_batch(scorer, batch)
            run.write(rows)
            for r in rows:
                run.summary.failed += r["error"] is not None
                run.summary.judged += r["error"] is None
                run.summary.yes += r["answer"] == "yes"
        return run.finish(images=run.summary.judged + run.summary.failed)


def _batches(items: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _open(path: str):
    from shards.images import ImageError, decode_image

    try:
        return decode_image(Path(path).read_bytes()).image, None
    except (OSError, ImageError) as e:
        return None, f"unreadable image: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def judge_batch(scorer, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The per-batch function: judge rows for `records` (one scorer call for the readable images)."""
    rows, images, questions, kept = [], [], [], []
    for rec in records:
        image, error = _open(str(rec["image"]))
        rows.append({"key": record_key(rec), "image": str(rec["image"]), "prompt": rec.get("prompt"), "question": rec["question"],
                     "category": rec.get("category"), "answer": None, "score": None, "p_no": None,
                     "model": scorer.model_name, "backend": scorer.name, "error": error})  # fmt: skip
        if image is not None:
            images.append(image)
            questions.append(rec["question"])
            kept.append(rec)
    by_record = getattr(scorer, "score_records", None)  # a scorer that needs more than the question (evals.detect)
    verdicts = iter(by_record(images, kept) if by_record else scorer.score(images, questions))
    for row in rows:
        if row["error"] is None:
            v = next(verdicts)
            row.update(answer=v.answer, score=v.p_yes, p_no=v.p_no)
    return rows


def read_judged(out: str | Path) -> list[dict[str, Any]]:
    """Every committed row of a judge output."""
    from shards.reader import iter_rows

    return list(iter_rows(out))


def judge_command(questions: str | Path, cfg: JudgeConfig) -> str:
    """`t2i-data judge`: judge a JSONL file of questions, then what it prints."""
    return run_judge(read_questions(questions), cfg).shards_line(cfg.out)
