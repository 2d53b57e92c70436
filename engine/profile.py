"""`python -m engine.profile`: where a decode step's time goes, by op family, under torch.profiler.

    python -m engine.profile --policy h2o --budget 256 --context 2048 --steps 16 --trace trace.json

It prefills a random context-N prompt, then runs K decode steps twice: once plain (tokens/s and the
achieved bandwidth: weight + KV bytes read per step / step time) and once under torch.profiler with
record_function ranges around the cache's and policy's work (and the model's stages in the prefill),
which gives the table of time per op family per step. Our kernels appear by name (engine::decode_attention,
...). Decode steps run as unprofiled ones do: on the CPU through the decode plan (engine/decode/plan.py).
Python overhead is the step's wall time minus the time spent inside ops (on CUDA: GPU kernel time).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, record_function

from .bench.model import decode_runner
from .bench.timing import sync, weight_bytes
from .cli import COUNT, Parser, add_model_args, load_options, policy_params, run_cli
from .decode import decode_step
from .generate import SamplingParams, prefill, sample
from .kv import KVStore
from .kv import prefill as kv_prefill
from .model import Attention, FeedForward

FAMILIES = ("matmuls", "attention", "scoring", "victim selection", "compaction/merge", "sampling", "other ops",
            "Python overhead")
OP_FAMILY = {"engine::decode_attention": "attention", "engine::prefill_attention": "attention",
             "engine::decode_layers": "attention",
             "engine::select_victim": "victim selection", "engine::adaptive_victims": "victim selection",
             "engine::compact": "compaction/merge", "engine::merge_value": "compaction/merge",
             "engine::merge_neighbour": "compaction/merge", "engine::nearest_key": "compaction/merge",
             "engine::merge_spread": "compaction/merge", "engine::merge_zip": "compaction/merge",
             "engine::remove_entries": "victim selection"}
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::mv",
           "aten::dot", "engine::matvec", "engine::qmatvec", "engine::qmatvec_q8", "engine::dequantize"}
FAMILY_RANGE = "family::"  # a record_function range whose ops (unless named in OP_FAMILY) count for a family
STEP, PREFILL = "step::decode", "step::prefill"


@dataclass
class ProfileReport:
    """One profile: per-family milliseconds per decode step (profiled run) and plain-run speed."""

    policy: str
    budget: int
    context: int
    steps: int
    device: str
    dtype: str
    family_ms: dict[str, float]  # family -> ms per decode step, FAMILIES order
    profiled_step_ms: float  # mean wall time of a step under the profiler
    prefill_ms: float  # the profiled prefill of `context` tokens
    step_ms: float  # median step of the plain run
    weight_bytes: int  # read once per decode step
    kv_bytes: float  # K and V bytes decode attention reads per step (mean over steps)

    @property
    def tokens_per_s(self) -> float:
        return 1e3 / self.step_ms

    @property
    def bandwidth_gb_s(self) -> float:
        return (self.weight_bytes + self.kv_bytes) / (self.step_ms * 1e-3) / 1e9

    def table(self) -> str:
        total = self.profiled_step_ms
        lines = [f"policy {self.policy}  budget {self.budget}  context {self.context}  decode steps {self.steps}  "
                 f"device {self.device}  {self.dtype}",
                 f"{'op family':<18}{'ms/step':>10}{'share':>9}"]
        lines += [f"{name:<18}{ms:>10.3f}{100 * ms / total:>8.1f}%" for name, ms in self.family_ms.items()]
        lines += [f"{'total (profiled)':<18}{total:>10.3f}{100.0:>8.1f}%",
                  f"prefill of {self.context} tokens: {self.prefill_ms:.1f} ms (profiled)",
                  f"decode without the profiler: {self.step_ms:.2f} ms/step, {self.tokens_per_s:.1f} tokens/s, "
                  f"{self.bandwidth_gb_s:.2f} GB/s achieved (weights {self.weight_bytes / 1e6:.1f} MB + "
                  f"KV {self.kv_bytes / 1e6:.2f} MB read per step)"]
        return "\n".join(lines)


# ---- instrumentation ---------------------------------------------------------------------------

def _ranged(fn: Callable, name: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def _stage_hooks(module: nn.Module, name: str) -> list[torch.utils.hooks.RemovableHandle]:
    """A record_function range from a module's forward pre-hook to its forward hook."""
    open_ranges: list[record_function] = []

    def enter(*_: object) -> None:
        open_ranges.append(record_function(name).__enter__())

    def leave(*_: object) -> None:
        open_ranges.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


@contextlib.contextmanager
def stage_ranges(model: nn.Module) -> Iterator[None]:
    """Label the model's stages (forward hooks, removed on exit). Around the prefill only: a hook makes a
    CPU decode step leave its plan (engine/decode/plan.py) for the modules, which is not what runs unprofiled."""
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (Attention, FeedForward)):  # the norms and the head run inside projections
            handles += _stage_hooks(module, f"model::{name}")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def family_ranges(store: KVStore) -> Iterator[None]:
    """Label the store's and policy's work (wrappers set on these two instances and on the prefill module's
    functions, undone on exit)."""
    policy = store.policy
    wrapped = [(store, "prefill", "attention"), (store, "decode", "attention"), (store, "_evict", "victim selection"),
               (kv_prefill, "keep_indices", "victim selection"), (kv_prefill, "compact", "compaction/merge"),
               (policy, "prefill_scores", "scoring"), (policy, "decode_update", "scoring"),
               (policy, "decode_scores", "scoring"), (policy, "after_evict", "compaction/merge"),
               (policy, "after_evict_picks", "compaction/merge")]
    saved = [(obj, method, vars(obj).get(method)) for obj, method, _ in wrapped]
    for obj, method, family in wrapped:
        setattr(obj, method, _ranged(getattr(obj, method), FAMILY_RANGE + family))
    try:
        yield
    finally:
        for obj, method, original in saved:
            if original is None:
                delattr(obj, method)  # the class's method shows through again
            else:
                setattr(obj, method, original)


# ---- attribution -------------------------------------------------------------------------------

def family_of(event: FunctionEvent) -> str:
    """The nearest enclosing engine op of OP_FAMILY, else the nearest family range, else matmuls for
    matrix products (and what they call), else other ops."""
    matmul, e = False, event
    ranged: str | None = None
    while e is not None:
        if e.name in OP_FAMILY:
            return OP_FAMILY[e.name]
        if ranged is None and e.is_user_annotation and e.name.startswith(FAMILY_RANGE):
            ranged = e.name[len(FAMILY_RANGE):]
        matmul |= e.name in MATMULS
        e = e.cpu_parent
    return ranged or ("matmuls" if matmul else "other ops")


def _inside(event: FunctionEvent, name: str) -> bool:
    e = event.cpu_parent
    while e is not None:
        if e.name == name:
            return True
        e = e.cpu_parent
    return False


def attribute(events: list[FunctionEvent], steps: int, cuda: bool) -> tuple[dict[str, float], float, float]:
    """(family -> ms per decode step, mean profiled step ms, prefill ms) from the profiler's events."""
    ms = dict.fromkeys(FAMILIES, 0.0)
    step_wall = sum(e.cpu_time_total for e in events if e.name == STEP) / 1e3
    prefill_ms = sum(e.cpu_time_total for e in events if e.name == PREFILL) / 1e3
    for e in events:
        if e.is_user_annotation or not _inside(e, STEP):
            continue
        ms[family_of(e)] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
    ms["Python overhead"] = step_wall - sum(ms.values())
    return {k: v / steps for k, v in ms.items()}, step_wall / steps, prefill_ms


# ---- runs --------------------------------------------------------------------------------------

def kv_read_bytes(store: KVStore) -> int:
    """K and V bytes the next decode step's attention reads: every slot up to the high-water mark."""
    slots = min(store.used + 1, store.capacity)
    return store.args.kv_bytes_per_token(store.kv_dtype) * slots * store.batch


def profiled_run(llm, context: int, steps: int, trace: Path | None) -> tuple[list[FunctionEvent], float, int]:
    """Prefill + `steps` decode steps under torch.profiler: its events, the mean KV bytes read per step and
    the store's budget."""
    ids = torch.randint(100, 1000, (1, context), generator=torch.Generator().manual_seed(0)).to(llm.device)
    store = llm.new_store(context, steps + 1)
    params, kv = SamplingParams(max_new_tokens=steps), []
    cuda = llm.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with family_ranges(store), torch.profiler.profile(activities=activities) as prof:
        with stage_ranges(llm.model), record_function(PREFILL):
            logits = prefill(llm.model, store, ids, llm.prefill_chunk)
            sync(llm.device)
        for _ in range(steps):
            kv.append(kv_read_bytes(store))
            with record_function(STEP):
                with record_function(FAMILY_RANGE + "sampling"):
                    token = sample(logits, params, None)
                logits = decode_step(llm.model, store, token)
                sync(llm.device)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return prof.events(), statistics.fmean(kv), store.budget


def check_sizes(context: int, steps: int) -> None:
    if context < 1 or steps < 1:
        raise ValueError(f"--context and --steps must be >= 1, got {context} and {steps}")


def profile(llm, context: int = 1024, steps: int = 16, trace: str | Path | None = None) -> ProfileReport:
    """Profile `steps` decode steps after a `context`-token prefill of `llm` (its policy and budget)."""
    check_sizes(context, steps)
    run, _, plain = decode_runner(llm, context, steps)
    run()  # warm-up (lazy initialisation, RoPE tables, allocator)
    run()
    events, kv, budget = profiled_run(llm, context, steps, None if trace is None else Path(trace))
    family_ms, step_ms, prefill_ms = attribute(events, steps, llm.device.type == "cuda")
    return ProfileReport(
        policy=llm.policy.name, budget=budget, context=context, steps=steps,
        device=str(llm.device), dtype=str(llm.dtype).removeprefix("torch."), family_ms=family_ms,
        profiled_step_ms=step_ms, prefill_ms=prefill_ms, step_ms=1e3 * statistics.median(plain[steps:]),
        weight_bytes=weight_bytes(llm.model), kv_bytes=kv)


def parser() -> Parser:
    p = Parser(prog="python -m engine.profile", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--context", type=COUNT, default=1024, help="prompt tokens prefilled before the decode steps (>= 1)")
    p.add_argument("--steps", type=COUNT, default=16, help="decode steps profiled (>= 1)")
    p.add_argument("--trace", help="write a Chrome trace (chrome://tracing, ui.perfetto.dev) to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    if ns.trace:
        try:
            Path(ns.trace).open("w").close()  # fail now, not after the model is loaded and profiled
        except OSError as e:
            raise ValueError(f"cannot write the trace {ns.trace}: {e.strerror or e}") from None
    import engine

    llm = engine.load(ns.model, policy=ns.policy, **load_options(ns), **policy_params(ns))
    report = profile(llm, ns.context, ns.steps, ns.trace)
    print(report.table())
    if ns.trace:
        print(f"trace: {ns.trace}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run_cli(main)
