"""`python -m engine.bench gpu`: batch-1 decode on a CUDA GPU, full cache vs eviction policies, eager vs
CUDA graph, against the device's copy bandwidth measured in the same run (bench/GPU.md).

The model has the preset's shape and random weights (speed does not depend on the values). Each cell's
cache is filled directly as it stands after `ctx` tokens (random K/V; `full` holds every position, a
policy its budget: the sinks, the recent window and positions spread over the rest; StreamingLLM the
sinks and the newest tokens), so a 32K context costs no 32K-token prefill. Steps are timed with CUDA
events, each step's next token is its argmax.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from .. import ops
from ..cli import COUNT, add_threads_arg
from ..config import PRESETS
from ..decode import Decoder
from ..kv import KVStore
from ..model import Transformer
from ..rope import Rope
from ..policies import make_policy
from ..policies.base import Policy
from ..results import write_result
from .timing import summary, weight_bytes


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy, bytes read plus written per second (median)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / summary(event_times(lambda: dst.copy_(src), reps))["median"]


def event_times(fn, reps: int) -> list[float]:
    """Seconds per call of fn, one pair of CUDA events around each call."""
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in pairs]


def random_model(preset: str, max_seq_len: int, dtype: torch.dtype) -> Transformer:
    """The preset's shape with N(0, 0.02) weights, built on the GPU (no host copy of 13 GB)."""
    args = dataclasses.replace(PRESETS[preset], max_seq_len=max_seq_len)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = Transformer(args).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.fuse()
    model.rope = Rope(args, torch.device("cuda"))
    return model


def filled_store(model: Transformer, policy: Policy, ctx: int, steps: int) -> KVStore:
    """A store as it stands after `ctx` tokens (see the module docstring), room left for `steps` more."""
    dev, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    if policy.name == "full":
        kept = budget = ctx
        capacity = ctx + steps
    else:
        kept = budget = min(policy.budget, ctx)
        capacity = policy.slots(budget, steps)
    store = KVStore(model.args, policy, budget, capacity, 1, dtype, dev, model.rope)
    if kept == ctx:
        positions = torch.arange(ctx, device=dev)
    else:
        sinks = policy.sinks
        # StreamingLLM holds the newest tokens; a scoring policy at least the newest one and its recent window
        recent = kept - sinks if policy.name == "streaming" else max(1, min(policy.recent, kept - sinks - 1))
        middle = torch.randperm(ctx - sinks - recent, device=dev)[: kept - sinks - recent].sort().values + sinks
        positions = torch.cat([torch.arange(sinks, device=dev), middle, torch.arange(ctx - recent, ctx, device=dev)])
    store.fill(positions, ctx, {"cnt": ctx - positions})  # WeightedKV's count of the rows that saw each slot
    return store


def decode_times(model: Transformer, store: KVStore, steps: int, graphs: bool, warmup: int = 4) -> list[float]:
    """Seconds per decode step over `store`, eager or replayed from CUDA graphs."""
    decoder = Decoder(model, store, cuda_graphs=graphs)
    token = torch.zeros(1, dtype=torch.long, device="cuda")
    state = {"token": token}

    def step() -> None:
        state["token"] = decoder.step(state["token"]).argmax(-1)

    for _ in range(warmup):
        step()
    times = event_times(step, steps)
    if graphs and decoder.eager:
        raise RuntimeError("the decode step was not captured in a CUDA graph")
    return times


def attention_kernel(model: Transformer, ctx: int, reps: int = 30) -> dict[str, float]:
    """One layer's decode attention alone at `ctx` cached tokens: K and V bytes per second, with and without
    the score accumulation a policy asks for (3 cache copies in turn, so no timing reads from L2)."""
    a, dtype = model.args, model.tok_embeddings.weight.dtype
    caches = [(torch.randn(1, a.n_kv_heads, ctx, a.head_dim, device="cuda", dtype=dtype),
               torch.randn(1, a.n_kv_heads, ctx, a.head_dim, device="cuda", dtype=dtype)) for _ in range(3)]
    q = torch.randn(1, a.n_heads, a.head_dim, device="cuda", dtype=dtype)
    pos = torch.arange(ctx, device="cuda", dtype=torch.int32).expand(1, a.n_kv_heads, ctx).contiguous()
    out = torch.empty_like(q)
    acc = torch.zeros(1, a.n_kv_heads, ctx, device="cuda")
    nbytes = 2 * caches[0][0].numel() * caches[0][0].element_size()
    result = {}
    for name, scores in (("plain", None), ("with_scores", acc)):
        i = iter(range(1 << 30))

        def call() -> None:
            k, v = caches[next(i) % 3]
            ops.decode_attention(q, k, v, pos, ctx, 1 / math.sqrt(a.head_dim), out, scores)

        call()
        result[f"{name}_s"] = summary(event_times(call, reps))["median"]
        result[f"{name}_bytes_per_s"] = nbytes / result[f"{name}_s"]
    return result


def bench_gpu(preset: str, contexts: list[int], policies: list[str], budget: int, steps: int,
              dtype: torch.dtype = torch.float16) -> dict[str, object]:
    if not torch.cuda.is_available():
        raise SystemExit("engine.bench gpu: torch sees no CUDA GPU")
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)")
    model = random_model(preset, max(contexts) + steps + 64, dtype)
    wbytes = weight_bytes(model)
    rows = []
    for ctx in contexts:
        for name in policies:
            policy = make_policy(name, budget=None if name == "full" else budget)
            if name != "full" and ctx <= budget:
                continue  # nothing to evict: the same cache as full
            row: dict[str, object] = {"context": ctx, "policy": name}
            for graphs in (False, True):
                store = filled_store(model, policy, ctx, steps + 8)
                row["occupancy"] = store.occupancy
                t = summary(decode_times(model, store, steps, graphs))
                mode = "graph" if graphs else "eager"
                row[f"{mode}_step_s"] = t
                row[f"{mode}_tok_s"] = 1 / t["median"]
                moved = wbytes + model.args.kv_bytes_per_token(store.dtype) * store.occupancy
                row[f"{mode}_bytes_per_s"] = moved / t["median"]
                row[f"{mode}_of_copy_bw"] = moved / t["median"] / copy_bw
                del store
                torch.cuda.empty_cache()
            rows.append(row)
            print(f"ctx {ctx:6d} {name:11s} occ {row['occupancy']:6d}: eager {row['eager_step_s']['median'] * 1e3:7.2f} ms"
                  f"  graph {row['graph_step_s']['median'] * 1e3:7.2f} ms ({row['graph_tok_s']:6.1f} tok/s, "
                  f"{row['graph_of_copy_bw'] * 100:5.1f}% of copy bw)")
    kernel = {str(ctx): attention_kernel(model, ctx) for ctx in contexts}
    for ctx, k in kernel.items():
        print(f"decode attention alone, ctx {ctx:>6s}: {k['plain_bytes_per_s'] / copy_bw * 100:5.1f}% of copy bw, "
              f"with scores {k['with_scores_bytes_per_s'] / copy_bw * 100:5.1f}%")
    return {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "preset": preset, "dtype": str(dtype).removeprefix("torch."), "budget": budget, "steps": steps,
        "copy_bytes_per_s": copy_bw, "weight_bytes": wbytes, "decode": rows, "attention_kernel": kernel,
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="llama-2-7b", help="the model shape (random fp16 weights)")
    p.add_argument("--contexts", type=COUNT, nargs="+", default=[512, 2048, 4096, 16384, 32768],
                   help="tokens in the cache before the timed steps")
    p.add_argument("--policies", default="full,h2o,vatp,weightedkv", help="comma list of policies")
    p.add_argument("--budget", "--budgets", type=COUNT, default=2048,
                   help="tokens each evicting policy keeps, an integer >= 1 (a random cache has no prompt to take "
                        "a fraction of; contexts within it run the full cache only)")
    p.add_argument("--steps", type=COUNT, default=16, help="decode steps timed per cell (>= 1)")
    add_threads_arg(p)


def run(ns: argparse.Namespace) -> int:
    res = bench_gpu(ns.preset, ns.contexts, ns.policies.split(","), ns.budget, ns.steps)
    print(f"wrote {write_result(f'gpu-decode-{ns.preset}', res)}")
    return 0
