"""Result files of bench and eval runs: the metadata that makes two results comparable (commit, date,
machine) and one way to write them (whole files only, so an interrupted run never leaves half a JSON)."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def machine() -> dict[str, object]:
    """CPU model, torch threads and versions, plus the GPU where torch sees one."""
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
    """The checkout's short commit hash ("unknown" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_metadata() -> dict[str, object]:
    """What a result was measured with: commit, UTC date (compact, as in result file names) and machine."""
    return {"commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S"),
            "machine": machine()}


def write_json(path: str | Path, doc: dict[str, Any]) -> Path:
    """Write `doc` to `path` through a temporary file renamed over it: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
    except BaseException:  # a full disk, Ctrl-C: no half-written .part left beside the results
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_result(name: str, payload: dict[str, object], out_dir: str | Path | None = None) -> Path:
    """<out_dir>/<name>-<date>.json: the run metadata, then `payload`. out_dir defaults to $ENGINE_BENCH_DIR,
    else bench/results."""
    meta = run_metadata()
    out_dir = Path(out_dir or os.environ.get("ENGINE_BENCH_DIR", RESULTS))
    return write_json(out_dir / f"{name}-{meta['date']}.json", {**meta, **payload})
