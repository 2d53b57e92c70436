"""`python -m engine.bench gpu`: batch-1 decode on a CUDA GPU, full cache vs eviction policies, eager vs
CUDA graph, against the device's copy bandwidth measured in the same run (bench/GPU.md); and the products
of one layer and the output head by packed GGUF weights (Q8_0, Q4_0: engine::qmatvec) against fp16 ones.

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
from collections.abc import Callable, Sequence

import gguf
import torch

from .. import ops
from ..cli import COUNT, add_threads_arg
from ..config import PRESETS, ModelArgs
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


def step_products(a: ModelArgs) -> list[tuple[str, int, int, str, bool]]:
    """The products of a decode step (engine/decode/plan.py) as (name, rows N, columns K, prologue, accumulate):
    the layer's four run n_layers times per token, the output head once."""
    return [("wqkv", (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, a.dim, "norm", False),
            ("wo", a.dim, a.n_heads * a.head_dim, "none", True),
            ("w13", 2 * a.hidden_dim, a.dim, "norm", False),
            ("w2", a.dim, a.hidden_dim, "swiglu", True),
            ("output", a.vocab_size, a.dim, "norm", False)]


PACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")  # the types engine::qmatvec takes
PACKED_TARGETS = {"Q8_0": 1.7, "Q4_0": 2.5}  # the issue's batch-1 tokens/s goals, as multiples of fp16's


def packed_types(text: str) -> list[str]:
    """--packed: a comma list of PACKED_TYPES (empty: none), refused at parse time rather than after the decode runs."""
    names = [t for t in text.split(",") if t]
    for name in names:
        if name not in PACKED_TYPES:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(PACKED_TYPES)}")
    return names


def random_packed(qtype: gguf.GGMLQuantizationType, N: int, K: int) -> torch.Tensor:
    """[N, row_bytes] random blocks of qtype on the GPU, each block's first two bytes a small finite half (the
    scale d of every type but Q6_K): the speed does not depend on the values."""
    weights, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = torch.randint(0, 256, (N, K // weights, nbytes), dtype=torch.uint8, device="cuda")
    scales = (torch.randn(N, K // weights, device="cuda") * 1e-3).half()
    blocks[:, :, :2] = scales.view(torch.uint8).view(N, K // weights, 2)
    return blocks.view(N, -1)


def graph_time(fn: Callable[[], None], reps: int) -> float:
    """Median seconds of fn's kernels replayed from a CUDA graph (no launch overhead in the timing)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    return summary(event_times(graph.replay, reps))["median"]


def packed_products(a: ModelArgs, qtypes: list[str], copy_bw: float, reps: int = 20) -> dict[str, object]:
    """Batch-1 decode products of the preset's shape by fp16 weights (ops.linear, the engine's fp16 path) and by
    packed weights of each type (engine::qmatvec, prologue and residual add fused), one layer's four and the
    output head each timed as a captured graph. A token's products take n_layers layers plus the head, so
    tokens/s = 1 / that; the ratio to fp16 is the speed-up packing buys where the products dominate."""
    dt = torch.float16
    x = torch.randn(1, max(a.dim, 2 * a.hidden_dim), device="cuda", dtype=dt)
    norm = torch.ones(a.dim, device="cuda", dtype=dt)
    # Each product's input and output (the residual stream for the two that accumulate).
    ins = {name: x[:, : 2 * K if prologue == "swiglu" else K].contiguous()
           for name, _, K, prologue, _ in step_products(a)}
    outs = {name: torch.zeros(1, N, device="cuda", dtype=dt) for name, N, _, _, _ in step_products(a)}
    layer = [p for p in step_products(a) if p[0] != "output"]
    head = [p for p in step_products(a) if p[0] == "output"]

    def run_fp16(products, w) -> Callable[[], None]:
        def fn() -> None:
            for name, _, _, prologue, acc in products:
                ops.linear(ins[name], w[name], outs[name] if acc else None, norm if prologue == "norm" else None,
                           a.norm_eps, prologue == "swiglu")
        return fn

    def run_packed(products, w, qtype) -> Callable[[], None]:
        qmatvec = torch.ops.engine.qmatvec.default

        def fn() -> None:
            for name, _, _, prologue, acc in products:
                qmatvec(ins[name], w[name], int(qtype), outs[name], acc, norm if prologue == "norm" else None,
                        a.norm_eps, prologue == "swiglu")
        return fn

    def measure(make: Callable, w: dict[str, torch.Tensor], *extra) -> dict[str, float]:
        layer_s, head_s = graph_time(make(layer, w, *extra), reps), graph_time(make(head, w, *extra), reps)
        layer_bytes = sum(w[p[0]].nbytes for p in layer)
        token_s = a.n_layers * layer_s + head_s
        return {"layer_s": layer_s, "head_s": head_s, "tok_s": 1 / token_s,
                "layer_bytes_per_s": layer_bytes / layer_s, "layer_of_copy_bw": layer_bytes / layer_s / copy_bw,
                "head_bytes_per_s": w["output"].nbytes / head_s}

    fp16 = {name: torch.randn(N, K, device="cuda", dtype=dt) * 0.02 for name, N, K, _, _ in step_products(a)}
    result: dict[str, object] = {"fp16": measure(run_fp16, fp16)}
    del fp16
    torch.cuda.empty_cache()
    for name in qtypes:
        qtype = gguf.GGMLQuantizationType[name]
        packed = {p: random_packed(qtype, N, K) for p, N, K, _, _ in step_products(a)}
        row = measure(run_packed, packed, qtype)
        row["tok_s_vs_fp16"] = row["tok_s"] / result["fp16"]["tok_s"]
        result[name] = row
        del packed
        torch.cuda.empty_cache()
    for name, row in result.items():
        ratio = f", {row['tok_s_vs_fp16']:.2f}x fp16" if "tok_s_vs_fp16" in row else ""
        if name in PACKED_TARGETS:
            ratio += f" (goal {PACKED_TARGETS[name]}x)"
        print(f"products {name:5s}: layer {row['layer_s'] * 1e6:7.1f} us ({row['layer_of_copy_bw'] * 100:5.1f}% of copy "
              f"bw), head {row['head_s'] * 1e6:7.1f} us; {row['tok_s']:6.1f} tok/s{ratio}")
    return result


def bench_gpu(preset: str, contexts: list[int], policies: list[str], budget: int, steps: int,
              dtype: torch.dtype = torch.float16, packed: Sequence[str] = ()) -> dict[str, object]:
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
    del model
    torch.cuda.empty_cache()
    products = packed_products(PRESETS[preset], list(packed), copy_bw) if packed else None
    for ctx, k in kernel.items():
        print(f"decode attention alone, ctx {ctx:>6s}: {k['plain_bytes_per_s'] / copy_bw * 100:5.1f}% of copy bw, "
              f"with scores {k['with_scores_bytes_per_s'] / copy_bw * 100:5.1f}%")
    return {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "preset": preset, "dtype": str(dtype).removeprefix("torch."), "budget": budget, "steps": steps,
        "copy_bytes_per_s": copy_bw, "weight_bytes": wbytes, "decode": rows, "attention_kernel": kernel,
        "packed_products": products,
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
    p.add_argument("--packed", type=packed_types, default="Q8_0,Q4_0",
                   help="comma list of GGUF types whose packed products (engine::qmatvec) are timed against fp16 "
                        "at batch 1 ('' for none)")
    add_threads_arg(p)


def run(ns: argparse.Namespace) -> int:
    res = bench_gpu(ns.preset, ns.contexts, ns.policies.split(","), ns.budget, ns.steps, packed=ns.packed)
    print(f"wrote {write_result(f'gpu-decode-{ns.preset}', res)}")
    return 0
