"""`python -m engine.bench model` (the default): decode and prefill speed of a real model, measured as
ratios against a peer timed in the same run (bench/CPU.md).

    python -m engine.bench                      # engine vs transformers vs the matvec floor, full cache
    python -m engine.bench --policy h2o --budget 256   # policy overhead vs the full cache
    python -m engine.bench --policies h2o,tova --budgets 256 1024   # the overhead table, one JSON
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from .. import ops
from ..cli import BUDGET_HELP, COUNT, add_model_args, budget_arg, load_options, policy_params
from ..decode import decode_step
from ..generate import prefill
from ..results import write_result
from .timing import read_bandwidth, summary, sync, time_alternating, weight_bytes


def decode_runner(llm, ctx: int, steps: int, fresh: bool = True) -> tuple[Callable[[], None], list[float], list[float]]:
    """A callable that prefills `ctx` tokens, then times `steps` decode steps one by one. With
    fresh=False the prompt is prefilled once and every later call goes on decoding from there (the
    cache then holds ctx + a few steps: what a policy-overhead table needs, without an 8K prefill per call)."""
    prefills: list[float] = []
    step_times: list[float] = []
    ids = torch.randint(100, 1000, (1, ctx), generator=torch.Generator().manual_seed(0)).to(llm.device)
    live: dict[str, object] = {}

    def run() -> None:
        if fresh or not live:
            live["store"] = llm.new_store(ctx, steps + 1 if fresh else llm.args.max_seq_len - ctx)
            sync(llm.device)
            t0 = time.perf_counter()
            live["token"] = prefill(llm.model, live["store"], ids, llm.prefill_chunk).argmax(-1)
            sync(llm.device)
            prefills.append(time.perf_counter() - t0)
        store, token = live["store"], live["token"]
        for _ in range(steps):
            t0 = time.perf_counter()
            token = decode_step(llm.model, store, token).argmax(-1)
            sync(llm.device)
            step_times.append(time.perf_counter() - t0)
        live["token"] = token

    return run, prefills, step_times


def hf_runner(hf, ctx: int, steps: int) -> tuple[Callable[[], None], list[float], list[float]]:
    prefills: list[float] = []
    step_times: list[float] = []
    ids = torch.randint(100, 1000, (1, ctx), generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def run() -> None:
        t0 = time.perf_counter()
        out = hf(ids, use_cache=True)
        prefills.append(time.perf_counter() - t0)
        pkv, token = out.past_key_values, out.logits[:, -1].argmax(-1)
        for _ in range(steps):
            t0 = time.perf_counter()
            out = hf(token[:, None], past_key_values=pkv, use_cache=True)
            pkv, token = out.past_key_values, out.logits[:, -1].argmax(-1)
            step_times.append(time.perf_counter() - t0)

    return run, prefills, step_times


def matvec_floor(model, steps: int) -> Callable[[], None]:
    """The bare matrix-vector products of one decode step over the same weights: streaming them once, by
    the fastest product we have (ops.linear: the native matvec where it exists, else F.linear)."""
    mats = [model.output.weight]
    for b in model.layers:
        mats += [b.attention.wqkv, b.attention.wo.weight, b.feed_forward.w13, b.feed_forward.w2.weight]
    dtype, device = model.tok_embeddings.weight.dtype, model.tok_embeddings.weight.device
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype, device=device) for w in mats}

    @torch.inference_mode()
    def run() -> None:
        for _ in range(steps):
            for w in mats:
                ops.linear(inputs[w.shape[1]], w)

    return run


def bench_vs_transformers(llm, contexts: list[int], steps: int, reps: int) -> dict[str, object]:
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(llm.source, torch_dtype=llm.dtype).eval()
    weights = weight_bytes(llm.model)
    read_bw = read_bandwidth(llm.device)
    print(f"read bandwidth: {read_bw / 1e9:.1f} GB/s")
    results: dict[str, object] = {"read_bytes_per_s": read_bw, "weight_bytes": weights}
    for ctx in contexts:
        ours, ours_pre, ours_dec = decode_runner(llm, ctx, steps)
        theirs, hf_pre, hf_dec = hf_runner(hf, ctx, steps)
        floor = matvec_floor(llm.model, steps)
        floor_times = time_alternating({"engine": ours, "transformers": theirs, "floor": floor}, reps=reps)["floor"]
        e_dec, h_dec = summary(ours_dec[steps:]), summary(hf_dec[steps:])  # drop the warm-up round
        e_pre, h_pre = summary(ours_pre[1:]), summary(hf_pre[1:])
        floor_step = summary([t / steps for t in floor_times])
        # the floor scaled by the K/V bytes attention also reads (mean cache over the timed steps)
        kv = llm.args.kv_bytes_per_token(llm.kv_dtype) * (ctx + steps / 2)
        floor_kv = floor_step["median"] * (1 + kv / weights)
        achieved = (weights + kv) / e_dec["median"]
        results[str(ctx)] = {
            "engine_decode_s": e_dec, "transformers_decode_s": h_dec, "floor_step_s": floor_step,
            "floor_with_kv_step_s": floor_kv, "decode_vs_floor_with_kv": e_dec["median"] / floor_kv,
            "kv_bytes": kv, "engine_decode_bytes_per_s": achieved, "engine_decode_of_read_bw": achieved / read_bw,
            "engine_prefill_s": e_pre, "transformers_prefill_s": h_pre,
            "decode_speedup_vs_transformers": h_dec["median"] / e_dec["median"],
            "decode_vs_floor": e_dec["median"] / floor_step["median"],
            "prefill_speedup_vs_transformers": h_pre["median"] / e_pre["median"],
            "engine_decode_tok_s": 1 / e_dec["median"], "engine_prefill_tok_s": ctx / e_pre["median"],
        }
        r = results[str(ctx)]
        print(f"ctx {ctx:5d}: decode {e_dec['median']*1e3:6.1f} ms (transformers {h_dec['median']*1e3:6.1f}, "
              f"floor {floor_step['median']*1e3:5.1f}, with KV {floor_kv*1e3:5.1f}) -> "
              f"{r['decode_speedup_vs_transformers']:.2f}x transformers, {r['decode_vs_floor']:.2f}x floor "
              f"({r['decode_vs_floor_with_kv']:.2f}x with KV), {achieved / 1e9:.1f} GB/s = "
              f"{achieved / read_bw * 100:.0f}% of read bw; prefill {r['prefill_speedup_vs_transformers']:.2f}x "
              "transformers")
    return results


def bench_policy(llm_full, llm_policy, contexts: list[int], steps: int, reps: int) -> dict[str, object]:
    """Decode step of the policy at its budget vs the full cache holding as many tokens (overhead) and vs
    the full cache holding the whole context (what eviction buys). A full context is capped so that the
    timed steps still fit the model's context window; the table says how many tokens it held."""
    results: dict[str, object] = {}
    budget = llm_policy.policy.resolve_budget(max(contexts))
    room = llm_full.args.max_seq_len - steps * (reps + 1) - 1
    for ctx in contexts:
        full_ctx = min(ctx, room)
        pol, _, pol_dec = decode_runner(llm_policy, ctx, steps, fresh=False)
        same, _, same_dec = decode_runner(llm_full, budget, steps, fresh=False)
        full, _, full_dec = decode_runner(llm_full, full_ctx, steps, fresh=False)
        time_alternating({"policy": pol, "full_same_occupancy": same, "full_context": full}, reps=reps)
        p, s, f = summary(pol_dec[steps:]), summary(same_dec[steps:]), summary(full_dec[steps:])
        results[str(ctx)] = {"policy_step_s": p, "full_same_occupancy_step_s": s, "full_context_step_s": f,
                             "full_context_tokens": full_ctx,
                             "overhead_vs_same_occupancy": p["median"] / s["median"],
                             "speedup_vs_full_context": f["median"] / p["median"]}
        print(f"{llm_policy.policy.name:>12} ctx {ctx:5d} budget {budget}: {p['median']*1e3:6.2f} ms/step, "
              f"{p['median']/s['median']:.2f}x full@{budget}, {f['median']/p['median']:.2f}x faster than full@{full_ctx}",
              flush=True)
    return results


def bench_policy_grid(ns: argparse.Namespace, full, contexts: list[int]) -> dict[str, object]:
    """bench_policy for every policy x budget of --policies / --budgets, one table."""
    import engine

    grid: dict[str, object] = {}
    for name in ns.policies.split(","):
        for budget in ns.budgets:
            params = {**policy_params(argparse.Namespace(**{**vars(ns), "policy": name})), "budget": budget}
            llm = engine.load(ns.model, policy=name, **load_options(ns), **params)
            grid.setdefault(name, {})[str(budget)] = bench_policy(full, llm, contexts, ns.steps, ns.reps)
    return grid


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--contexts", type=COUNT, nargs="+",
                   help="prompt lengths (default: 128 2048 vs transformers, 2048 8192 for a policy)")
    p.add_argument("--steps", type=COUNT, default=16, help="decode steps timed per repetition (>= 1)")
    p.add_argument("--reps", type=COUNT, default=5, help="alternating rounds of the candidates (>= 1)")
    p.add_argument("--policies", help="comma list: a policy-overhead table over policies x --budgets")
    p.add_argument("--budgets", type=budget_arg, nargs="+",
                   help=f"budgets of the --policies table, each {BUDGET_HELP} (default: 256 1024)")


def run(ns: argparse.Namespace) -> int:
    import engine

    if ns.budgets and not ns.policies:
        raise ValueError("--budgets sets the budgets of a --policies table; for one policy use --budget")
    if ns.policies and ns.budget is not None:
        raise ValueError("a --policies table takes its budgets from --budgets, not --budget")
    full = engine.load(ns.model, policy="full", **load_options(ns))
    meta = {"model": full.name, "dtype": ns.dtype, "weights": full.weights,
            "kv_dtype": str(full.kv_dtype).removeprefix("torch."), "device": ns.device, "steps": ns.steps,
            "reps": ns.reps}
    if ns.policies:
        ns.budgets = ns.budgets or [256, 1024]
        contexts = ns.contexts or [2048, 8192]
        res = bench_policy_grid(ns, full, contexts)
        path = write_result("policy-grid", {**meta, "policies": ns.policies.split(","), "budgets": ns.budgets,
                                            "results": res})
    elif ns.policy == "full":
        contexts = ns.contexts or [128, 2048]
        res = bench_vs_transformers(full, contexts, ns.steps, ns.reps)
        path = write_result("e2e-vs-transformers", {**meta, "policy": "full", "results": res})
    else:
        llm = engine.load(ns.model, policy=ns.policy, **load_options(ns), **policy_params(ns))
        contexts = ns.contexts or [2048, 8192]
        res = bench_policy(full, llm, contexts, ns.steps, ns.reps)
        path = write_result(f"policy-{ns.policy}", {**meta, "policy": ns.policy, "budget": llm.policy.budget,
                                                      "results": res})
    print(f"wrote {path}")
    return 0
