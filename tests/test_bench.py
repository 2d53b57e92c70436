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


def test_allocation_bench_records_the_policy_it_ran(tiny_model_dir: Path, results_dir: Path) -> None:
    """Every rule's step times and ratios, the same KV bytes under each rule, and the policy's parameters
    (two runs of one policy with other receivers must be told apart by their JSON)."""
    assert bench_main(["allocation", "--model", str(tiny_model_dir), "--policy", "weightedkv", "--receiver", "prev",
                       "--recent", "2", "--budget", "16", "--contexts", "40", "--steps", "2", "--reps", "1",
                       "--settle", "5"]) == 0
    doc = only_result(results_dir, "allocation-weightedkv")
    assert doc["policy_params"]["receiver"] == "prev" and doc["policy_params"]["budget"] == 16
    assert doc["settle"] == 5
    cell = doc["results"]["40"]
    assert list(cell) == ["uniform", "adaptive", "pyramid"]
    assert len({c["kv_bytes"] for c in cell.values()}) == 1
    for c in cell.values():
        assert 0 < c["slots_used"] <= c["slots"]
        assert c["cpu_ratio"] == pytest.approx(c["step_cpu_s"] / cell["uniform"]["step_cpu_s"])
        assert c["wall_ratio"] == pytest.approx(c["step_wall_s"] / cell["uniform"]["step_wall_s"])


def test_vs_transformers(tiny_model_dir: Path, results_dir: Path) -> None:
    """The default mode (engine vs transformers vs the floor) on the tiny model: every derived figure is
    the one its inputs give (bytes per step from the model's shapes, ratios from the medians)."""
    from engine.config import load_config_json

    assert bench_main(["--model", str(tiny_model_dir), "--contexts", "16", "40", "--steps", "2", "--reps", "1"]) == 0
    doc = only_result(results_dir, "e2e-vs-transformers")["results"]
    args = load_config_json(tiny_model_dir / "config.json")
    read_bw, weights = doc["read_bytes_per_s"], doc["weight_bytes"]
    assert read_bw > 0 and weights == sum(
        4 * n for n in (args.vocab_size * args.dim, args.dim,  # output, final norm (fp32)
                        args.n_layers * (args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
                                         + args.n_heads * args.head_dim * args.dim + 3 * args.dim * args.hidden_dim
                                         + 2 * args.dim)))
    for ctx in ("16", "40"):
        r = doc[ctx]
        e, h, f = (r[k]["median"] for k in ("engine_decode_s", "transformers_decode_s", "floor_step_s"))
        assert r["kv_bytes"] == 2 * args.n_layers * args.n_kv_heads * args.head_dim * 4 * (int(ctx) + 1)
        assert r["decode_speedup_vs_transformers"] == pytest.approx(h / e)
        assert r["decode_vs_floor"] == pytest.approx(e / f)
        assert r["floor_with_kv_step_s"] == pytest.approx(f * (1 + r["kv_bytes"] / weights))
        assert r["decode_vs_floor_with_kv"] == pytest.approx(e / r["floor_with_kv_step_s"])
        assert r["decode_vs_floor_with_kv"] < r["decode_vs_floor"]
        assert r["engine_decode_bytes_per_s"] == pytest.approx((weights + r["kv_bytes"]) / e)
        assert r["engine_decode_of_read_bw"] == pytest.approx(r["engine_decode_bytes_per_s"] / read_bw)


def test_kernels_bench(results_dir: Path) -> None:
    assert bench_main(["kernels", "--contexts", "33", "--reps", "1"]) == 0
    doc = only_result(results_dir, "kernels")
    for layout in ("llama-2-7b", "smollm2"):
        assert set(doc["results"][layout]["decode"]) == {"33"}
    rss = doc["results"]["prefill_peak_rss_bytes"]
    assert rss["8192"] > 0  # the kernel's working set above its inputs is measured, not lost in an earlier peak


def test_gpu_mode_without_a_gpu_says_so(capsys) -> None:
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present: the mode would run")
    with pytest.raises(SystemExit, match="torch sees no CUDA GPU"):
        bench_main(["gpu"])


@pytest.mark.parametrize("argv", [["kernels", "--policy", "h2o"], ["gpu", "--model", "x"], ["--preset", "x"],
                                  ["model", "--preset", "x"]])
def test_a_flag_of_another_mode_is_refused(argv: list[str], capsys) -> None:
    """Each subcommand takes only its own flags (flags alone mean `model`): one that would do nothing there
    is an error that names it."""
    with pytest.raises(SystemExit) as exit_info:
        bench_main(argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {' '.join(argv[-2:])}" in capsys.readouterr().err


def test_a_budget_the_table_would_ignore_is_refused() -> None:
    with pytest.raises(ValueError, match="--budgets sets the budgets of a --policies table"):
        bench_main(["--budgets", "16"])
    with pytest.raises(ValueError, match="not --budget"):
        bench_main(["--policies", "h2o", "--budget", "16"])


@pytest.mark.parametrize("name", ["full", "h2o", "weightedkv", "streaming"])
def test_gpu_bench_fills_the_cache_as_after_the_context(name) -> None:
    """The synthetic fill of `engine.bench gpu` (run here on the CPU): the counters, clock and positions of
    a store that has seen `ctx` tokens, from which decode steps then run and evict like any other."""
    import torch

    from engine.bench.gpu import filled_store
    from engine.decode import decode_step
    from engine.rope import Rope
    from engine.policies import make_policy

    from .helpers import small, tiny_model

    model = tiny_model()
    model.rope = model.rope or Rope(model.args, torch.device("cpu"))
    ctx, budget, steps = 300, 24, 5
    policy = make_policy("full") if name == "full" else small(name, budget)
    store = filled_store(model, policy, ctx, steps)
    kept = ctx if name == "full" else budget
    assert (store.t, store.used, store.occupancy) == (ctx, kept, kept)
    assert store.clock.tolist() == [ctx, kept, store.qpos]
    pos = store.all.pos[:, :, :kept]
    assert bool((store.all.pos[:, :, kept:] == -1).all()) and bool((pos >= 0).all())
    assert bool((pos[..., 1:] > pos[..., :-1]).all()) and int(pos.max()) == ctx - 1  # ordered, newest kept
    assert bool((pos[..., : policy.sinks] == torch.arange(policy.sinks)).all())
    if name == "streaming":  # the sinks, then the newest tokens
        assert bool((pos[..., policy.sinks :] == torch.arange(ctx - kept + policy.sinks, ctx)).all())
    for _ in range(steps):
        decode_step(model, store, torch.tensor([3]))
    assert store.t == ctx + steps and store.occupancy == (kept + steps if name == "full" else budget)
    assert store.stats().evictions == (0 if name == "full" else steps)


def test_serve_peer_needs_a_gguf_file(tiny_model_dir: Path, capsys) -> None:
    """A folder model has no file for llama.cpp's server to load: the peer is skipped in one line, before any
    server starts."""
    from engine.bench.serve import peer_gguf

    assert peer_gguf(str(tiny_model_dir), "llama.cpp") is None
    out = capsys.readouterr()
    assert out.out == f"llama.cpp peer skipped: it needs a .gguf file and --model {tiny_model_dir} is a folder\n"
    assert out.err == ""


def test_llama_cpp_without_the_package_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # import llama_cpp now fails
    with pytest.raises(SystemExit, match=r"^engine.bench llama.cpp: llama_cpp is not installed"):
        bench_main(["llama.cpp", "--tokens", "2"])


def test_llama_cpp_flags() -> None:
    """`llama.cpp` names the llamacpp subcommand; --weights/--kv-dtype reach engine.load only when given."""
    from engine.bench import parse_args
    from engine.bench.llamacpp import load_kwargs

    ns = parse_args(["llama.cpp"])
    assert (ns.command, ns.contexts, ns.tokens, ns.threads, ns.budget) == ("llamacpp", [128, 2048, 8192], 32, 2, 256)
    assert load_kwargs(ns) == {}
    ns = parse_args(["llama.cpp", "--weights", "packed", "--kv-dtype", "q8_0", "--contexts", "64", "--reps", "1"])
    assert load_kwargs(ns) == {"weights": "packed", "kv_dtype": "q8_0"} and ns.contexts == [64]


def test_llama_cpp_prompt_is_real_text_cut_to_length() -> None:
    from engine.bench.llamacpp import FALLBACK_TEXT, prompt_ids

    def encode(text: str) -> list[int]:
        return [ord(c) for c in text[:50]]

    assert prompt_ids(encode, 120, FALLBACK_TEXT) == (encode(FALLBACK_TEXT) * 3)[:120]


@pytest.mark.slow
def test_llama_cpp_bench_runs(results_dir: Path) -> None:
    """Both engines end to end on the default GGUF, a few tokens: every cell has its times and ratios."""
    pytest.importorskip("llama_cpp")
    assert bench_main(["llama.cpp", "--contexts", "40", "300", "--tokens", "3", "--reps", "1", "--budget", "64"]) == 0
    doc = only_result(results_dir, "llama-cpp")
    assert doc["contexts"] == [40, 300] and set(doc["results"]) == {"40", "300", "prefill_512"}
    assert set(doc["results"]["300"]) >= {"ours", "llama.cpp", "ours_h2o", "h2o_vs_llama_cpp_full"}
    for row in (doc["results"]["40"], doc["results"]["300"]):
        o, t = row["ours"], row["llama.cpp"]
        assert row["decode_speed_vs_llama_cpp"] == pytest.approx(o["tok_s"] / t["tok_s"])
    assert all(v > 0 for k, v in doc["peak_rss_bytes"].items())
