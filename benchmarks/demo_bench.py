"""The demo's three claims for several seeds, against the issue's targets: writes the "demo
claims" section of BENCHMARKS.md from the results.json of `t2i-data demo` runs.

    python benchmarks/demo_bench.py --seeds 0,1 --root demo_bench_out [--quick | --mid | --full] [--threads N]

`--ablate` runs the levers' ablation instead (demo.ablation: arm (c) alone, with each lever of issue
29 and with the best combination; benchmarks/_ablation.py) and writes the "levers ablation"
section; `--set arm_steps=100,...` changes its scale, `--captions truth` trains on the ground-truth
captions instead of training the captioner, `--batch-size` sets the arms' batch.

`--full` (the larger model, ~1.5 h a seed) writes its own section, "demo claims (--full)"; `--mid`
(~20 min a seed) likewise, "demo claims (--mid)". Seeds
may run as separate processes (`--seeds 0 --threads 1` beside `--seeds 1 --threads 1`), then one
`--report-only --seeds 0,1` writes the section. Each seed runs the demo into ROOT/seed-<n> (a
finished run is reused: the demo resumes), so the section can be rewritten from runs made earlier with `--report-only`. Wall time and CPU
time (user + system, all processes) are both recorded: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import write_section  # noqa: E402
from demo.fmt import pct  # noqa: E402

TARGETS = "arm (c) colour >= 90%, position >= 90%, shape >= 70%, all three >= 55%; (b)/(a) all-three >= 3x; " \
          "(c) reaches (b)'s final all-three in <= 60% of the steps; (d) raises the aesthetic score, all-three drops <= 5 points"


TIME_TARGET_S = 600


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (data-loader workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_seed(root: Path, seed: int, mode: str, threads: int) -> dict:
    from demo.run import DemoConfig, run_demo

    out = root / f"seed-{seed}"
    cfg = DemoConfig.for_mode(mode, str(out), seed)
    cfg.threads = threads
    t0, c0 = time.perf_counter(), _cpu_s()
    results = run_demo(cfg, progress=False)
    results["bench"] = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0, "load_avg": list(os.getloadavg())}
    (out / "bench.json").write_text(json.dumps(results["bench"]))
    return results


def mode_of(cfg: dict) -> str:
    """Which named configuration (DemoConfig.for_mode) a run's results.json was made with, so
    --report-only writes the section the runs belong to, whatever its flags say."""
    from dataclasses import asdict

    from demo.run import DemoConfig

    # paths name where the repository was when the run was made, not what it was
    mine = {k: v for k, v in cfg.items() if k not in ("out", "seed", "threads", "vae", "t2i_manifest")}
    for mode in ("default", "quick", "mid", "full"):
        named = asdict(DemoConfig.for_mode(mode, cfg["out"], cfg["seed"]))
        if all(named.get(k) == v for k, v in mine.items()):
            return mode
    sys.exit(f"the runs in {Path(cfg['out']).parent} match no configuration of this version (default, quick, mid, full): "
             "rerun them without --report-only")


def row(seed: int, r: dict) -> str:
    t2i = r["t2i"]
    arms, c, aes = t2i["arms"], t2i["claims"], t2i["aesthetic"]["samples"]
    cf = arms["c"]["final"]
    ratio = f"{c['captions_ratio']:.1f}x" if c["captions_ratio"] is not None else "a = 0"
    bench = r.get("bench", {})
    return (f"| {seed} | {pct(cf['color'])} / {pct(cf['position'])} / {pct(cf['shape'])} / {pct(cf['all'])} | "
            f"{pct(c['b_final_all'])} vs {pct(c['a_final_all'])} ({ratio}) | {_reach(c)} | "
            f"{aes['before_mean']:.2f} → {aes['after_mean']:.2f} ({aes['margin']:+.2f} ± {aes['margin_se']:.2f}); "
            f"{100 * c['d_all_change']:+.0f} pts | {_wall(r):.0f} s wall"
            + (f", {bench['cpu_s']:.0f} s CPU" if bench else "") + _load(r) + " |")


def _objective(cfg: dict) -> str:
    """The arms' objective as the section names it (a results.json from before the objective field: DDPM)."""
    if cfg.get("objective", "ddpm") == "flow":
        return f"rectified flow, {cfg['timestep_density'].replace('_', '-')} timesteps"
    power = cfg.get("timestep_power", 1.0)
    return cfg.get("prediction_type", "epsilon") + ("" if power == 1.0 else f", training timesteps T·u^{power:g}")


def _wall(r: dict) -> float:
    """The bench's own wall time of the run (a later resume rewrites results.json's timing, not bench.json)."""
    return r.get("bench", {}).get("wall_s", r["timing"]["total_s"])


def _load(r: dict) -> str:
    """The machine's 15-minute load at the end of the run: the time column means little without it."""
    load = r.get("bench", {}).get("load_avg") or r.get("load_avg")  # the bench's run, not a later resume
    return f", load {load[2]:.1f}" if load else ""


def _reach(claims: dict) -> str:
    if claims["c_steps_to_b_final"] is None:
        return "never"
    return f"{claims['c_steps_to_b_final']} ({pct(claims['c_steps_fraction'])})"


def curves(seed: int, r: dict) -> str:
    from demo.arms import reach_by_attribute
    from demo.report import prior_sentence

    by_attr = reach_by_attribute(r["t2i"]["arms"])
    lines = [f"Seed {seed}: the first judged step at which (c) matched (b)'s final accuracy, per attribute "
             f"(of {r['config']['arm_steps']}): " + ", ".join(f"{a} {by_attr[a]}" for a in ("color", "position", "shape", "all")) + "."
             + prior_sentence(r["t2i"].get("prior")),
             "", f"Seed {seed}, held-out accuracy (colour / shape / position / all three) per judged step:", ""]
    for arm, run in r["t2i"]["arms"].items():
        pts = "; ".join(f"{p['step']}: {pct(p['color'])}/{pct(p['shape'])}/{pct(p['position'])}/{pct(p['all'])}" for p in run["curve"])
        lines.append(f"- ({arm}) {run['label']}: {pts}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--root", default="demo_bench_out")
    ap.add_argument("--quick", action="store_true", help="the --quick demo (a smoke run of this script)")
    ap.add_argument("--mid", action="store_true", help="the --mid demo (its own section)")
    ap.add_argument("--full", action="store_true", help="the --full demo (its own section)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per seed (1 when seeds run side by side)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the section from ROOT/seed-*/results.json")
    ap.add_argument("--ablate", action="store_true", help="the levers' ablation (its own section, 'levers ablation')")
    ap.add_argument("--set", default="", help="--ablate: DemoConfig fields to change, e.g. arm_steps=100,dit_steps=50")
    ap.add_argument("--captions", default="vlm", help="--ablate: vlm (the demo's captioner) | truth (ground-truth captions)")
    ap.add_argument("--batch-size", type=int, default=0, help="--ablate: the arms' batch (0: the demo manifest's)")
    ap.add_argument("--levers", default="", help="--ablate: these levers only, e.g. flow,repa (default: all)")
    args = ap.parse_args()
    mode = "quick" if args.quick else "mid" if args.mid else "full" if args.full else "default"
    root = Path(args.root)
    if args.ablate:
        from benchmarks._ablation import run_seeds, write_ablation_section

        seeds = [int(s) for s in args.seeds.split(",")]
        write_ablation_section(run_seeds(root, seeds, mode, args.threads, args.report_only, args.set, args.captions,
                                         args.batch_size, args.levers), mode)
        return
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        path = root / f"seed-{seed}" / "results.json"
        if args.report_only:
            results[seed] = json.loads(path.read_text())
            bench = path.parent / "bench.json"
            if bench.exists():
                results[seed]["bench"] = json.loads(bench.read_text())
        else:
            results[seed] = run_seed(root, seed, mode, args.threads)
    any_r = next(iter(results.values()))
    cfg = any_r["config"]
    if args.report_only:
        mode = mode_of(cfg)
    body = [f"`t2i-data demo` ({'default' if mode == 'default' else '--' + mode}): world {cfg['world_train']} + {cfg['world_heldout']} images, "
            f"{cfg['t2i_resolution']} px, {cfg['preset']} ({_objective(cfg)}), arms a-c {cfg['arm_steps']} steps each (DiT stage {cfg['dit_steps']} on {cfg.get('dit_classes', 'shape')} labels), "
            f"fine-tune {cfg['finetune_steps']}; {cfg['curve_prompts']} held-out prompts judged per checkpoint. Targets: {TARGETS}.",
            "", "| seed | (c) colour / position / shape / all | all-three (b) vs (a) | (c) steps to (b)'s final | aesthetic before → after (margin); (d) all-three change | time |",
            "|---|---|---|---|---|---|"]
    body += [row(seed, r) for seed, r in results.items()]
    from demo.report import chance_caveat

    body += [""] + [f"- Seed {seed}:{c}" for seed, r in results.items() if (c := chance_caveat(r["t2i"]["arms"], r["t2i"]))]
    if mode == "default":
        walls = {seed: _wall(r) for seed, r in results.items()}
        verdict = "within" if max(walls.values()) <= TIME_TARGET_S else "over"
        body += [f"- Time: {verdict} the {TIME_TARGET_S} s target for the default demo on 2 cores ("
                 + ", ".join(f"seed {s} {w:.0f} s" for s, w in walls.items()) + "); a load near 2 means the run had the machine to itself."]
    if mode in ("mid", "full"):
        threads = ", ".join(f"seed {s}: {r['config']['threads']}" for s, r in results.items())
        body += [f"- Time is not a target for --{mode} (the default demo's is): torch threads {threads}; "
                 "the seeds may have run side by side, or beside other work, on the same cores (the load column)."]
    body += [""] + [curves(seed, r) for seed, r in results.items()]
    body += ["", "Aesthetic score: the LAION-v2-architecture head fitted by `score --fit-aesthetic` on the tiny world CLIP; "
             "ground truth per seed (real held-out images, clean / degraded): "
             + "; ".join(f"seed {s}: {r['t2i']['aesthetic']['real_heldout']['clean_mean']:.2f} / {r['t2i']['aesthetic']['real_heldout']['degraded_mean']:.2f}"
                         for s, r in results.items()) + "."]
    write_section(f"demo claims (--{mode})" if mode in ("mid", "full") else "demo claims", "\n".join(body))


if __name__ == "__main__":
    main()
