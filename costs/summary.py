"""The cost part of the demo report: what the miniature run cost (its ledgers) and what the
full-size PixArt-alpha recipe would cost on common GPUs (`plan`, at the default assumptions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FULL_SIZE = Path(__file__).resolve().parent.parent / "manifests" / "pixart-alpha.toml"
FULL_IMAGES = "sam=10M,aesthetic=14M"
COMMON_GPUS = ("V100", "A100-80GB", "H100", "H200", "L40S", "RTX-4090")


def recipe_cost(run_dir: str | Path) -> dict[str, Any]:
    """{"run": the ledgers under `run_dir` summed, "full_size": plan totals per common GPU}."""
    from costs.cost import sum_ledgers
    from costs.plan import PlanOptions, parse_images, plan

    full = []
    for gpu in COMMON_GPUS:
        t = plan(FULL_SIZE, PlanOptions(gpu=gpu, images=parse_images(FULL_IMAGES)))["totals"]
        full.append({"gpu": gpu, "train_gpu_days": t["train_gpu_days"], "gpu_days": t["gpu_days"], "kwh": t["kwh"], "kg_co2e": t["kg_co2e"]})
    return {"run": sum_ledgers([str(run_dir)]), "full_size": full}


PLAN_NOTE = ("The full-size recipe (manifests/pixart-alpha.toml: the paper's four training stages, plus LLaVA captions and "
             "features for 10M SAM + 14M aesthetic images), from `t2i-data plan` at its default assumptions (MFU 34% on "
             "Ampere and newer, 21% on V100; board power, PUE 1.2, 475 gCO2e/kWh):")


def cost_tables(cost: dict[str, Any], run_dir: str | Path) -> list[tuple[list[str], list[tuple]]]:
    """(header, rows) of the two report tables: this run by job, and the full-size recipe by GPU."""
    run = [(str(Path(r["where"]).resolve().relative_to(Path(run_dir).resolve())), r["job"], r["runs"],
            f"{r['device_hours'] * 3600:.0f} s", f"{r['energy_kwh'] * 1000:.3g} Wh", f"{r['kg_co2e'] * 1000:.3g} g",
            ", ".join(r["sources"])) for r in cost["run"]["rows"]]
    full = [(f["gpu"], f"{f['train_gpu_days']:,.0f}", f"{f['gpu_days']:,.0f}", f"{f['kwh'] / 1000:,.1f}", f"{f['kg_co2e'] / 1000:,.1f}")
            for f in cost["full_size"]]
    return [(["run dir", "job", "runs", "device time", "energy", "CO2e", "energy from"], run),
            (["GPU", "training GPU-days", "total GPU-days (with captioning, features)", "MWh", "tCO2e"], full)]
