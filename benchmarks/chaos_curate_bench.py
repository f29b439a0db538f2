"""Chaos for score, select and eval: random `kill -9` trials, and reruns that change the settings.

The machinery is chaos_bench's (kills aimed by written units, a quarter of the reruns killed too).
Each trial here also tries, when the killed run had committed anything, a rerun with other
identity settings on the same --out (score: other --scorers; select: the opposite --where; eval:
other --steps): it must be refused with one `error:` line and exit 2, and leave the output as it
was. Then the original command runs to the end and is compared with an uninterrupted run:
  lost        keys (score, select) or checkpoints (eval) missing;
  duplicated  rows (checkpoint rows) beyond one per key;
  mixed       score: a shard whose columns differ from the clean run's; select: a key the clean
              selection does not hold; eval: a checkpoint row whose scores differ from the clean run's.

    .venv/bin/python benchmarks/chaos_curate_bench.py --trials 20    # writes BENCHMARKS.md "chaos_curate_bench"
    .venv/bin/python benchmarks/chaos_curate_bench.py --trials 2 --no-write
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.chaos_bench import CLI, Job, JobResult, chaos_main, clean_run, kill_during, run_rounds, run_to_end  # noqa: E402

N_CAPTIONS = 96
EVAL_PROMPTS = ("a red circle on the left", "a blue square on the right", "a green triangle", "a yellow star in the middle")


@dataclass
class ChaosJob:
    """A job of chaos_bench plus the same command with other identity settings."""

    job: Job
    changed: Callable[[Path], list[str]]  # must be refused once anything is committed
    remember: Callable[[Path], None]  # keeps what the uninterrupted run wrote: the yardstick of job.check


@dataclass
class CurateResult(JobResult):
    mixed: int = 0
    kills: int = 0  # SIGKILLs that landed (a double-kill trial may count two)
    changes_tried: int = 0
    changes_refused: int = 0
    refusal: str = ""  # one refusal line, for the report


def build_world(root: Path) -> dict:
    """Caption shards of the simple world, a tiny CLIP, a tiny PixArt run with three checkpoints."""
    import torch

    from t2i.stage import run_stage
    from t2i.train import TrainConfig
    from tiny.clip import build_tiny_clip, save_clip
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    torch.set_num_threads(1)
    world = {**build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=0)}
    world["clip"] = str(save_clip(*build_tiny_clip(simple_corpus()), root / "clip"))
    world["captions"] = root / "captions"
    write_simple_world(world["captions"], N_CAPTIONS, rows_per_shard=16)
    cfg = TrainConfig(preset="PixArt-tiny/2", resolution=16, vae=world["vae"], text_encoder=world["text_encoder"], max_tokens=16,
                      text_dtype="float32", batch_size=8, steps=6, warmup_steps=1, checkpoint_every=2, keep_checkpoints=3,
                      log_every=1, loader_workers=0)  # fmt: skip
    world["run"] = root / "run"
    run_stage(cfg, world["run"], shards=world["captions"], progress=False)
    world["prompts"] = root / "prompts.txt"
    world["prompts"].write_text("\n".join(EVAL_PROMPTS) + "\n")
    return world


def _shards(out: Path) -> list[Path]:
    from shards.reader import complete_shards

    return [Path(p) for p in complete_shards(out)] if out.is_dir() else []


def _keys(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [k for s in _shards(out) for k in pq.read_table(s, columns=["key"]).column("key").to_pylist()]


def _columns(out: Path) -> set[tuple[str, ...]]:
    import pyarrow.parquet as pq

    return {tuple(pq.read_schema(s).names) for s in _shards(out)}


def _eval_rows(out: Path) -> list[dict]:
    path = out / "eval.json"
    return json.loads(path.read_text())["checkpoints"] if path.is_file() else []


def _results(out: Path) -> int:
    return len(list(out.glob("*/result.json"))) if out.is_dir() else 0


def score_job(world: dict) -> ChaosJob:
    def command(out: Path, scorers: str = "clip,image,lang,dedup") -> list[str]:
        return [*CLI, "score", "--shards", str(world["captions"]), "--out", str(out), "--scorers", scorers, "--clip-model",
                world["clip"], "--batch-size", "8", "--shard-size", "8", "--workers", "1", "--no-progress"]

    expected = set(_keys(world["captions"]))
    clean: dict = {}

    def check(out: Path) -> dict:
        keys = _keys(out)
        return {"lost": len(expected - set(keys)), "duplicated": len(keys) - len(set(keys)),
                "mixed": len(_columns(out) - clean["columns"])}

    job = Job("score", command, lambda out: bool(_shards(out)), check, lambda out: len(_shards(out)))
    return ChaosJob(job, lambda out: command(out, "lang"), lambda out: clean.update(columns=_columns(out)))


def select_job(world: dict, scores: Path) -> ChaosJob:
    import pyarrow.parquet as pq

    values = sorted(v for s in _shards(scores) for v in pq.read_table(s, columns=["clip_score"]).column("clip_score").to_pylist())
    median = values[len(values) // 2]

    def command(out: Path, op: str = ">") -> list[str]:
        return [*CLI, "select", "--shards", str(world["captions"]), "--scores", str(scores), "--where",
                f"clip_score {op} {median!r}", "--out", str(out), "--shard-size", "4"]

    clean: dict = {}

    def check(out: Path) -> dict:
        keys, want = _keys(out), clean["keys"]
        return {"lost": len(want - set(keys)), "duplicated": len(keys) - len(set(keys)), "mixed": len(set(keys) - want)}

    job = Job("select", command, lambda out: bool(_shards(out)), check, lambda out: len(_shards(out)))
    return ChaosJob(job, lambda out: command(out, "<="), lambda out: clean.update(keys=set(_keys(out))))


def eval_job(world: dict) -> ChaosJob:
    def command(out: Path, steps: str = "3") -> list[str]:
        return [*CLI, "eval", str(world["run"]), "--prompts", str(world["prompts"]), "--clip", world["clip"], "--out", str(out),
                "--steps", steps, "--no-progress"]

    clean: dict = {}

    def check(out: Path) -> dict:
        rows = {r["name"]: r for r in _eval_rows(out)}
        want = {r["name"]: r for r in clean["rows"]}
        names = [r["name"] for r in _eval_rows(out)]
        differ = sum(rows[n]["clip_score"] != want[n]["clip_score"] for n in set(rows) & set(want))
        return {"lost": len(set(want) - set(rows)), "duplicated": len(names) - len(set(names)),
                "mixed": differ + len(set(rows) - set(want))}

    job = Job("eval", command, lambda out: _results(out) > 0, check, _results)
    return ChaosJob(job, lambda out: command(out, "4"), lambda out: clean.update(rows=_eval_rows(out)))


def _try_change(cj: ChaosJob, out: Path, res: CurateResult) -> None:
    """A rerun with other identity settings on a committed --out: refused in one line, output unchanged."""
    before = sorted(p.name for p in out.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
    r = run_to_end(cj.changed(out))
    lines = r.stderr.strip().splitlines()
    after = sorted(p.name for p in out.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
    res.changes_tried += 1
    refused = r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and before == after
    res.changes_refused += refused
    if refused and not res.refusal:
        res.refusal = lines[0]


def trial(cj: ChaosJob, out: Path, rng: random.Random, res: CurateResult) -> None:
    """Kill (once, or twice in a quarter of the trials), try a settings change, rerun, compare."""
    job = cj.job
    kills = 2 if rng.random() < 0.25 else 1
    res.trials += 1
    res.double_kills += kills == 2
    for _ in range(kills):
        if not kill_during(job, out, rng, res):
            res.finished_before_kill += 1
            break
        res.kills += 1
    committed = job.committed(out)
    res.killed_after_commit += committed
    if committed:
        _try_change(cj, out, res)
    r = run_to_end(job.command(out))
    if r.returncode != 0:
        res.failed_reruns.append(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
        return
    c = job.check(out)
    res.lost, res.duplicated, res.mixed = res.lost + c["lost"], res.duplicated + c["duplicated"], res.mixed + c["mixed"]


def run_chaos(trials: int, root: Path, seed: int = 0, log: Callable[[str], None] = print, deadline: float | None = None,
              on_round: Callable[[dict], None] | None = None) -> dict:
    """{name: CurateResult}; trials round-robin over score, select, eval; no round starts after `deadline`."""
    world = build_world(root)
    jobs = [score_job(world)]
    results = {"score": CurateResult()}
    clean_run(jobs[0].job, root / "clean-score", results["score"])
    jobs += [select_job(world, root / "clean-score"), eval_job(world)]
    results |= {"select": CurateResult(), "eval": CurateResult()}
    for cj in jobs:
        if cj.job.name != "score":
            clean_run(cj.job, root / f"clean-{cj.job.name}", results[cj.job.name])
        cj.remember(root / f"clean-{cj.job.name}")
    rng = random.Random(seed)
    run_rounds(trials, {cj.job.name: (lambda out, res, cj=cj: trial(cj, out, rng, res)) for cj in jobs}, results, root,
               lambda r: (f"lost {r.lost} dup {r.duplicated} mixed {r.mixed} refused {r.changes_refused}/{r.changes_tried} "
                          f"failed {len(r.failed_reruns)}"), log, deadline, (lambda: on_round(results)) if on_round else None)
    return results


def render(results: dict, trials: int) -> str:
    lines = [
        f"Random `kill -9` trials ({trials} per job; in about a quarter the rerun is killed too), aimed by written units",
        "(score: shards of 8 rows; select: shards of 4 rows; eval: a checkpoint's result, 3 checkpoints x 4 prompts).",
        "After a kill that left committed output, a rerun with other identity settings (score `--scorers lang`, select the",
        "opposite `--where`, eval `--steps 4`) must be refused: exit 2, one `error:` line, the output's files unchanged.",
        "Then the original command runs to the end and is compared with an uninterrupted run (`mixed`: score shards with",
        "other columns, selected keys outside the clean selection, eval rows whose CLIPScore differs).", "",
        "`kills`: SIGKILLs that landed (a double-kill trial can count two; `finished first`: a run ended before its kill moment).", "",
        "| job | trials | kills | double kills | finished first | commits before the rerun | changes refused | lost | duplicated | mixed | failed reruns | clean run s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r.trials} | {r.kills} | {r.double_kills} | {r.finished_before_kill} | {r.killed_after_commit} | "
                     f"{r.changes_refused}/{r.changes_tried} | {r.lost} | {r.duplicated} | {r.mixed} | {len(r.failed_reruns)} | {r.clean_s:.1f} |")
    refusals = [f"- {name}: `{r.refusal}`" for name, r in results.items() if r.refusal]
    failures = [f"- {name}: `{f}`" for name, r in results.items() for f in r.failed_reruns]
    lines += ["", "What a refused change says:", *refusals] if refusals else []
    lines += ["", "Failed reruns:", *failures] if failures else []
    lines += ["", f"Run: `python benchmarks/chaos_curate_bench.py --trials {trials}` (trials go round-robin over the jobs)."]
    return "\n".join(lines)


def main() -> None:
    chaos_main("chaos_curate_bench", __doc__, run_chaos, render, lambda results: results)


if __name__ == "__main__":
    main()
