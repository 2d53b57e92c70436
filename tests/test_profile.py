"""The profiler: every op family is measured where the policy does that work (and only there), the trace
names our kernels and model stages, and the CLI reports bad paths in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from engine import ops
from engine.profile import FAMILIES, profile

from .helpers import tiny_chat_model


@pytest.fixture(scope="module")
def tiny(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_model(default_model_dir, tmp_path_factory.mktemp("profile") / "tiny")


def test_families_of_an_evicting_and_merging_policy(tiny: Path, tmp_path: Path) -> None:
    llm = engine.load(tiny, policy="weightedkv", budget=48)
    trace = tmp_path / "trace.json"
    report = profile(llm, context=64, steps=3, trace=trace)
    assert tuple(report.family_ms) == FAMILIES
    assert all(ms > 0 for ms in report.family_ms.values()), report.family_ms
    assert report.profiled_step_ms >= sum(ms for name, ms in report.family_ms.items() if name != "Python overhead")
    assert report.budget == 48 and report.prefill_ms > 0 and report.tokens_per_s > 0
    assert report.kv_bytes == 2 * 2 * 2 * 16 * 49 * 4  # K+V, 2 layers, 2 KV heads, head_dim 16, 49 slots, fp32
    assert report.bandwidth_gb_s > 0
    table = report.table()
    assert all(name in table for name in FAMILIES) and "tokens/s" in table and "GB/s" in table
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"model::layers.0.attention", "model::layers.1.feed_forward", "family::scoring",
            "family::compaction/merge", "step::decode"} <= names
    if ops.has_kernel("decode_attention", "cpu"):  # the compiled ops show up by name
        assert {"engine::decode_attention", "engine::select_victim", "engine::merge_neighbour"} <= names


def test_full_cache_spends_nothing_on_eviction(tiny: Path) -> None:
    report = profile(engine.load(tiny), context=32, steps=2)
    ms = report.family_ms
    assert ms["scoring"] == ms["victim selection"] == ms["compaction/merge"] == 0
    assert ms["matmuls"] > 0 and ms["attention"] > 0 and ms["sampling"] > 0
    assert report.kv_bytes == 2 * 2 * 2 * 16 * 33.5 * 4  # 33 then 34 slots read


def test_hooks_and_wrappers_are_removed(tiny: Path) -> None:
    llm = engine.load(tiny, policy="h2o", budget=16)
    profile(llm, context=32, steps=1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in llm.model.modules())
    assert "decode_scores" not in vars(llm.policy)
    assert llm.generate("hello", max_new_tokens=2) is not None


def run_profile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.profile", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli(tiny: Path, tmp_path: Path) -> None:
    trace = tmp_path / "t.json"
    proc = run_profile("--model", str(tiny), "--policy", "h2o", "--budget", "16", "--context", "32", "--steps", "2",
                       "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    assert "victim selection" in proc.stdout and "tokens/s" in proc.stdout and json.loads(trace.read_text())
    for bad in (["--trace", str(tmp_path / "no" / "t.json")], ["--steps", "0"]):
        proc = run_profile("--model", str(tiny), *bad)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
