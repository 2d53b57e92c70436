"""engine.bench end to end on a tiny random model: the harness runs, writes its JSON, and the numbers in it are
consistent (ratios match the times they come from). No assertion on wall time."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.bench import main as bench_main


@pytest.fixture
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ENGINE_BENCH_DIR", str(tmp_path))
    return tmp_path


def only_result(results_dir: Path, prefix: str) -> dict:
    (path,) = results_dir.glob(f"{prefix}-*.json")
    return json.loads(path.read_text())


def test_policy_grid(tiny_model_dir: Path, results_dir: Path) -> None:
    assert bench_main(["--model", str(tiny_model_dir), "--policies", "h2o,streaming", "--budgets", "16", "32",
                       "--contexts", "48", "250", "--steps", "2", "--reps", "1"]) == 0
    doc = only_result(results_dir, "policy-grid")
    assert set(doc["results"]) == {"h2o", "streaming"}
    for per_budget in doc["results"].values():
        assert set(per_budget) == {"16", "32"}
        for cells in per_budget.values():
            assert set(cells) == {"48", "250"}
            for ctx, cell in cells.items():
                p, s = cell["policy_step_s"]["median"], cell["full_same_occupancy_step_s"]["median"]
                assert cell["overhead_vs_same_occupancy"] == pytest.approx(p / s)
                # the full cache must leave room for the timed steps inside the 256-token context
                assert cell["full_context_tokens"] == min(int(ctx), 256 - 2 * 2 - 1)


def test_kernels_bench(results_dir: Path) -> None:
    assert bench_main(["kernels", "--contexts", "33", "--reps", "1"]) == 0
    doc = only_result(results_dir, "kernels")
    for layout in ("llama-2-7b", "smollm2"):
        assert set(doc["results"][layout]["decode"]) == {"33"}
    rss = doc["results"]["prefill_peak_rss_bytes"]
    assert rss["8192"] > 0  # the kernel's working set above its inputs is measured, not lost in an earlier peak
