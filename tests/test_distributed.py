"""Tensor parallelism and sharded evaluation on gloo, the ranks started here (plain env:// processes, and
torchrun for the CLIs), each bounded in time. The single-process reference runs the same code in this
process (tests/dist_worker.py)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import engine
from engine.config import ModelArgs
from engine.dist import Shard, ShardError
from engine.policies import make_policy
from engine.quant import PackedWeight
from engine.weights import WeightsError, expected_shapes, load_checkpoint, save_hf_folder

from .dist_worker import engine_policies, mean_inputs, policy_runs, prompt_logits
from .helpers import random_state, tiny_args
from .test_weights import META_PARAMS, Q, write_gguf, write_meta

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 20  # ENGINE_DIST_TIMEOUT of the ranks started here
RUN_LIMIT_S = 240  # a launch that takes longer failed (a hang)
REL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ENGINE_DIST_TIMEOUT": str(TIMEOUT_S), "PYTHONPATH": str(ROOT),
            **extra}


def start(n: int, args: list[str], stdin: Any = subprocess.DEVNULL, **extra: str) -> list[subprocess.Popen]:
    """n ranks of `python args`, joined through env:// (what torchrun sets); rank 0 reads `stdin` (a file or
    descriptor), the others nothing. `extra`: more environment."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, *args], cwd=ROOT, stdin=subprocess.DEVNULL if r else stdin,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                                     MASTER_PORT=port, **extra))
            for r in range(n)]


def finish(procs: list[subprocess.Popen], limit: float = RUN_LIMIT_S) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of every rank; a rank still running past `limit` is killed and fails the test."""
    out, deadline = [], time.monotonic() + limit
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank still ran after {limit} s")
        out.append((p.returncode, o, e))
    return out


@contextlib.contextmanager
def ending(procs: list[subprocess.Popen]) -> Iterator[list[subprocess.Popen]]:
    """The ranks, killed if the test fails while they run (a server would run on)."""
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           *args], cwd=ROOT, capture_output=True, text=True, env=env(), timeout=RUN_LIMIT_S)


@pytest.fixture(scope="module")
def tiny8(default_model_dir, tmp_path_factory) -> Path:
    """A random 2-layer model with 8 heads and 4 KV heads (the default model's tokenizer)."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, hidden_dim=96, vocab_size=49152, max_seq_len=512)
    g = torch.Generator().manual_seed(0)
    state = {name: 1 + 0.1 * torch.randn(shape, generator=g) if len(shape) == 1
             else torch.randn(shape, generator=g) / shape[-1] ** 0.5 for name, shape in expected_shapes(args).items()}
    dst = save_hf_folder(args, state, tmp_path_factory.mktemp("tp") / "tiny8")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, dst / name)
    return dst


def compare(one: dict[str, torch.Tensor], ranks: list[dict[str, torch.Tensor]]) -> int:
    """Logits within REL of one process on every rank; every policy's slots hold the same positions. Returns
    the number of (layer, KV head) slot rows that differ (near-tie flips), reported, expected none or a handful."""
    flips = 0
    for key, want in one.items():
        if key.startswith("pos/"):
            got = torch.cat([r[key] for r in ranks], dim=1)  # each rank holds its KV heads
            assert got.shape == want.shape, key
            differ = int((got != want).any(-1).sum())
            if differ:
                print(f"near-tie flip: {key}: {differ} (layer, KV head) rows keep other positions")
            flips += differ
        else:
            for r, got in enumerate(ranks):
                err = float((got[key] - want).abs().max() / want.abs().max())
                assert err <= REL, f"{key} on rank {r}: relative error {err:.2e}"
    return flips


def dense(w: torch.Tensor | PackedWeight) -> torch.Tensor:
    return w.dequantize() if isinstance(w, PackedWeight) else w


def assert_shards_are_slices(path: Path, n: int, **load: object) -> None:
    """Every rank's weights are exactly its rows or columns of the whole model's (q/k un-permuted per head)."""
    args, whole, _ = load_checkpoint(path, **load)
    for r in range(n):
        shard = Shard(r, n)
        got_args, part, _ = load_checkpoint(path, shard=shard, **load)
        assert got_args == args and part.keys() == whole.keys()
        for name, w in whole.items():
            cut, want = shard.cut(name, args), dense(w)
            if cut is not None:
                want = want[cut.start : cut.stop] if cut.axis == 0 else want[:, cut.start : cut.stop]
            assert isinstance(part[name], PackedWeight) == isinstance(w, PackedWeight), name
            assert torch.equal(dense(part[name]), want), f"{name} on rank {r} of {n}"


@pytest.mark.parametrize("fmt", ["hf", "meta-2-files", "gguf-f32", "gguf-q4_0-packed", "gguf-q8_0-dequantized"])
def test_each_rank_reads_exactly_its_slices(tmp_path, fmt):
    args = ModelArgs.from_meta_params(META_PARAMS, vocab_size=128) if fmt.startswith("meta") else tiny_args(
        hidden_dim=128)  # 64 hidden units per rank: whole Q4_0/Q8_0 blocks of w2's rows
    sd = random_state(args)
    if fmt == "hf":
        path = save_hf_folder(args, sd, tmp_path / "m")
    elif fmt.startswith("meta"):
        write_meta(tmp_path, args, sd, 2)
        path = tmp_path
    else:
        qtype = {"gguf-f32": Q.F32, "gguf-q4_0-packed": Q.Q4_0, "gguf-q8_0-dequantized": Q.Q8_0}[fmt]
        path = write_gguf(tmp_path / "m.gguf", args, sd, qtype)
    assert_shards_are_slices(path, 2, **({"weights": "dequantize"} if fmt.endswith(("dequantized", "f32")) else {}))


def test_packed_rows_split_inside_a_block_are_refused_or_dequantized(tmp_path):
    """w2's 96 hidden units over 2 ranks: 48 columns each, not whole Q4_0 blocks of 32."""
    args = tiny_args()
    path = write_gguf(tmp_path / "m.gguf", args, random_state(args), Q.Q4_0)
    with pytest.raises(WeightsError, match=r"ffn_down.weight: its Q4_0 blocks of 32 weights do not split into this "
                                           r"rank's columns \[0, 48\); use another number of ranks or load with "
                                           r"--weights dequantize"):
        load_checkpoint(path, shard=Shard(0, 2))
    assert_shards_are_slices(path, 2, weights="dequantize")


def test_heads_not_divisible_is_one_clear_error():
    with pytest.raises(ShardError, match=r"^cannot split the model over 2 tensor-parallel ranks: n_heads 9, "
                                         r"n_kv_heads 3 not divisible by 2 \(whole heads per rank; sizes that "
                                         r"divide: 1, 3\)$"):
        Shard(0, 2).local_args(ModelArgs(dim=576, n_heads=9, n_kv_heads=3, hidden_dim=1536))


def test_small_model_two_ranks_same_logits_and_slots_for_every_policy(tiny8, tmp_path):
    """8 heads / 4 KV heads at 2 ranks, 100 decode steps, every policy, both position modes (a 200-step run
    is in bench/DISTRIBUTED.md)."""
    procs = start(2, ["-m", "tests.dist_worker", "policies", str(tiny8), str(tmp_path), "100"])
    one = policy_runs(engine.load(tiny8, policy="full", weights="dequantize"), 100)  # meanwhile, the reference
    for rc, _, err in finish(procs):
        assert rc == 0, err
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["pos/tova/original"].shape[1] == 2 for r in ranks)  # each rank stores only its 2 KV heads
    assert compare(one, [{k: v for k, v in r.items() if k != "prompt_logits"} for r in ranks]) == 0


def test_default_model_three_ranks(default_model_dir, tmp_path):
    """The real model (9 heads, 3 KV heads) at 3 ranks: a prompt's logits, and after a prompt compressed to
    the budget and STEPS decode steps that each evict, every policy in both position modes keeps the same
    positions with the same logits. (100 steps run on the small model above: 3 ranks on 2 cores make the real
    model's steps slow, 200 of them ~20 min, run by hand: bench/DISTRIBUTED.md. The ranks' start and load take
    most of this test's time.)"""
    steps = 6
    procs = start(3, ["-m", "tests.dist_worker", "policies", str(default_model_dir), str(tmp_path), str(steps)])
    llm = engine.load(default_model_dir, policy="full", weights="dequantize")
    one = policy_runs(llm, steps) | {"prompt_logits": prompt_logits(llm)}
    for rc, _, err in finish(procs):
        assert rc == 0, err
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    assert len([k for k in one if k.startswith("pos/")]) == 2 * len(engine_policies()) >= 20
    assert compare(one, ranks) == 0


def test_greedy_chat_under_torchrun_equals_one_process(tiny8):
    args = ["-m", "engine.chat", "--model", str(tiny8), "--prompt", "Name three colours.", "--temperature", "0",
            "--max-new-tokens", "16", "--weights", "dequantize"]
    one = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env(), timeout=120)
    two = torchrun(2, args)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert one.stdout.strip() and two.stdout == one.stdout  # printed once, by rank 0


CHAT = ["-m", "engine.chat", "--temperature", "0", "--max-new-tokens", "12", "--weights", "dequantize"]


def test_interactive_chat_at_two_ranks_is_the_one_process_session(tiny8, tmp_path):
    """Rank 0 reads the terminal for both ranks: two turns, a command, a refused line, Ctrl-D. Its screen and
    transcript are one process's (only it prints and writes); every rank exits 0."""
    lines = "Name three colours.\n/system Be brief.\n\udcff\nAnd a fourth?\n/help\n"
    typed = tmp_path / "typed.txt"
    typed.write_text(lines, errors="surrogateescape")
    args = [*CHAT, "--model", str(tiny8)]

    def run_one(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args, "--transcript", str(out)], cwd=ROOT, stdin=typed.open(),
                              capture_output=True, text=True, env=env(), timeout=120)

    def records(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]

    one = run_one(tmp_path / "one.jsonl")
    with typed.open() as stdin:
        (rc0, out0, err0), (rc1, out1, err1) = finish(start(2, [*args, "--transcript", str(tmp_path / "two.jsonl")],
                                                            stdin))
    assert one.returncode == rc0 == rc1 == 0, err0 + err1
    assert out0 == one.stdout and out0.count(">>> ") == 6 and "(new conversation; system: Be brief.)" in out0
    assert err0 == one.stderr and "it was not sent" in err0 and not out1 and not err1
    assert records(tmp_path / "two.jsonl") == records(tmp_path / "one.jsonl")
    assert [r.get("role") for r in records(tmp_path / "one.jsonl")].count("assistant") == 2


def test_interactive_chat_ctrl_c_outwaiting_the_timeout_and_rank_zero_killed(tiny8, tmp_path):
    """Ctrl-C (SIGINT to rank 0) stops a long reply on both ranks at the same piece; a person then thinks
    longer than ENGINE_DIST_TIMEOUT and the other rank waits; the next turn runs whole; then rank 0 is killed
    at the prompt and the other rank ends at once with one clear line."""
    transcript, timeout = tmp_path / "t.jsonl", 8

    def replies() -> list[dict]:
        lines = transcript.read_text().splitlines() if transcript.exists() else []
        return [r for r in map(json.loads, lines) if r.get("role") == "assistant"]

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + RUN_LIMIT_S
        while len(replies()) < n:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no reply came"
            time.sleep(0.1)

    read, write = os.pipe()
    procs = start(2, [*CHAT, "--model", str(tiny8), "--policy", "h2o", "--budget", "16", "--max-new-tokens", "400",
                      "--transcript", str(transcript)], read, ENGINE_DIST_TIMEOUT=str(timeout))
    os.close(read)
    os.write(write, b"Tell me a long story.\n")
    while '"role": "user"' not in (transcript.read_text() if transcript.exists() else ""):
        assert all(p.poll() is None for p in procs), "a rank ended"
        time.sleep(0.1)
    time.sleep(0.5)  # the reply streams
    os.kill(procs[0].pid, signal.SIGINT)
    wait_for(1)
    time.sleep(timeout + 2)  # thinking
    os.write(write, b"And a fourth?\n")
    wait_for(2)
    os.kill(procs[0].pid, signal.SIGKILL)
    t0 = time.monotonic()
    _, (rc, out, err) = finish(procs, limit=TIMEOUT_S)
    os.close(write)
    assert time.monotonic() - t0 < TIMEOUT_S, "the other rank waited for a timeout"  # its own is 30 days
    first, second = replies()
    assert first["stopped"] == "interrupted" and 0 < first["tokens"] < 400 and second["stopped"] == "length", first
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: rank 1: waiting for rank 0's next line "
                                                               "failed ("), err
    assert lines[0].endswith("; a rank died") and not out


def test_server_at_two_ranks_answers_as_one_process(tiny8):
    """engine.serve among 2 ranks: rank 0 serves and schedules, rank 1 follows its plans. Concurrent requests
    (two policies, streamed and not, one refused) get one process's greedy answers; SIGTERM to rank 0 ends
    both ranks with exit 0."""
    openai = pytest.importorskip("openai")
    port = free_port()
    with ending(start(2, ["-m", "engine.serve", "--model", str(tiny8), "--weights", "dequantize", "--port",
                          str(port)])) as procs:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=60)
        llm = engine.load(tiny8, weights="dequantize")
        asks = [("Name three colours.", "full", {}), ("What is two plus two?", "h2o", dict(budget=8, recent=2)),
                ("Name three colours.", "tova", dict(budget=12))]
        want = [llm.with_policy(make_policy(p, **kw)).chat([{"role": "user", "content": q}], max_new_tokens=10,
                                                             temperature=0.0) for q, p, kw in asks]
        wait_until_serving(client, procs)

        def ask(i: int) -> str:
            q, p, kw = asks[i % len(asks)]
            r = client.chat.completions.create(model="tiny8", messages=[{"role": "user", "content": q}], max_tokens=10,
                                               temperature=0, stream=i >= len(asks), extra_body={"policy": p, **kw})
            if i < len(asks):
                return r.choices[0].message.content
            return "".join(c.choices[0].delta.content or "" for c in r)

        with concurrent.futures.ThreadPoolExecutor(2 * len(asks)) as pool:
            got = list(pool.map(ask, range(2 * len(asks)), timeout=RUN_LIMIT_S))
        with pytest.raises(openai.BadRequestError, match="unknown policy"):
            client.chat.completions.create(model="tiny8", messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"policy": "lru"})
        assert got == want * 2
        procs[0].send_signal(signal.SIGTERM)
        for rc, _, err in finish(procs, limit=TIMEOUT_S):
            assert rc == 0, err


def test_server_stops_with_one_line_when_a_follower_dies(tiny8):
    """Rank 1 killed under a serving rank 0: the next request fails (503) and the server stops, exit 2, one line."""
    openai = pytest.importorskip("openai")
    port = free_port()
    with ending(start(2, ["-m", "engine.serve", "--model", str(tiny8), "--weights", "dequantize", "--port",
                          str(port)])) as procs:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=60)
        wait_until_serving(client, procs)
        os.kill(procs[1].pid, signal.SIGKILL)
        with pytest.raises(openai.APIStatusError, match="shutting down"):
            client.chat.completions.create(model="tiny8", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
        (rc, out, err), _ = finish(procs, limit=TIMEOUT_S)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: rank 0: "), err
    assert "failed" in lines[0] and not out


def wait_until_serving(client: Any, procs: list[subprocess.Popen]) -> None:
    import openai

    deadline = time.monotonic() + RUN_LIMIT_S
    while True:
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the server did not start"
            time.sleep(0.3)


def test_sharded_eval_sweep_writes_the_cells_of_one_process(tiny8, tmp_path):
    """2 ranks, first half a sweep, then the whole sweep resumed from it: the cells of one process."""
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
                    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity. " * 2)
    args = ["-m", "engine.eval", "ppl", "--text", str(text), "--tokens", "40", "--model", str(tiny8)]
    grid = ["--policies", "full,h2o,tova,snapkv", "--budgets", "12,20", "--w", "4"]
    one = subprocess.run([sys.executable, *args, *grid, "--out", str(tmp_path / "one.json")], cwd=ROOT,
                         capture_output=True, text=True, env=env(), timeout=120)
    assert one.returncode == 0, one.stderr
    for sweep in (["--policies", "h2o,tova", "--budgets", "12"], grid):
        for rc, _, err in finish(start(2, [*args, *sweep, "--out", str(tmp_path / "two.json")])):
            assert rc == 0, err

    def cells(name: str) -> list[dict]:
        timing = ("seconds", "tokens_per_s")
        got = [{k: v for k, v in c.items() if k not in timing} for c in json.loads((tmp_path / name).read_text())["cells"]]
        return sorted(got, key=lambda c: (c["policy"], c["budget"] or 0))

    assert len(cells("one.json")) == 7 and cells("two.json") == cells("one.json")


def test_heads_not_divisible_one_line_on_rank_zero_all_exit(tiny8):
    results = finish(start(3, ["-m", "engine.chat", "--model", str(tiny8), "--prompt", "hi"]), limit=120)
    assert all(rc == 2 for rc, _, _ in results)
    lines = [line for line in results[0][2].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot split the model over 3 tensor-parallel ranks"), lines
    assert "n_heads 8" in lines[0] and "n_kv_heads 4" in lines[0] and "sizes that divide: 1, 2, 4" in lines[0]
    assert all("error" not in err for _, _, err in results[1:])


def test_a_killed_rank_ends_every_rank_with_a_clear_error(tiny8, tmp_path):
    procs = start(2, ["-m", "tests.dist_worker", "decode-forever", str(tiny8), str(tmp_path)])
    deadline = time.monotonic() + RUN_LIMIT_S
    while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "ranks did not start decoding"
        time.sleep(0.2)
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    (rc, _, err), _ = finish(procs, limit=TIMEOUT_S + 30)
    assert time.monotonic() - t0 < TIMEOUT_S + 30
    assert rc == 2 and "error: rank 0:" in err and "failed" in err, err
    assert "Traceback" not in err


def test_mean_over_every_ranks_heads_is_the_one_process_mean_bit_for_bit(tiny8, tmp_path):
    """TensorParallel.mean_heads (TOVA's layer-wide score) at 2 ranks equals x.mean(1) of one process exactly,
    where the sum of the two ranks' partial sums does not."""
    for rc, _, err in finish(start(2, ["-m", "tests.dist_worker", "mean-heads", str(tiny8), str(tmp_path)])):
        assert rc == 0, err
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, x in mean_inputs().items():
        want = x.mean(1, keepdim=True)
        assert all(torch.equal(r[key], want) for r in ranks), key
    x, h = mean_inputs()["(1, 64, 5, 3)"], 32
    partial_sums = (x[:, :h].sum(1, keepdim=True) + x[:, h:].sum(1, keepdim=True)) / 64
    assert not torch.equal(partial_sums, x.mean(1, keepdim=True))


def test_ranks_that_load_differently_stop_with_one_line(tiny8, tmp_path):
    """Rank 1 loads the model in bfloat16, rank 0 in float32 (the real loading path compares the settings):
    one line, said by rank 0, and every rank exits."""
    results = finish(start(2, ["-m", "tests.dist_worker", "load", str(tiny8), str(tmp_path), "float32,bfloat16"]),
                     limit=120)
    assert [rc for rc, _, _ in results] == [2, 2]
    lines = results[0][2].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the tensor-parallel ranks disagree on the model and how "
                                                   "it is loaded: rank 0 has ('tiny8', "), lines
    assert lines[0].endswith("'torch.bfloat16'); start every rank with the same command") and not results[1][2]


def test_one_process_joins_no_group_and_calls_no_collective(tiny8, monkeypatch):
    """Without torchrun nothing of engine.dist runs: no process group, no TensorParallel in the model or store."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    llm = engine.load(tiny8, policy="tova", budget=16)
    assert llm.model.tp is None and llm.model.vocab_cut is None
    assert llm.new_store(8, 8).tp is None and not torch.distributed.is_initialized()


def test_refusals_without_the_ranks_they_need_are_one_clear_line(monkeypatch):
    """A bad collective timeout and --tp in one process: each a ValueError naming what to do (run_cli prints it
    as one line), before any model loads."""
    from engine.dist.launch import timeout_s
    from engine.dist.sweep import workers

    monkeypatch.setenv("ENGINE_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="ENGINE_DIST_TIMEOUT must be a number of seconds > 0, got 'soon'"):
        timeout_s()
    monkeypatch.delenv("ENGINE_DIST_TIMEOUT")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="--tp 2 needs 2 or a multiple of ranks, started by torchrun"):
        workers(2)


def test_adaptive_allocation_is_refused_under_tensor_parallelism(tiny8):
    """Adaptive allocation ranks every KV head of a layer against the others: under tensor parallelism (a
    real gloo group, of one rank here) the store refuses it with one line; pyramid is per head and runs."""
    from engine.dist import TensorParallel
    from engine.policies import PolicyError, make_policy

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        llm = engine.load(tiny8, policy="h2o", budget=16)
        llm.model.tp = TensorParallel()
        llm.policy = make_policy("h2o", budget=16, allocation="adaptive")
        with pytest.raises(PolicyError, match="allocation 'adaptive' compares all KV heads of a layer and is not "
                                              "supported under tensor parallelism"):
            llm.new_store(8, 8)
        llm.policy = make_policy("h2o", budget=16, allocation="pyramid")
        assert llm.new_store(8, 8).tp is llm.model.tp
    finally:
        torch.distributed.destroy_process_group()
