"""`python -m engine.bench allocation`: one policy at one total budget under each allocation rule (uniform,
adaptive, pyramid): decode step time as ratios to the first rule, timed in the same run (A B C A B C ...),
and the bytes of K and V each layer holds.

    python -m engine.bench allocation --policy h2o --budget 256 --contexts 1024 2048

Each step is timed as wall time and as the CPU time of the calling thread: on a machine shared with other
work the wall time carries whatever else ran, the thread's CPU time much less (run with one thread,
OMP_NUM_THREADS=1, for the CPU time to cover the whole step). The medians leave out the steps a pooled
store re-lays its rows in (AllocatedKVStore.relayout, every `relayout_every` steps): that cost is timed on
its own and spread over the steps between two, the `amortized` figures. The rules share one loaded model,
so the weights they read are the same bytes in memory.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ..cli import COUNT, NON_NEGATIVE, add_model_args, load_options, policy_params
from ..decode import decode_step
from ..generate import prefill
from ..policies import make_policy
from ..policies.base import ALLOCATIONS
from ..results import write_result
from .timing import sync, time_alternating


def layer_kv_bytes(store) -> list[int]:
    """Bytes of K and V each layer holds (a pooled store: its pool rows; else its slots)."""
    a, B = store.args, store.batch
    row = 2 * a.head_dim * store.kv_dtype.itemsize * B
    rows = getattr(store, "pool_rows", None) if getattr(store, "pooled", False) else None
    return [row * n for n in rows] if rows else [row * a.n_kv_heads * store.capacity] * a.n_layers


def step_timer(llm, ctx: int, steps: int, settle: int
               ) -> tuple[Callable[[], None], list[float], list[float], object, Callable[[int], None]]:
    """A callable that decodes `steps` tokens after a prompt of `ctx` tokens, prefilled once, then `settle`
    tokens decoded untimed; the wall and thread-CPU seconds of every step, the store, and a callable that
    decodes n more tokens untimed."""
    ids = torch.randint(100, 1000, (1, ctx), generator=torch.Generator().manual_seed(0)).to(llm.device)
    store = llm.new_store(ctx, llm.args.max_seq_len - ctx)
    live = {"token": prefill(llm.model, store, ids, llm.prefill_chunk).argmax(-1)}
    wall: list[float] = []
    cpu: list[float] = []

    def advance(n: int) -> None:
        for _ in range(n):
            live["token"] = decode_step(llm.model, store, live["token"]).argmax(-1)

    def run() -> None:
        token = live["token"]
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.thread_time()
            token = decode_step(llm.model, store, token).argmax(-1)
            sync(llm.device)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        live["token"] = token

    advance(settle)
    return run, wall, cpu, store, advance


def relayout_cpu_seconds(store, advance: Callable[[int], None], reps: int = 2) -> float:
    """Median thread-CPU seconds of a pooled store's look at its layout (AllocatedKVStore.look_at_layout: the
    relayout, where it is due) after the `relayout_every` steps it follows (decoded untimed here, with the
    store's own looks held off); 0.0 for a store that never looks."""
    every = getattr(store, "relayout_every", 0)
    if not every:
        return 0.0
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            store.relayout_every = 0
            advance(every)
            store.relayout_every = every
            c0 = time.thread_time()
            store.look_at_layout()
            sync(store.device)
            times.append(time.thread_time() - c0)
    return statistics.median(times)


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--allocations", default=",".join(ALLOCATIONS),
                   help="comma list of rules, the first the baseline of the ratios (default: uniform,adaptive,pyramid)")
    p.add_argument("--contexts", type=COUNT, nargs="+", default=[1024, 2048], help="prompt lengths (default 1024 2048)")
    p.add_argument("--steps", type=COUNT, default=16, help="decode steps timed per repetition (>= 1)")
    p.add_argument("--reps", type=COUNT, default=8, help="alternating rounds of the rules (>= 1)")
    p.add_argument("--settle", type=NON_NEGATIVE, default=256,
                   help="decode steps run untimed after the prompt (default 256): a pooled store's slot lists fill "
                        "up to their high-water mark, which the first steps after a prompt have not reached yet")


def run(ns: argparse.Namespace) -> int:
    import engine

    if ns.policy == "full" or ns.budget is None:
        raise ValueError("allocation needs an evicting --policy and its --budget (e.g. --policy h2o --budget 256)")
    ns.allocations = [a.strip() for a in ns.allocations.split(",") if a.strip()]
    bad = sorted(set(ns.allocations) - set(ALLOCATIONS)) or ([] if ns.allocations else [""])
    if bad:
        raise ValueError(f"--allocations: unknown rule {bad[0]!r}; use {', '.join(ALLOCATIONS)}")
    results: dict[str, object] = {}
    params = policy_params(ns)
    # one model for every rule (LLM.with_policy): where the allocator placed a second copy of the weights is not
    # a difference between the rules
    llm = engine.load(ns.model, policy=ns.policy, **load_options(ns), **{**params, "allocation": ns.allocations[0]})
    for ctx in ns.contexts:
        timers = {}
        for rule in ns.allocations:
            variant = llm.with_policy(make_policy(ns.policy, **{**params, "allocation": rule}))
            timers[rule] = step_timer(variant, ctx, ns.steps, ns.settle)
        time_alternating({rule: t[0] for rule, t in timers.items()}, reps=ns.reps, warmup=1)
        base = ns.allocations[0]
        cell = {}
        for rule, (_, wall, cpu, store, advance) in timers.items():
            timed = slice(ns.steps, None)  # the warm-up round left out
            w, c = statistics.median(wall[timed]), statistics.median(cpu[timed])
            every, relayout = getattr(store, "relayout_every", 0), relayout_cpu_seconds(store, advance)
            cell[rule] = {"step_wall_s": w, "step_cpu_s": c, "layer_kv_bytes": layer_kv_bytes(store),
                          "kv_bytes": sum(layer_kv_bytes(store)), "slots": store.capacity, "slots_used": store.used,
                          "relayout_every": every, "relayout_cpu_s": relayout,
                          "step_cpu_amortized_s": c + (relayout / every if every else 0.0)}
        for rule in ns.allocations:
            cell[rule]["wall_ratio"] = cell[rule]["step_wall_s"] / cell[base]["step_wall_s"]
            cell[rule]["cpu_ratio"] = cell[rule]["step_cpu_s"] / cell[base]["step_cpu_s"]
            cell[rule]["amortized_cpu_ratio"] = cell[rule]["step_cpu_amortized_s"] / cell[base]["step_cpu_amortized_s"]
            print(f"{ns.policy} budget {ns.budget} ctx {ctx} {rule:>9}: {cell[rule]['step_wall_s'] * 1e3:7.2f} ms wall "
                  f"({cell[rule]['wall_ratio']:.3f}x), {cell[rule]['step_cpu_s'] * 1e3:7.2f} ms cpu "
                  f"({cell[rule]['cpu_ratio']:.3f}x), amortized {cell[rule]['amortized_cpu_ratio']:.3f}x, "
                  f"KV {cell[rule]['kv_bytes'] / 2**20:.2f} MiB", flush=True)
        results[str(ctx)] = cell
    # the policy's parameters as run (a receiver, a threshold: what tells two runs of one policy apart)
    recorded = {k: v for k, v in params.items() if v is not None}
    path = write_result(f"allocation-{ns.policy}", {"policy": ns.policy, "budget": ns.budget, "policy_params": recorded,
                                                    "steps": ns.steps, "reps": ns.reps, "settle": ns.settle,
                                                    "allocations": ns.allocations,
                                                    "results": results})
    print(f"wrote {path}")
    return 0
