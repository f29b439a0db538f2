"""`t2i-data eval TARGET --suite own --shards CAPTIONS --judge MODEL`: sample a suite's prompts
from every checkpoint and let a VLM judge answer each prompt's questions (evals.judge_job).

Per checkpoint: `<out>/<checkpoint>/suite-own/<prompt id>.png` (a batch whose PNGs all exist is
not sampled again), then the judge's shards in `<out>/<checkpoint>/judged/` (a rerun judges only
what is missing). `<out>/suite.jsonl` holds the prompts with their questions (built once from the
captions; a rerun reads it, and refuses it in one line when `suite_settings.json` says it was built
with other shards, caption field, size, seed or minimum count). `<out>/suite_own.json` and
`<out>/eval.html`: per checkpoint, the yes-rate of each question category, and the share of
prompts fully drawn (every question yes) per split (heldout / seen) and wording (caption / order /
synonym / keywords).

`--suite geneval | t2i-compbench | dpg` (evals.public): the benchmark's prompts (`--limit` per
category), samples in `<checkpoint>/suite-<suite>/`, judge shards in `<checkpoint>/judged-<suite>/`,
`suite_<suite>.json` with per category the share drawn, the score and the VQAScore. Every suite:
`--preference` models' mean score per checkpoint (evals.preference), each checkpoint's cost up to its
step from the run's ledger and `quality_cost.png` (evals.cost), the worst-judged questions per category.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from shards.checks import Range, check_output_dir, check_ranges
from shards.errors import UserError
from t2i.sample import SampleConfig

SUITES = ("own", "geneval", "t2i-compbench", "dpg")
SUITE_SETTINGS = "suite_settings.json"  # beside suite.jsonl: what the own suite was built from


@dataclass
class SuiteConfig:
    """The suite eval's settings (the eval command's --suite flags and its sampling flags)."""

    suite: str = "own"
    shards: str | Path | None = None  # caption shards the own suite is drawn from
    caption_column: str = "caption"  # own: the shards' text field it reads (e.g. caption_dense, caption_short)
    out: str | Path = "eval"
    judge: str = "llava-hf/llava-1.5-7b-hf"
    judge_backend: str = "transformers"
    suite_prompts: int = 40  # own: combinations per split (each asked in 4 wordings)
    suite_file: str | Path | None = None  # public suites: the prompt/question file instead of the vendored one
    limit: int | None = None  # public suites: at most this many prompts per category (default: all)
    preference: list[str] | None = None  # preference models (PickScore, HPSv2 as CLIPModel; ImageReward): ids or dirs
    detector: str | None = None  # geneval: an open-vocabulary detector (OWLv2, Grounding DINO) for presence, count, position
    detector_threshold: float = 0.2  # its box confidence threshold
    min_count: int = 3
    steps: int = SampleConfig.steps
    guidance: float = SampleConfig.guidance
    seed: int = SampleConfig.seed
    batch_size: int = 16
    which: str = SampleConfig.which
    vae: str | None = None
    text_encoder: str | None = None
    device: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.suite not in SUITES:
            raise UserError(f"unknown --suite {self.suite!r}: use one of {', '.join(SUITES)}")
        if self.suite == "own" and (self.shards is None or not Path(self.shards).is_dir()):
            raise UserError(f"--shards {self.shards or '(not given)'} is not a directory: pass the caption shards the suite is drawn from")
        if self.suite != "own" and self.caption_column != "caption":
            raise UserError(f"--caption-column is for --suite own only: drop it (--suite {self.suite} has its own prompts)")
        if self.suite == "own" and (self.limit is not None or self.suite_file is not None):
            raise UserError(f"--{'limit' if self.limit is not None else 'suite-file'} is for the public suites: drop it "
                            "(--suite own is sized by --suite-prompts and drawn from --shards)")  # fmt: skip
        if self.detector is not None and self.suite != "geneval":
            raise UserError(f"--detector is for --suite geneval only: drop it (--suite {self.suite} has no detector checks)")
        if self.suite != "own" and self.shards is not None:
            raise UserError(f"--shards is for --suite own only: drop it (--suite {self.suite} has its own prompts)")
        if self.suite_file is not None and not Path(self.suite_file).exists():
            raise UserError(f"--suite-file {self.suite_file} does not exist: pass the suite's prompt file")
        if self.suite != "own":
            from evals.public import check_files

            check_files(self.suite, self.suite_file)
        check_ranges(self, {"suite_prompts": Range(1, 100_000), "min_count": Range(1, 10**9), "batch_size": Range(1, 4096),
                            "steps": Range(1, 10_000), "guidance": Range(0, 100), "seed": Range(0, 2**32 - 1),
                            "limit": Range(1, 10**6), "detector_threshold": Range(0, 1)})  # fmt: skip


def _captions(shards: str | Path, column: str = "caption") -> Iterator[str]:
    """The shards' `column` texts, streamed (a 10M-row caption set is not held in memory)."""
    from shards.reader import iter_rows

    texts = (r[column] for r in iter_rows(shards, columns=[column]) if r.get(column))
    first = next(texts, None)
    if first is None:
        raise UserError(f"--shards {shards} holds no {column!r} text: pass the output of `t2i-data caption`, "
                        "or name the field that holds the captions with --caption-column")  # fmt: skip
    return itertools.chain([first], texts)


def load_suite(cfg: SuiteConfig) -> list[dict[str, Any]]:
    """The suite's prompts. Own: `<out>/suite.jsonl` when it exists, else built from the captions and
    written there. Public: the vendored files (or --suite-file), written to `<out>/suite-<suite>.jsonl`."""
    from evals.own import build_suite
    from evals.public import load_public
    from shards.fs import write_text

    if cfg.suite != "own":
        prompts = load_public(cfg.suite, cfg.suite_file, cfg.limit)
        write_text(Path(cfg.out) / f"suite-{cfg.suite}.jsonl", "".join(json.dumps(p) + "\n" for p in prompts))
        return prompts
    path, recorded = Path(cfg.out) / "suite.jsonl", Path(cfg.out) / SUITE_SETTINGS
    if path.is_file():
        check_suite_settings(recorded, suite_settings(cfg))
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = [p.to_dict() for p in build_suite(_captions(cfg.shards, cfg.caption_column), cfg.suite_prompts, cfg.seed, cfg.min_count)]
    write_text(recorded, json.dumps(suite_settings(cfg), indent=1))  # before the suite: a suite never lacks its settings
    write_text(path, "".join(json.dumps(p) + "\n" for p in prompts))
    return prompts


def suite_settings(cfg: SuiteConfig) -> dict[str, Any]:
    """What the own suite is built from: a rerun into the same --out must ask for the same."""
    return {"shards": str(Path(cfg.shards).resolve()), "caption_column": cfg.caption_column, "suite_prompts": cfg.suite_prompts,
            "seed": cfg.seed, "min_count": cfg.min_count}  # fmt: skip


def check_suite_settings(recorded: Path, wanted: dict[str, Any]) -> None:
    """A UserError when the suite kept in `recorded`'s folder was built with other settings than
    `wanted` (reusing it would judge another suite than the flags ask for)."""
    if not recorded.is_file():
        return  # a suite written before its settings were recorded: kept as it is
    built = json.loads(recorded.read_text())
    changed = [f"{k} {built.get(k)!r} (now {v!r})" for k, v in wanted.items() if built.get(k) != v]
    if changed:
        raise UserError(f"{recorded.parent / 'suite.jsonl'} was built with other settings: {', '.join(changed)}: "
                        "pass a new --out, or delete that suite.jsonl to build it again")  # fmt: skip


def sample_suite(target, prompts: list[dict], cfg: SuiteConfig, folder: Path, device: str) -> None:
    """Every prompt's PNG in `folder` (batch b sampled with seed + b; batches already saved skipped)."""
    from t2i.evaluate import EvalConfig, load_pipeline
    from t2i.sample import generate

    folder.mkdir(parents=True, exist_ok=True)
    pipe = null = None
    for b, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        batch = prompts[start : start + cfg.batch_size]
        if all((folder / f"{p['id']}.png").is_file() for p in batch):
            continue
        if pipe is None:
            ecfg = EvalConfig(prompts=["-"], vae=cfg.vae, text_encoder=cfg.text_encoder, which=cfg.which)
            pipe, null = load_pipeline(target, ecfg, device)
        images = generate(pipe, null, [p["prompt"] for p in batch], steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed + b)
        for p, im in zip(batch, images):
            im.save(folder / f"{p['id']}.png")


def question_records(prompts: list[dict], folder: Path) -> list[dict[str, Any]]:
    """One judge record per (prompt, question): category '<split>/<wording>/<question category>'."""
    return [{"key": f"{p['id']}-{i}", "image": str(folder / f"{p['id']}.png"), "prompt": p["prompt"], "question": q,
             "category": f"{p['split']}/{p['variant']}/{cat}"} for p in prompts for i, (cat, q) in enumerate(p["questions"])]  # fmt: skip


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Yes-rate per question category, and per split x wording the share of prompts whose every
    question was answered yes ("drawn")."""
    by_cat: dict[str, list[bool]] = {}
    prompts: dict[str, list[bool]] = {}
    for r in rows:
        if r["error"] is not None:
            continue
        split, variant, cat = r["category"].split("/")
        yes = r["answer"] == "yes"
        by_cat.setdefault(f"{split}/{cat}", []).append(yes)
        prompts.setdefault(f"{split}/{variant}|{r['key'].rsplit('-', 1)[0]}", []).append(yes)
    drawn: dict[str, list[bool]] = {}
    for k, answers in prompts.items():
        drawn.setdefault(k.split("|")[0], []).append(all(answers))
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"questions": {k: mean(v) for k, v in sorted(by_cat.items())},
            "drawn": {k: mean(v) for k, v in sorted(drawn.items())}, "judged": sum(len(v) for v in by_cat.values())}  # fmt: skip


def judge_checkpoint(t, prompts: list[dict], cfg: SuiteConfig, jcfg, scorers: dict, device: str) -> dict[str, Any]:
    """Sample, judge and summarize one checkpoint (judge shards in `<ck>/judged` for own,
    `<ck>/judged-<suite>` for a public suite, the detector's in `<ck>/detected-geneval`)."""
    from dataclasses import replace

    from evals.judge_job import read_judged, run_judge
    from evals.public import DETECTED_KINDS, detector_records, public_records, summarize_public
    from t2i.evaluate import safe_name

    ck = Path(cfg.out) / safe_name(t.name)
    folder = (ck / f"suite-{cfg.suite}").resolve()  # absolute in the judge shards: readable from any working directory
    sample_suite(t, prompts, cfg, folder, device)
    own, detector = cfg.suite == "own", scorers.get("detector")
    jcfg.out = ck / ("judged" if own else f"judged-{cfg.suite}")
    records = question_records(prompts, folder) if own else public_records(prompts, folder, DETECTED_KINDS if detector else ())
    summary = run_judge(records, jcfg, scorer=scorers["judge"])
    rows = read_judged(jcfg.out)
    if detector is not None:
        dcfg = replace(jcfg, out=ck / "detected-geneval", model=cfg.detector)
        summary.judged += run_judge(detector_records(prompts, folder), dcfg, scorer=detector).judged
        rows += read_judged(dcfg.out)
    result = summarize(rows) if own else summarize_public(cfg.suite, prompts, rows)
    return {"name": t.name, "step": t.step, **result, "newly_judged": summary.judged, "ledger": summary.ledger,
            "images": str(folder), "worst": worst_prompts(rows)}  # fmt: skip


def worst_prompts(rows: list[dict[str, Any]], n: int = 3) -> dict[str, list[dict[str, Any]]]:
    """Per category (its first part), the `n` questions with the lowest P(Yes), with their images."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted((r for r in rows if r["error"] is None), key=lambda r: (r["score"], r["key"])):
        cat = (r["category"] or "").split("/")[0]
        if len(out.setdefault(cat, [])) < n:
            out[cat].append({k: r[k] for k in ("image", "prompt", "question", "answer", "score")})
    return dict(sorted(out.items()))


def add_preferences(results: list[dict[str, Any]], prompts: list[dict], cfg: SuiteConfig, device: str) -> None:
    """Each --preference model's mean score over every checkpoint's suite images (one model loaded at a time)."""
    from evals.preference import load_preference, score_folder

    for model in cfg.preference or []:
        scorer = load_preference(model, device)
        for r in results:
            r.setdefault("preference", {})[model] = score_folder(scorer, prompts, Path(r["images"]))
        del scorer


def run_suite(target: str | Path, cfg: SuiteConfig) -> dict[str, Any]:
    """Sample and judge the suite on every checkpoint at `target`, score the preference models, join
    each checkpoint with the run's ledger; returns (and writes) the report."""
    import torch

    from evals.cost import join_costs
    from evals.judge_job import JudgeConfig, load_scorer
    from evals.preference import check_preference
    from evals.report import write_suite_report
    from shards.hub import check_model
    from t2i.evaluate import find_targets

    cfg.validate()
    check_output_dir(cfg.out)
    check_model(cfg.judge, "judge model", "--judge")  # one line within 15 s, before any sampling
    for model in cfg.preference or []:
        check_preference(model)
    if cfg.detector:
        check_model(cfg.detector, "detector", "--detector")
    targets = find_targets(target, cfg.which)
    prompts = load_suite(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    jcfg = JudgeConfig(model=cfg.judge, backend=cfg.judge_backend, batch_size=cfg.batch_size, progress=False)
    jcfg.validate()
    scorers = {"judge": load_scorer(jcfg)}
    if cfg.detector:
        from evals.detect import DetectorScorer

        scorers["detector"] = DetectorScorer(cfg.detector, device, cfg.detector_threshold)
    results = [judge_checkpoint(t, prompts, cfg, jcfg, scorers, device) for t in targets]
    del scorers
    add_preferences(results, prompts, cfg, device)
    report = {"target": str(target), "suite": cfg.suite, "prompts": len(prompts), "judge": cfg.judge,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "checkpoints": results}  # fmt: skip
    report["cost_ledger"] = join_costs(target, results)
    report["files"] = [str(p) for p in write_suite_report(Path(cfg.out), report)]
    return report


def suite_command(target: str | Path, cfg: SuiteConfig) -> str:
    """`t2i-data eval --suite`: the run, then one line per checkpoint."""
    report = run_suite(target, cfg)
    lines = []
    for r in report["checkpoints"]:
        if report["suite"] == "own":
            drawn = ", ".join(f"{k} {v:.0%}" for k, v in r["drawn"].items() if k.endswith("/caption"))
            line = f"{r['name']}: prompts drawn {drawn} ({r['judged']} questions judged)"
        else:
            overall = "n/a" if r["overall"] is None else f"{r['overall']:.3f}"
            line = f"{r['name']}: {report['suite']} overall {overall} ({r['judged']} questions judged)"
        pref = ", ".join(f"{m} {v:.3f}" for m, v in (r.get("preference") or {}).items() if v is not None)
        cost = f", {r['cost']['device_hours']:.3g} GPU-hours" if r.get("cost") else ""
        lines.append(line + (f"; preference {pref}" if pref else "") + cost)
    return "\n".join([*lines, f"wrote {', '.join(report['files'])}"])
