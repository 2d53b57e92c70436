"""Timing shared by the bench subcommands and engine.profile: alternating candidates, medians, the bytes a
decode step reads and how fast the machine can read them. Candidates alternate within one run, so that noise
hits them alike and a ratio between them holds where absolute times do not (bench/CPU.md)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ..model import RMSNorm


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a wall-clock time covers it (a no-op on the CPU)."""
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


def weight_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads from the weights: every linear and norm (the embedding reads one row)."""
    return sum(m.weight.nbytes for m in model.modules()
               if isinstance(m, (nn.Linear, RMSNorm)))
