"""`python -m engine.eval ppl`: streaming perplexity under a KV budget (the StreamingLLM / WeightedKV protocol).

The text is fed one token at a time (`LLM.nll(ids, prefill_len=1)`), so the policy compresses as it goes
and every prediction is made from the compressed cache; the full cache is the reference. A policy that
never evicts while decoding (SnapKV) would equal the full cache that way, so it is fed in prefill chunks
instead (compressed after each chunk: `--prefill-chunk`, default 32), and its cell says so. A fractional
budget is a fraction of --tokens. `--batch B` cuts B equal slices from the text and runs them as one
batch [B, tokens]; perplexity is over every predicted token of every slice.

    python -m engine.eval ppl --dataset pg-essays --tokens 8192 --policies full,h2o,vatp \\
        --budgets 0.125,0.25,0.5 --out ppl.json
"""
from __future__ import annotations

import argparse
import hashlib
import math
import time
from typing import Any

import torch

from ..cli import COUNT, Integer
from ..llm import ContextError
from . import data, plots
from ..dist import rank
from .common import Results, add_grid_args, build_policy, grid, load_llm, plot_path, run_cells, workers

PREFILL_ONLY_CHUNK = 32


def add_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a UTF-8 text file")
    src.add_argument("--dataset", help=f"a cached text: {', '.join(sorted(data.TEXTS))} (see `data fetch`)")
    add_grid_args(p)
    p.add_argument("--tokens", type=Integer(2), default=4096, help="tokens per sequence, >= 2 (default 4096)")
    p.add_argument("--batch", type=COUNT, default=1, help="equal slices of the text run as one batch (>= 1)")
    p.add_argument("--window", type=COUNT, default=256,
                   help="report the mean NLL per window of this many tokens (>= 1)")


def text_ids(tokenizer: Any, text: str, n: int) -> list[int]:
    """The first n tokens of `text`, encoding only a prefix a little longer than needed."""
    chars = max(64, 6 * n)
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) > n + 16 or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n:
        raise data.DataError(f"the text has {len(ids)} tokens, fewer than the {n} asked for (--tokens x --batch)")
    return ids[:n]


def resolve_budget(budget: int | float | None, n: int) -> int | None:
    """A fraction of the sequence length becomes tokens (the store sees a 1-token prompt)."""
    if budget is None or isinstance(budget, int):
        return budget
    return max(1, round(budget * n))


def stream_nll(llm: Any, policy: Any, ids: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, str]:
    """NLL [B, T-1] of the streaming protocol under `policy`, and a description of how it was fed."""
    llm.policy = policy
    if chunk is None and (policy.evicts_on_decode or policy.name == "full"):
        llm.prefill_chunk = None
        return llm.nll(ids, prefill_len=1), "token by token"
    chunk = chunk or PREFILL_ONLY_CHUNK
    llm.prefill_chunk = chunk
    try:
        return llm.nll(ids, prefill_len=ids.shape[1]), f"prefill chunks of {chunk}"
    finally:
        llm.prefill_chunk = None


def window_means(nll: torch.Tensor, window: int) -> list[float]:
    """Mean NLL over the batch and each window of positions."""
    per_pos = nll.double().mean(0)
    return [float(per_pos[i : i + window].mean()) for i in range(0, per_pos.shape[0], window)]


def run_cell(llm: Any, policy: Any, ids: torch.Tensor, chunk: int | None, window: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    nll, how = stream_nll(llm, policy, ids, chunk)
    seconds = time.perf_counter() - t0
    mean = float(nll.double().mean())
    stats = llm.cache_stats()
    return {"ppl": math.exp(mean), "nll": mean, "protocol": how, "seconds": round(seconds, 2),
            "tokens_per_s": round(ids.numel() / seconds, 2), "evictions": stats.evictions,
            "occupancy": stats.occupancy, "nll_windows": window_means(nll, window)}


def run(ns: argparse.Namespace) -> int:
    cells = grid(ns)
    policies = [(name, budget, build_policy(ns, name, resolve_budget(budget, ns.tokens))) for name, budget in cells]
    text = data.read_text_file(ns.text) if ns.text else data.text(ns.dataset)
    team = workers(ns.tp, ns.device)
    llm = load_llm(ns, team)
    flat = text_ids(llm.tokenizer, text, ns.tokens * ns.batch)
    ids = torch.tensor(flat, device=llm.device).view(ns.batch, ns.tokens)
    meta = {"eval": "ppl", "model": str(llm.source), "text": ns.text or ns.dataset,
            "ids_sha256": hashlib.sha256(str(flat).encode()).hexdigest(), "tokens": ns.tokens, "batch": ns.batch,
            "window": ns.window, "prefill_chunk": ns.prefill_chunk, "dtype": ns.dtype, "weights": llm.weights, "kv_dtype": ns.kv_dtype, "device": ns.device}
    results = Results(ns.out, meta, ("policy", "budget"))
    todo = [c for c in policies if not results.done(policy=c[0], budget=c[1])]

    def compute(item: tuple[str, int | float | None, Any]) -> dict[str, Any]:
        name, budget, policy = item
        cell: dict[str, Any] = {"policy": name, "budget": budget, "budget_tokens": resolve_budget(budget, ns.tokens)}
        try:
            cell |= run_cell(llm, policy, ids, ns.prefill_chunk, ns.window)
        except ContextError as e:  # the full cache past the model context: recorded, the sweep goes on
            cell["skipped"] = str(e)
        return cell

    for cell in run_cells(todo, compute, team, "ppl cells"):
        results.add(cell)
    if rank() != 0:  # rank 0 reports and plots
        return 0
    print(table(results.cells))
    for path in plot(results.cells, ns.out, ns.tokens, ns.window):
        print(f"plot: {path}")
    if ns.out:
        print(f"results: {ns.out}")
    return 0


def table(cells: list[dict[str, Any]]) -> str:
    rows = [f"{'policy':<14}{'budget':>10}{'tokens':>8}{'ppl':>14}{'s':>9}"]
    for c in sorted(cells, key=lambda c: (c["policy"], c["budget_tokens"] or 0)):
        ppl = f"{c['ppl']:.3f}" if "ppl" in c else "skipped"
        rows.append(f"{c['policy']:<14}{c['budget']!s:>10}{c['budget_tokens']!s:>8}{ppl:>14}"
                    f"{c.get('seconds', '-')!s:>9}")
    return "\n".join(rows)


def plot(cells: list[dict[str, Any]], out: str | None, tokens: int, window: int) -> list:
    """ppl vs budget (one line per policy, full dashed) and NLL vs position per budget."""
    done = [c for c in cells if "ppl" in c]
    full = {"full": c["ppl"] for c in done if c["policy"] == "full"}
    by_policy: dict[str, list[dict]] = {}
    for c in done:
        if c["policy"] != "full":
            by_policy.setdefault(c["policy"], []).append(c)
    series = {}
    for name, cs in sorted(by_policy.items()):
        cs.sort(key=lambda c: c["budget_tokens"])
        series[name] = ([c["budget_tokens"] / tokens for c in cs], [c["ppl"] for c in cs])
    made = []
    path = plot_path(out, "-budget.png")
    if path and series:
        made.append(plots.lines(path, {"perplexity vs budget": series}, "budget (fraction of the sequence)",
                                "perplexity", f"streaming perplexity, {tokens} tokens", hlines=full, logx=True))
    by_budget: dict[str, dict] = {}
    for c in sorted(done, key=lambda c: (c["budget_tokens"] or 0, c["policy"])):
        xs = [(i * window + min((i + 1) * window, tokens - 1)) / 2 for i in range(len(c["nll_windows"]))]
        key = "full cache" if c["policy"] == "full" else f"budget {c['budget_tokens']} tokens"
        by_budget.setdefault(key, {})[c["policy"]] = (xs, c["nll_windows"])
    reference = by_budget.pop("full cache", {})
    panels = {k: {**reference, **v} for k, v in by_budget.items()} or ({"full cache": reference} if reference else {})
    path = plot_path(out, "-position.png")
    if path and panels:
        made.append(plots.lines(path, panels, "position (tokens)", f"mean NLL per {window} tokens",
                                "NLL along the text"))
    return [p for p in made if p]
