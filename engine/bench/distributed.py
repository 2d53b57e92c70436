"""`python -m engine.bench distributed`: tensor-parallel decode on the CPU at 1, 2, 3 ... ranks, with the
time spent in collectives, and the output head split by vocabulary vs replicated (bench/DISTRIBUTED.md).

    python -m engine.bench distributed --ranks 1,2,3 --rounds 3

The driver starts `torchrun --standalone` once per rank count and round, alternating the rank counts
(1 2 3 1 2 3 ...) so that the machine's load hits them alike. Each run loads the model once per head
layout, prefills --context tokens and times --steps decode steps per layout, alternating the layouts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from ..cli import COUNT, CommaList, Integer, add_model_args, load_options
from ..results import write_result


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--ranks", type=CommaList(Integer(1)), default=[1, 2, 3], help="rank counts (default 1,2,3)")
    p.add_argument("--rounds", type=COUNT, default=3, help="alternating runs per rank count (>= 1)")
    p.add_argument("--context", type=COUNT, default=256, help="prompt tokens before the timed steps")
    p.add_argument("--steps", type=COUNT, default=32, help="decode steps timed per layout and block")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one torchrun'd run


def worker(ns: argparse.Namespace) -> dict[str, dict[str, float]]:
    """This run's step times per output-head layout (median ms, collectives' ms and count per step)."""
    from ..decode import Decoder
    from ..dist import TensorParallel, init_from_env, rank
    from ..generate import prefill
    from ..llm import load

    layouts = {"one process": False}
    if init_from_env(ns.device):
        layouts = {"vocab-split head": TensorParallel(split_vocab=True), "replicated head": TensorParallel(split_vocab=False)}
    runs = {}
    ids = torch.randint(100, 1000, (1, ns.context), generator=torch.Generator().manual_seed(0))
    for name, tp in layouts.items():
        llm = load(ns.model, policy="full", tensor_parallel=tp, **load_options(ns))
        store = llm.new_store(ns.context, ns.steps * 8 + 8)
        token = prefill(llm.model, store, ids).argmax(-1)
        runs[name] = (Decoder(llm.model, store).step, token, llm.model.tp)
    stats: dict[str, dict[str, list[float]]] = {n: {"step": [], "collective": [], "calls": []} for n in runs}
    for _ in range(4):  # blocks of steps, the layouts alternating
        for name, (step, token, tp) in runs.items():
            seconds, calls = (tp.seconds, tp.calls) if tp else (0.0, 0)
            t0 = time.perf_counter()
            for _ in range(ns.steps):
                token = step(token).argmax(-1)
            stats[name]["step"].append((time.perf_counter() - t0) / ns.steps)
            if tp:
                stats[name]["collective"].append((tp.seconds - seconds) / ns.steps)
                stats[name]["calls"].append((tp.calls - calls) / ns.steps)
            runs[name] = (step, token, tp)
    out = {name: {"step_ms": 1e3 * statistics.median(s["step"]),
                  "collective_ms": 1e3 * statistics.median(s["collective"] or [0.0]),
                  "collectives_per_step": statistics.median(s["calls"] or [0.0])} for name, s in stats.items()}
    if tp is not None:  # the floor: one residual row's all-gather with no compute between (latency, not waiting)
        row = torch.zeros(1, llm.args.dim)
        for _ in range(20):
            tp.gather(row)
        t0 = time.perf_counter()
        for _ in range(200):
            tp.gather(row)
        out["bare all_gather of one residual row"] = {"ms": 1e3 * (time.perf_counter() - t0) / 200}
    return out if rank() == 0 else {}


def run(ns: argparse.Namespace) -> int:
    if ns.worker:
        print(json.dumps(worker(ns)))
        return 0
    flags = [a for a in sys.argv[1:] if a != "distributed"]
    runs: dict[int, list[dict]] = {n: [] for n in ns.ranks}
    for _ in range(ns.rounds):
        for n in ns.ranks:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   "-m", "engine.bench", "distributed", *flags, "--worker"]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if done.returncode:
                said = [line for line in done.stderr.splitlines() if line.startswith("error:")]
                raise ValueError(f"{n} ranks: {said[0][7:] if said else 'torchrun failed'}")
            runs[n].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{n} ranks: {runs[n][-1]}", flush=True)
    summary = {n: {layout: {k: statistics.median(r[layout][k] for r in rs) for k in rs[0][layout]}
                   for layout in rs[0]} for n, rs in runs.items()}
    path = write_result("distributed-decode", {"model": ns.model, "weights": ns.weights, "context": ns.context,
                                               "steps": ns.steps, "rounds": ns.rounds,
                                               "omp_threads_per_rank": os.environ.get("OMP_NUM_THREADS", "1"),
                                               "summary": summary, "runs": runs})
    print(json.dumps(summary, indent=1))
    print(f"results: {path}")
    return 0
