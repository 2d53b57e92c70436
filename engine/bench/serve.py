"""`python -m engine.bench serve`: the OpenAI-compatible server (engine.serve) under N concurrent streaming
clients: aggregate decode tokens/s, time to first token and inter-token latency (p50/p99), per N.

The server runs in this process on a free loopback port, the clients in threads (HTTP and SSE as any client
sees them). Every stream asks for --max-tokens tokens of a different prompt; all N start together and the
rate is the tokens they received over the time from the first request to the last end (prefills included);
the decode rate counts only the stretch where every stream has had its first token and none has ended.
What batching buys shows as the ratio of N streams' decode rate to one stream's (a step reads the weights
once for all of them).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import statistics
import time
import urllib.parse
from pathlib import Path

from ..cli import COUNT, CommaList, add_model_args, load_options, policy_params
from ..results import write_result

PROMPTS = ["Once upon a time", "The history of the Roman Empire", "In a small village by the sea",
           "The best way to learn programming", "A recipe for bread:", "The planets of the solar system",
           "Dear diary, today", "The rules of chess are"]
PAGE = Path(__file__).resolve().parents[2] / "bench" / "SERVE.md"


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--streams", type=CommaList(COUNT), default=[1, 4, 8, 16], help="concurrent streams, comma list")
    p.add_argument("--max-tokens", type=COUNT, default=64, help="tokens per stream")
    p.add_argument("--reps", type=COUNT, default=1, help="rounds per stream count (the best round is kept)")
    p.add_argument("--page", default=str(PAGE), help="Markdown page to write the table to ('' : none)")


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def _stream(url: str, prompt: str, max_tokens: int) -> dict[str, object]:
    """One streaming completion: when each text chunk arrived, and the token count of the final usage."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=600)
    start, arrivals, tokens = time.perf_counter(), [], 0
    try:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"the server answered {r.status}: {r.read()[:200]!r}")
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
            if "usage" in chunk:
                tokens = chunk["usage"]["completion_tokens"]
    finally:
        conn.close()
    return {"start": start, "end": time.perf_counter(), "arrivals": arrivals, "tokens": tokens}


def load_round(url: str, n: int, max_tokens: int) -> dict[str, float]:
    """n streams at once: aggregate tokens/s, TTFT and inter-token latency percentiles (ms)."""
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        runs = list(pool.map(lambda i: _stream(url, PROMPTS[i % len(PROMPTS)] + f" ({i})", max_tokens), range(n)))
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    ttft = [(r["arrivals"][0] - r["start"]) * 1e3 for r in runs if r["arrivals"]]
    itl = [(b - a) * 1e3 for r in runs for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tokens = sum(r["tokens"] for r in runs)
    # steady state: from the moment every stream has its first token to the first stream's end
    heard = [r["arrivals"] for r in runs if r["arrivals"]]  # a stream may end at once (EOS first)
    lo, hi = max((a[0] for a in heard), default=0.0), min((a[-1] for a in heard), default=0.0)
    steady = sum(lo < t <= hi for a in heard for t in a)
    return {"streams": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "decode_tokens_per_s": steady / (hi - lo) if hi > lo else float("nan"),
            "ttft_ms_p50": statistics.median(ttft), "ttft_ms_p99": _percentile(ttft, 0.99),
            "itl_ms_p50": statistics.median(itl), "itl_ms_p99": _percentile(itl, 0.99)}


def table(rows: list[dict[str, float]]) -> str:
    one = rows[0]["decode_tokens_per_s"]
    lines = ["| streams | decode tokens/s | vs 1 stream | tokens/s with prefill | TTFT p50 (ms) | TTFT p99 (ms) "
             "| ITL p50 (ms) | ITL p99 (ms) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['streams']} | {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / one:.2f}x | "
              f"{r['tokens_per_s']:.1f} | {r['ttft_ms_p50']:.0f} | "
              f"{r['ttft_ms_p99']:.0f} | {r['itl_ms_p50']:.1f} | {r['itl_ms_p99']:.1f} |" for r in rows]
    return "\n".join(lines)


def run(ns: argparse.Namespace) -> int:
    import torch

    from .. import load
    from ..results import machine
    from ..serve.app import Settings, create_app, serving
    from ..serve.scheduler import Scheduler

    llm = load(ns.model, policy=ns.policy, **load_options(ns), **policy_params(ns))
    scheduler = Scheduler(llm, max_batch=max(ns.streams), max_queue=max(ns.streams)).start()
    rows = []
    try:
        with serving(create_app(llm, scheduler, Settings(model_names=(llm.name,)))) as url:
            _stream(url, PROMPTS[0], 4)  # warm up: first-call allocations, the RoPE tables
            for n in ns.streams:
                rounds = [load_round(url, n, ns.max_tokens) for _ in range(ns.reps)]
                rows.append(max(rounds, key=lambda r: r["decode_tokens_per_s"]))
                print(f"{n:3d} streams: {rows[-1]['decode_tokens_per_s']:.1f} decode tokens/s", flush=True)
    finally:
        scheduler.stop()
    path = write_result("serve", {"model": llm.name, "policy": llm.policy.name, "dtype": ns.dtype,
                                  "threads": torch.get_num_threads(), "max_tokens": ns.max_tokens, "results": rows})
    print(table(rows))
    print(f"wrote {path}")
    if ns.page:
        cpu = machine().get("cpu", "")
        Path(ns.page).write_text(
            f"# Serving: concurrent streams\n\n`python -m engine.bench serve` on {llm.name} ({ns.dtype}, policy "
            f"{llm.policy.name}, {torch.get_num_threads()} threads{', ' + str(cpu) if cpu else ''}): each stream a "
            f"streaming completion of {ns.max_tokens} tokens, all started together. Decode tokens/s counts the "
            f"stretch where every stream decodes; tokens/s with prefill is every token over the round's wall time; "
            f"TTFT and inter-token latency (ITL) as the clients saw them.\n\n"
            f"{table(rows)}\n\nRaw numbers: bench/results/{path.name}.\n")
    return 0
