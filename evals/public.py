"""The public benchmarks' prompts as judge questions: GenEval, T2I-CompBench and DPG-Bench
(their vendored prompt files under evals/suites/, sources and licences in evals/suites/SOURCE.md).

Every suite becomes prompts of one form, `{"id", "prompt", "category", "questions": [[kind, question]],
"parents": [[question index]]}` (parents: DPG-Bench's dependencies; empty elsewhere), judged by the
VQA judge (evals.vqa) as yes/no questions:

- GenEval (`geneval`, 553 prompts in 6 tags): the questions come from each prompt's metadata, one
  per thing its detector-based protocol checks: object presence ("Is there a bench in the image?"),
  the exact count ("Are there exactly two clocks in the image?"), colour ("Is the fire hydrant
  blue?") and relative position ("Is the dog to the right of the teddy bear?"). A prompt is correct
  when every question is answered yes; a tag's score is its share of correct prompts, the overall
  score their mean (GenEval's reporting). The official protocol counts and locates with a Mask2Former
  detector and colours with CLIP on the crops; here the VLM judge answers instead (no detector).
- T2I-CompBench (`t2i-compbench`, 300 val prompts each of colour, shape, texture, 2D spatial,
  non-spatial, complex): one question per prompt, VQAScore's 'Does this image show "<prompt>"?';
  a category's score is its mean P(Yes) (VQAScore), not the official per-category metrics
  (BLIP-VQA, UniDet, CLIP, 3-in-1).
- DPG-Bench (`dpg`, 1065 dense prompts): its own questions from `dpg_bench.csv` (fetched once, see
  SOURCE.md), with their dependencies: a question whose parent is answered no scores 0; a prompt's
  score is the mean of its questions, the overall score the mean over prompts (DPG-Bench's own
  computation); categories are the questions' broad kinds (entity, attribute, relation, ...).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from shards.errors import UserError

SUITES_DIR = Path(__file__).resolve().parent / "suites"
PUBLIC = ("geneval", "t2i-compbench", "dpg")
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COMPBENCH_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
DPG_CSV_URL = ("https://raw.githubusercontent.com/TencentQQGYLab/ELLA/1cf31cea8230376ea51012b61352e61c402f64ed/"
               "dpg_bench/dpg_bench.csv")  # fmt: skip
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
DETECTED_KINDS = ("object", "count", "position")  # GenEval questions a --detector answers (evals.detect)
RELATION = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def _read(path: Path, what: str, fix: str) -> str:
    if not path.is_file():
        raise UserError(f"{what} {path} is missing: {fix}")
    return path.read_text(encoding="utf-8")


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _plural(prompt: str, entry: dict[str, Any]) -> str:
    """The class's plural as the prompt writes it after its number ('two sports balls')."""
    number = NUMBERS[entry["count"]] if entry["count"] < len(NUMBERS) else str(entry["count"])
    _, sep, rest = prompt.partition(f" {number} ")
    cls = entry["class"]
    if sep and rest.startswith(cls[:-1] if len(cls) > 2 else cls):
        return rest.split(" and ")[0].strip()
    return cls + "s"


def geneval_questions(meta: dict[str, Any]) -> list[list[str]]:
    """[kind, question] for what GenEval's protocol checks of one prompt (its metadata line)."""
    include, out = meta["include"], []
    for entry in include:
        cls, count = entry["class"], entry["count"]
        if count == 1:
            out.append(["object", f"Is there {_article(cls)} in the image?"])
        else:
            number = NUMBERS[count] if count < len(NUMBERS) else str(count)
            out.append(["count", f"Are there exactly {number} {_plural(meta['prompt'], entry)} in the image?"])
        if entry.get("color"):
            out.append(["color", f"Is the {cls} {entry['color']}?"])
        if entry.get("position"):
            rel, other = entry["position"]
            out.append(["position", f"Is the {cls} {RELATION.get(rel, rel)} the {include[other]['class']}?"])
    return out


def load_geneval(path: Path | None = None) -> list[dict[str, Any]]:
    path = Path(path) if path else SUITES_DIR / "geneval" / "evaluation_metadata.jsonl"
    text = _read(path, "GenEval's prompt file", "reinstall t2i-data (it ships evals/suites/) or pass --suite-file")
    prompts = []
    for n, line in enumerate(text.splitlines()):
        if line.strip():
            meta = json.loads(line)
            prompts.append({"id": f"geneval-{n:05d}", "prompt": meta["prompt"], "category": meta["tag"],
                            "questions": geneval_questions(meta), "parents": [],
                            "meta": {k: meta[k] for k in ("include", "exclude") if k in meta}})  # fmt: skip
    return prompts


def compbench_question(prompt: str) -> str:
    return f'Does this image show "{prompt.strip().rstrip(".")}"?'


def load_compbench(folder: Path | None = None) -> list[dict[str, Any]]:
    folder = Path(folder) if folder else SUITES_DIR / "t2i_compbench"
    prompts = []
    for cat in COMPBENCH_CATEGORIES:
        text = _read(folder / f"{cat}_val.txt", "T2I-CompBench's prompt file",
                     "reinstall t2i-data (it ships evals/suites/) or pass --suite-file FOLDER holding <category>_val.txt")  # fmt: skip
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        prompts += [{"id": f"compbench-{cat}-{i:03d}", "prompt": p, "category": cat,
                     "questions": [["prompt", compbench_question(p)]], "parents": []} for i, p in enumerate(lines)]  # fmt: skip
    return prompts


def dpg_fetch_hint(path: Path) -> str:
    return f"fetch DPG-Bench's questions once: curl -L -o {path} {DPG_CSV_URL} (or pass --suite-file dpg_bench.csv)"


def parse_dpg_csv(text: str, texts: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """DPG-Bench's question table (item_id, text, proposition_id, dependency, category_broad, tuple,
    question_natural_language, ...) as prompts; `texts`: item_id -> the vendored prompt text. Every
    row counts (the official script skips the table's first row, an off-by-one there)."""
    items: dict[str, dict[str, Any]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        item = items.setdefault(row["item_id"], {"text": row.get("text") or "", "q": {}})
        kind = (row.get("category_broad") or row["tuple"].split("(")[0].split("-")[0]).strip()
        deps = [int(d) for d in str(row["dependency"]).split(",") if d.strip() and int(d) != 0]
        item["q"][int(row["proposition_id"])] = (kind, row["question_natural_language"].strip(), deps)
    prompts = []
    for item_id, item in items.items():
        qids = sorted(item["q"])
        index = {q: i for i, q in enumerate(qids)}
        prompts.append({"id": f"dpg-{item_id}", "prompt": (texts or {}).get(item_id) or item["text"], "category": "dpg",
                        "questions": [list(item["q"][q][:2]) for q in qids],
                        "parents": [[index[d] for d in item["q"][q][2] if d in index] for q in qids]})  # fmt: skip
    return prompts


def dpg_texts() -> dict[str, str]:
    path = SUITES_DIR / "dpg" / "prompts.jsonl"
    rows = [json.loads(x) for x in _read(path, "DPG-Bench's prompt file", "reinstall t2i-data").splitlines() if x.strip()]
    return {r["item_id"]: r["text"] for r in rows}


def load_dpg(path: Path | None = None) -> list[dict[str, Any]]:
    path = Path(path) if path else SUITES_DIR / "dpg" / "dpg_bench.csv"
    if not path.is_file():
        raise UserError(f"DPG-Bench's question file {path} is missing: {dpg_fetch_hint(path)}")
    prompts = parse_dpg_csv(path.read_text(encoding="utf-8"), dpg_texts())
    if not prompts:
        raise UserError(f"{path} holds no DPG-Bench questions: {dpg_fetch_hint(path)}")
    return prompts


def check_files(suite: str, suite_file: str | Path | None = None) -> None:
    """A one-line UserError, before any work, when the suite's prompt or question file is missing."""
    if suite == "dpg":
        path = Path(suite_file) if suite_file else SUITES_DIR / "dpg" / "dpg_bench.csv"
        if not path.is_file():
            raise UserError(f"DPG-Bench's question file {path} is missing: {dpg_fetch_hint(path)}")
    elif suite == "geneval":
        _read(Path(suite_file) if suite_file else SUITES_DIR / "geneval" / "evaluation_metadata.jsonl", "GenEval's prompt file",
              "pass --suite-file evaluation_metadata.jsonl (GenEval's prompts/) or reinstall t2i-data")  # fmt: skip
    elif suite == "t2i-compbench":
        folder = Path(suite_file) if suite_file else SUITES_DIR / "t2i_compbench"
        for cat in COMPBENCH_CATEGORIES:
            _read(folder / f"{cat}_val.txt", "T2I-CompBench's prompt file", "pass --suite-file FOLDER holding <category>_val.txt")


def load_public(suite: str, suite_file: str | Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """The suite's prompts, the first `limit` of each category when given."""
    loader = {"geneval": load_geneval, "t2i-compbench": load_compbench, "dpg": load_dpg}[suite]
    prompts = loader(Path(suite_file) if suite_file else None)
    if limit is None:
        return prompts
    taken: dict[str, int] = {}
    out = []
    for p in prompts:
        if taken.get(p["category"], 0) < limit:
            taken[p["category"]] = taken.get(p["category"], 0) + 1
            out.append(p)
    return out


def public_records(prompts: list[dict], folder: Path, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One judge record per (prompt, question) whose kind is not in `skip`: category '<suite category>/<question kind>'."""
    return [{"key": f"{p['id']}-{i}", "image": str(folder / f"{p['id']}.png"), "prompt": p["prompt"], "question": q,
             "category": f"{p['category']}/{kind}"}
            for p in prompts for i, (kind, q) in enumerate(p["questions"]) if kind not in skip]  # fmt: skip


def detector_records(prompts: list[dict], folder: Path) -> list[dict[str, Any]]:
    """GenEval's presence, count and position questions for evals.detect (each with the prompt's metadata)."""
    return [{"key": f"{p['id']}-{i}", "image": str(folder / f"{p['id']}.png"), "prompt": p["prompt"], "question": q,
             "category": f"{p['category']}/{kind}", "detect": {"meta": p["meta"], "index": i}}
            for p in prompts for i, (kind, q) in enumerate(p["questions"]) if kind in DETECTED_KINDS]  # fmt: skip


def prompt_score(answers: list[bool], parents: list[list[int]]) -> float:
    """DPG-Bench's score of a prompt: the mean of its answers, a question whose parent is no counting 0."""
    kept = [yes and all(answers[p] for p in (parents[i] if i < len(parents) else [])) for i, yes in enumerate(answers)]
    return sum(kept) / len(kept) if kept else 0.0


def summarize_public(suite: str, prompts: list[dict], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per category: prompts correct (every question yes: "drawn"), the mean prompt score
    (dependencies applied), mean P(Yes); per question kind the yes-rate; and the suite's overall score."""
    by_key = {r["key"]: r for r in rows if r["error"] is None}
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    drawn, score, vqa, kinds = {}, {}, {}, {}
    for p in prompts:
        got = [by_key.get(f"{p['id']}-{i}") for i in range(len(p["questions"]))]
        if not got or any(r is None for r in got):
            continue
        answers = [r["answer"] == "yes" for r in got]
        for (kind, _), yes in zip(p["questions"], answers):
            kinds.setdefault(kind, []).append(yes)
        drawn.setdefault(p["category"], []).append(all(answers))
        score.setdefault(p["category"], []).append(prompt_score(answers, p.get("parents") or []))
        vqa.setdefault(p["category"], []).append(mean([r["score"] for r in got]))
    out = {"drawn": {k: mean(v) for k, v in drawn.items()}, "score": {k: mean(v) for k, v in score.items()},
           "vqascore": {k: mean(v) for k, v in vqa.items()}, "questions": {k: mean(v) for k, v in sorted(kinds.items())},
           "judged": sum(len(v) for v in kinds.values())}  # fmt: skip
    headline = {"geneval": out["drawn"], "t2i-compbench": out["vqascore"]}.get(suite)
    out["overall"] = mean(list(headline.values())) if headline is not None else mean([s for v in score.values() for s in v])
    return out
