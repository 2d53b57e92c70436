"""Timing and result files shared by engine.bench and engine.profile (BENCHMARKS.md's rules)."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .model import RMSNorm

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def summary(samples: list[float]) -> dict[str, float]:
    """Median, min and max (seconds) plus p90/p99 where there are enough samples."""
    s = sorted(samples)
    out = {"median": statistics.median(s), "min": s[0], "max": s[-1], "n": len(s)}
    if len(s) >= 10:
        out["p90"] = s[int(0.9 * (len(s) - 1))]
        out["p99"] = s[int(0.99 * (len(s) - 1))]
    return out


def read_bandwidth(device: torch.device | str, nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Bytes per second a reduction over a buffer far larger than the caches reads (median, all threads):
    the ceiling of a decode step, which reads its weights and K/V once and writes almost nothing."""
    buf = torch.ones(nbytes // 4, device=device)
    buf.sum()

    def read() -> None:
        buf.sum()

    times = time_alternating({"read": read}, reps=reps, device=str(device))["read"]
    return nbytes / statistics.median(times)


def time_alternating(fns: dict[str, Callable[[], None]], reps: int = 5, warmup: int = 1,
                     device: str = "cpu") -> dict[str, list[float]]:
    """Run each candidate `warmup` times, then `reps` rounds alternating A, B, ... (noise hits all alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, payload: dict[str, object], out_dir: Path | None = None) -> Path:
    """bench/results/<name>-<date>.json with commit, date and machine metadata."""
    out_dir = Path(out_dir or os.environ.get("ENGINE_BENCH_DIR", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = out_dir / f"{name}-{stamp}.json"
    doc = {"commit": git_commit(), "date": stamp, "machine": machine(), **payload}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def weight_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads from the weights: every linear and norm (the embedding reads one row)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, (nn.Linear, RMSNorm)))
