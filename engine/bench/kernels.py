"""`python -m engine.bench kernels`: each op against its PyTorch reference, attention against SDPA, on
random inputs shaped as two models' layers (no model is loaded)."""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import torch
import torch.nn.functional as F

from .. import ops, reference
from ..cli import COUNT, add_threads_arg
from ..results import write_result
from .timing import summary, time_alternating

LAYOUTS = {"llama-2-7b": (32, 32, 128), "smollm2": (9, 3, 64)}  # (H, H_kv, D)


def _cache(H: int, Hkv: int, D: int, C: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, C, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, C, D, generator=g).to(dtype)
    pos = torch.arange(C, dtype=torch.int32).expand(1, Hkv, C).contiguous()
    return q, k, v, pos


def decode_case(H: int, Hkv: int, D: int, C: int, reps: int) -> dict[str, object]:
    q, k, v, pos = _cache(H, Hkv, D, C, torch.float32)
    out = torch.empty(1, H, D)
    acc = torch.zeros(1, Hkv, C)
    scale = 1 / math.sqrt(D)
    q4 = q[:, :, None]
    angles = torch.arange(C + 1, dtype=torch.float32)[:, None] * torch.rand(D // 2)
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos(), emb.sin()
    rope = (cos, sin, pos)  # positions="cache": keys before RoPE, rotated by rank in the kernel

    def rotate_then_attend() -> None:  # what positions="cache" costs without the rope argument
        ops.decode_attention(q, reference.rope_keys(k, *rope, torch.float32), v, pos, C, scale, out, acc)

    fns = {
        "engine": lambda: ops.decode_attention(q, k, v, pos, C, scale, out),
        "engine_with_scores": lambda: ops.decode_attention(q, k, v, pos, C, scale, out, acc),
        "engine_rope_with_scores": lambda: ops.decode_attention(q, k, v, pos, C, scale, out, acc, rope=rope),
        "rotate_then_engine_with_scores": rotate_then_attend,
        "reference_with_scores": lambda: reference.decode_attention(q, k, v, pos, C, scale, out, acc),
        "sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=H != Hkv),
    }
    times = {name: summary(t) for name, t in time_alternating(fns, reps=reps).items()}
    sdpa = times["sdpa"]["median"]
    return {"times_s": times, "scores_vs_sdpa": times["engine_with_scores"]["median"] / sdpa,
            "plain_vs_sdpa": times["engine"]["median"] / sdpa,
            "rope_vs_scores": times["engine_rope_with_scores"]["median"] / times["engine_with_scores"]["median"],
            "rope_vs_rotate_then_attend": (times["engine_rope_with_scores"]["median"]
                                           / times["rotate_then_engine_with_scores"]["median"]),
            "scores_vs_reference": times["engine_with_scores"]["median"] / times["reference_with_scores"]["median"]}


def prefill_case(H: int, Hkv: int, D: int, L: int, reps: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, L, D, generator=g)
    k, v = torch.randn(1, Hkv, L, D, generator=g), torch.randn(1, Hkv, L, D, generator=g)
    qpos = torch.arange(L, dtype=torch.int32)[None].contiguous()
    kpos = torch.arange(L, dtype=torch.int32).expand(1, Hkv, L).contiguous()
    out, lse, col = torch.empty_like(q), torch.empty(1, H, L), torch.empty(1, Hkv, L)
    scale = 1 / math.sqrt(D)
    fns = {
        "engine_with_colsums": lambda: ops.prefill_attention(q, k, v, qpos, kpos, scale, out, lse, col, 0, scale),
        "engine": lambda: ops.prefill_attention(q, k, v, qpos, kpos, scale, out, lse, None, 0, scale),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv),
    }
    times = {name: summary(t) for name, t in time_alternating(fns, reps=reps).items()}
    sdpa = times["sdpa"]["median"]
    return {"times_s": times, "colsums_vs_sdpa": times["engine_with_colsums"]["median"] / sdpa,
            "plain_vs_sdpa": times["engine"]["median"] / sdpa}


def small_ops_case(Hkv: int, D: int, C: int, reps: int) -> dict[str, object]:
    """value_norm, select_victim and merge_value: compiled vs reference."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, Hkv, C, D, generator=g)
    score, pos = torch.rand(1, Hkv, C, generator=g), torch.arange(C, dtype=torch.int32).expand(1, Hkv, C).contiguous()
    nv, idx = torch.empty(1, Hkv, C), torch.empty(1, Hkv, dtype=torch.long)
    w = torch.rand(1, Hkv, C, generator=g)
    victim, receiver = torch.full((1, Hkv), 5), torch.full((1, Hkv), 6)
    weight = torch.rand(1, Hkv, generator=g)
    res = {}
    for name, ours, ref in [
        ("value_norm", lambda: ops.value_norm(v, 1, nv), lambda: reference.value_norm(v, 1, nv)),
        ("select_victim", lambda: ops.select_victim(score, pos, 4, C - 32, idx),
         lambda: reference.select_victim(score, pos, 4, C - 32, idx)),
        ("merge_value", lambda: ops.merge_value(v, w, victim, receiver, weight),
         lambda: reference.merge_value(v, w, victim, receiver, weight)),
    ]:
        t = time_alternating({"engine": ours, "reference": ref}, reps=reps)
        e, r = summary(t["engine"]), summary(t["reference"])
        res[name] = {"engine_s": e, "reference_s": r, "speedup_vs_reference": r["median"] / e["median"]}
    return res


# SmolLM2-135M's projections (N, K, swiglu) and the types they are benchmarked packed in. Q4_K and Q6_K need
# K a multiple of 256 (576 is not: such files keep those tensors in another type), so they run on the down
# projection's K = 1536.
QMATVEC_SHAPES = [("qkv", 960, 576, False, (3, 8)), ("wo", 576, 576, False, (3, 8)),
                  ("gate_up", 3072, 576, False, (3, 8)), ("down", 576, 1536, True, (3, 8, 12, 14)),
                  ("head", 49152, 576, False, (8,)), ("k_quants", 3072, 1536, False, (12, 14))]
_STREAM_BYTES = 64 << 20  # each timed call walks copies of the weights past the 32 MB L3: a read from memory


def _random_blocks(qtype: int, N: int, K: int, g: torch.Generator) -> torch.Tensor:
    """Random codes and sub-scales with finite half scales (the kernels' speed does not depend on the values)."""
    _, weights, nbytes = reference.QUANT_TYPES[qtype]
    blocks = torch.randint(0, 256, (N, K // weights, nbytes), dtype=torch.uint8, generator=g)
    scale = (torch.randn(N, K // weights, generator=g) * 0.02).half().view(torch.uint8).view(N, K // weights, 2)
    offset = 208 if qtype == 14 else 0  # Q6_K keeps d last; every other type's first half is d
    blocks[:, :, offset : offset + 2] = scale
    return blocks.view(N, -1)


def qmatvec_case(reps: int) -> dict[str, object]:
    """GB/s of weights read by qmatvec (blocks) and by the fp32 matvec on the same shape, M = 1 and 8 rows,
    alternating in one run; the weights are read from memory (copies past the L3), as in a decode step."""
    g = torch.Generator().manual_seed(0)
    res: dict[str, object] = {}
    for name, N, K, swiglu, qtypes in QMATVEC_SHAPES:
        w = torch.randn(N, K, generator=g)
        dense = [w.clone() for _ in range(max(1, _STREAM_BYTES // w.nbytes))]
        for M in (1, 8):
            x = torch.randn(M, 2 * K if swiglu else K, generator=g)
            out = torch.empty(M, N)
            fns = {"fp32": lambda: [ops.matvec(x, d, out, swiglu=swiglu) for d in dense]}
            nbytes = {"fp32": w.nbytes * len(dense)}
            for qtype in qtypes:
                qname = reference.QUANT_TYPES[qtype][0]
                b = _random_blocks(qtype, N, K, g)
                copies = [b.clone() for _ in range(max(1, _STREAM_BYTES // b.nbytes))]
                fns[qname] = lambda qtype=qtype, copies=copies: [
                    ops.qmatvec(x, c, qtype, out, swiglu=swiglu) for c in copies]
                nbytes[qname] = b.nbytes * len(copies)
            times = time_alternating(fns, reps=reps)
            rates = {k: nbytes[k] / min(t) / 1e9 for k, t in times.items()}  # best round: least disturbed
            res[f"{name} [{N}, {K}] M={M}"] = {"GB_per_s": rates,
                                               "vs_fp32": {k: r / rates["fp32"] for k, r in rates.items()}}
    return res


# The peak is VmHWM after a reset ("5" to clear_refs sets it to the current RSS): ru_maxrss cannot
# be reset, and importing torch has already pushed it above what the kernel reaches.
_RSS_SCRIPT = """
import sys, torch
from engine import ops

def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

H, Hkv, D, L, cols = (int(a) for a in sys.argv[1:])
q = torch.randn(1, H, L, D); k = torch.randn(1, Hkv, L, D); v = torch.randn(1, Hkv, L, D)
qpos = torch.arange(L, dtype=torch.int32)[None].contiguous()
kpos = torch.arange(L, dtype=torch.int32).expand(1, Hkv, L).contiguous()
out, lse, col = torch.empty_like(q), torch.empty(1, H, L), torch.empty(1, Hkv, L)
out.zero_(); lse.zero_(); col.zero_()  # outputs resident, so only the kernel's own memory counts
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = peak_rss()
ops.prefill_attention(q, k, v, qpos, kpos, D ** -0.5, out, lse, col if cols else None, 0, D ** -0.5)
print(peak_rss() - before)
"""


def prefill_peak_rss(H: int, Hkv: int, D: int, L: int) -> int:
    """Bytes of peak RSS the prefill kernel adds above its inputs, in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(H), str(Hkv), str(D), str(L), "1"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


def bench_kernels(contexts: list[int], reps: int) -> dict[str, object]:
    results: dict[str, object] = {"extension": ops.HAVE_EXTENSION}
    for layout, (H, Hkv, D) in LAYOUTS.items():
        lay: dict[str, object] = {"decode": {}, "prefill": {}}
        for C in contexts:
            d = lay["decode"][str(C)] = decode_case(H, Hkv, D, C, reps)
            print(f"{layout} decode C={C}: with scores {d['scores_vs_sdpa']:.2f}x SDPA time, "
                  f"plain {d['plain_vs_sdpa']:.2f}x, {1 / d['scores_vs_reference']:.1f}x faster than reference; "
                  f"rope in the kernel {d['rope_vs_scores']:.2f}x the time without rope, "
                  f"{d['rope_vs_rotate_then_attend']:.2f}x rotating the keys first")
        for L in [c for c in contexts if c <= 2048]:
            p = lay["prefill"][str(L)] = prefill_case(H, Hkv, D, L, max(3, reps // 2))
            print(f"{layout} prefill L={L}: with column sums {p['colsums_vs_sdpa']:.2f}x SDPA time, "
                  f"plain {p['plain_vs_sdpa']:.2f}x")
        results[layout] = lay
    results["qmatvec"] = qmatvec_case(reps)
    for case, r in results["qmatvec"].items():
        print(f"qmatvec {case}: GB/s of weights read", ", ".join(f"{k} {v:.1f}" for k, v in r["GB_per_s"].items()))
    H, Hkv, D = LAYOUTS["smollm2"]
    results["small_ops"] = small_ops_case(Hkv, D, 2048, reps)
    for name, r in results["small_ops"].items():
        print(f"{name}: {r['speedup_vs_reference']:.1f}x faster than reference")
    rss = {str(L): prefill_peak_rss(H, Hkv, D, L) for L in (4096, 8192)}
    results["prefill_peak_rss_bytes"] = rss
    print("prefill with column sums, extra peak RSS:", json.dumps(rss),
          "(an L x L fp32 matrix at 8K would be", 8192 * 8192 * 4 * H, "bytes)")
    return results


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", type=COUNT, nargs="+", default=[512, 2048, 8192],
                   help="cached tokens of the decode cases (those <= 2048 also prefill lengths)")
    p.add_argument("--reps", type=COUNT, default=5, help="alternating rounds of the candidates (>= 1)")
    add_threads_arg(p)


def run(ns: argparse.Namespace) -> int:
    res = bench_kernels(ns.contexts, ns.reps)
    print(f"wrote {write_result('kernels', {'reps': ns.reps, 'results': res})}")
    return 0
