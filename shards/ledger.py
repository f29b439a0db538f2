"""The run ledger: what a job (caption, score, select, features, train) cost in device-hours, energy and CO2e.

Each job appends one JSON line per run to `<run dir>/ledger.jsonl` (a rerun or resume adds a line,
so the file sums to the whole job). Energy comes from, in order:

- NVML's cumulative energy counter of the job's GPU (`nvidia-ml-py`; Volta and newer);
- RAPL package counters under /sys/class/powercap (Intel, and AMD on recent kernels) on CPU. They
  measure the whole CPU package, other processes included;
- otherwise a stated estimate: on a GPU, board power for the wall time (shards.gpus); on a CPU, the
  job's CPU time x 5 W per busy core (a server core at full load: 64-core 280 W EPYC 7763 ~4.4 W,
  40-core 270 W Xeon 8380 ~6.8 W).

CO2e = energy x PUE x grid intensity; both default to (PUE 1.2, 475 gCO2e/kWh) and are
set per machine with T2I_PUE and T2I_GRID_GCO2_KWH.

Why not codecarbon: its OfflineEmissionsTracker works offline (tested: 3.3.2 with country_iso_code),
but on a CPU without RAPL it falls back to a fixed 4 W per thread, i.e. an estimate like ours; on
GPUs it samples power in a background thread where NVML's energy counter is exact and free; and it
adds a dependency tree and its own CSV per process for what is ~100 lines here.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import resource
import socket
import time
from glob import glob
from pathlib import Path
from typing import Any

LEDGER = "ledger.jsonl"
# Default grid intensity: the world average, 475 gCO2e/kWh (IEA, Global Energy & CO2 Status Report
# 2019; also codecarbon's world fallback). PUE 1.2: a GPU cloud / hyperscale data centre (Uptime
# Institute's 2023 survey puts the all-data-centre average at 1.58). `plan` prices with them too.
GRID_GCO2_KWH = 475.0
PUE = 1.2
WATTS_PER_BUSY_CORE = 5.0
RAPL_ROOT = "/sys/class/powercap"


def grid_settings() -> tuple[float, float]:
    """(PUE, grid gCO2e/kWh) for this machine: T2I_PUE, T2I_GRID_GCO2_KWH, else the plan defaults."""
    return float(os.environ.get("T2I_PUE", PUE)), float(os.environ.get("T2I_GRID_GCO2_KWH", GRID_GCO2_KWH))


def _cpu_seconds() -> float:
    """CPU time of this process, its finished children, and its live descendants (DataLoader
    workers, vLLM's engine process), which getrusage only counts once they are reaped."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                t = child.cpu_times()
                total += t.user + t.system
            except psutil.Error:  # exited meanwhile
                pass
    except ImportError:
        pass
    return total


class RaplCounter:
    """Sum of the RAPL package energy counters (µJ), with wrap-around; None when unreadable."""

    def __init__(self, root: str = RAPL_ROOT) -> None:
        self.zones = sorted(p for p in glob(f"{root}/intel-rapl:*") if p.count(":") == 1)  # packages, not sub-zones
        self.last: dict[str, int] = {}
        self.total_uj = 0

    def read_joules(self) -> float | None:
        try:
            for z in self.zones:
                now = int(Path(z, "energy_uj").read_text())
                prev = self.last.get(z, now)
                span = int(Path(z, "max_energy_range_uj").read_text())
                self.total_uj += now - prev if now >= prev else now + span - prev
                self.last[z] = now
        except (OSError, ValueError):
            return None
        return self.total_uj / 1e6 if self.zones else None


def _nvml_handle(device):
    """An NVML handle for a torch CUDA device (by UUID, so CUDA_VISIBLE_DEVICES is respected), or None."""
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        idx = torch.device(device).index or 0
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(idx).uuid}")
        except Exception:
            return pynvml.nvmlDeviceGetHandleByIndex(idx)
    except Exception:  # no library, no driver, no GPU: fall back to the next source
        return None


def _nvml_joules(handle) -> float | None:
    try:
        import pynvml

        return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000  # mJ -> J
    except Exception:
        return None


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


class Ledger:
    """Measures one job from construction to `close()`, then appends its record to `run_dir`.

    A job that dies before `close()` is still recorded (status "interrupted") when the process
    exits, so a crashed run's hours are not lost from `t2i-data cost`.
    """

    def __init__(self, run_dir, job: str, device=None, rapl_root: str = RAPL_ROOT) -> None:
        if device is None:  # torch only when the device is not known (a CPU job names it: no torch import)
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.run_dir, self.job = run_dir, job
        self.device = str(device)
        self.handle = _nvml_handle(self.device) if self.device.startswith("cuda") else None
        self.rapl = RaplCounter(rapl_root) if self.handle is None and not self.device.startswith("cuda") else None
        self.started = time.time()
        self.t0, self.cpu0 = time.perf_counter(), _cpu_seconds()
        self.j0 = self._joules()
        self.closed = False
        atexit.register(self._at_exit)

    def _joules(self) -> float | None:
        if self.handle is not None:
            return _nvml_joules(self.handle)
        return self.rapl.read_joules() if self.rapl is not None else None

    def _energy(self, wall: float, cpu: float) -> tuple[float, str]:
        """(joules, source) since the start."""
        j1 = self._joules()
        if self.j0 is not None and j1 is not None:
            return j1 - self.j0, "nvml" if self.handle is not None else "rapl (whole CPU package)"
        if self.device.startswith("cuda"):
            from shards.gpus import match_device_name

            gpu = match_device_name(_device_name(self.device))
            watts = gpu.watts if gpu else 300.0
            return wall * watts, f"estimate: {watts:.0f} W board power x wall time ({gpu.name if gpu else 'unknown GPU, 300 W assumed'})"
        return cpu * WATTS_PER_BUSY_CORE, f"estimate: {cpu:.1f} CPU-seconds x {WATTS_PER_BUSY_CORE:.0f} W per busy core"

    def close(self, status: str = "done", **work: Any) -> dict[str, Any]:
        """Stop measuring, append the record to `<run_dir>/ledger.jsonl` and return it. `work`: what
        the job did (images, steps, ...), stored alongside."""
        if self.closed:
            return self.record
        self.closed = True
        atexit.unregister(self._at_exit)
        wall, cpu = time.perf_counter() - self.t0, _cpu_seconds() - self.cpu0
        joules, source = self._energy(wall, cpu)
        pue, grid = grid_settings()
        kwh = joules / 3.6e6
        self.record = {
            "job": self.job, "status": status, "started": _iso(self.started), "ended": _iso(time.time()),
            "host": socket.gethostname(), "rank": int(os.environ.get("RANK", 0)), "device": self.device,
            "device_name": _device_name(self.device), "wall_s": round(wall, 3), "device_hours": wall / 3600,
            "cpu_s": round(cpu, 3), "energy_kwh": kwh, "energy_source": source, "pue": pue,
            "grid_gco2_kwh": grid, "kg_co2e": kwh * pue * grid / 1000, **work,
        }  # fmt: skip
        append_record(self.run_dir, self.record)
        return self.record

    def _at_exit(self) -> None:
        try:
            self.close(status="interrupted")
        except Exception:  # the run dir may be gone (a test's temp dir); nothing to record into
            pass


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def append_record(run_dir, record: dict[str, Any]) -> None:
    """One line onto `<run_dir>/ledger.jsonl`: an append locally, read + rewrite on an object store."""
    from shards import fs

    path = fs.join(run_dir, LEDGER)
    line = json.dumps(record) + "\n"
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:  # one short write per record: concurrent ranks do not interleave
            f.write(line)
        return
    old = fs.read_text(path) if fs.exists(path) else ""
    fs.write_text(path, old + line)
