"""`python -m engine.bench serve`: the OpenAI-compatible server (engine.serve) under N concurrent streaming
clients: aggregate decode tokens/s, time to first token and inter-token latency (p50/p99), per N.

The server runs in this process on a free loopback port, the clients in threads (HTTP and SSE as any client
sees them). Every stream asks for --max-tokens tokens of a different prompt; all N start together and the
rate is the tokens they received over the time from the first request to the last end (prefills included);
the decode rate counts only the stretch where every stream has had its first token and none has ended.
What batching buys shows as the ratio of N streams' decode rate to one stream's (a step reads the weights
once for all of them).

Where llama-cpp-python's server is installed and --model is a .gguf file (the default model is one), its OpenAI
server runs beside ours on the same file with the same threads, driven by the same client code, alternating with
ours per stream count (ours 1, peer 1, ours 4, peer 4, ...) so that a drift in the machine's load hits both.
Neither server can be told to ignore EOS through the API (ours refuses logit_bias), so both stream greedy answers
to the same prompts and a stream's tokens are those actually streamed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import importlib.metadata
import json
import math
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..cli import COUNT, CommaList, add_model_args, policy_params, server_load_options
from ..results import write_result

PROMPTS = ["Once upon a time", "The history of the Roman Empire", "In a small village by the sea",
           "The best way to learn programming", "A recipe for bread:", "The planets of the solar system",
           "Dear diary, today", "The rules of chess are"]
PAGE = Path(__file__).resolve().parents[2] / "bench" / "SERVE.md"
PEER = "llama.cpp"
PEER_START_TIMEOUT = 300.0  # seconds for the peer to load the model and answer /v1/models


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--streams", type=CommaList(COUNT), default=[1, 4, 8, 16], help="concurrent streams, comma list")
    p.add_argument("--max-tokens", type=COUNT, default=64, help="tokens per stream")
    p.add_argument("--reps", type=COUNT, default=1, help="rounds per stream count (the best round is kept)")
    p.add_argument("--page", default=str(PAGE), help="Markdown page to write the table to ('' : none)")
    p.add_argument("--peer", choices=[PEER, "none"], default=PEER,
                   help="also measure llama-cpp-python's OpenAI server on the same .gguf file under the same load "
                        "(skipped with one line where it is not installed or --model is a folder)")


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def _stream(url: str, prompt: str, max_tokens: int) -> dict[str, object]:
    """One streaming completion: when each text chunk arrived, and its tokens: the final usage's count where
    the server reports one (ours), else the text chunks (llama.cpp's server streams a chunk per token and no
    usage)."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=600)
    start, arrivals, tokens = time.perf_counter(), [], None
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
    return {"start": start, "end": time.perf_counter(), "arrivals": arrivals,
            "tokens": len(arrivals) if tokens is None else tokens}


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


def _num(x: float, fmt: str, unit: str = "") -> str:
    """A table cell; NaN (no stretch where every stream decoded: a server that runs one request at a time) as -."""
    return "-" if math.isnan(x) else format(x, fmt) + unit


def table(rows: list[dict[str, float]], peer: list[dict[str, float]] | None = None) -> str:
    """Our rows, or with a peer's both servers' rows per stream count (each one's ratio is to its own 1 stream)."""
    servers = [("engine", rows)] + ([(PEER, peer)] if peer else [])
    lines = ["| streams | server | decode tokens/s | vs 1 stream | tokens/s with prefill | TTFT p50 (ms) "
             "| TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i in range(len(rows)):
        for name, rs in servers:
            r, one = rs[i], rs[0]["decode_tokens_per_s"]
            lines.append(f"| {r['streams']} | {name} | {_num(r['decode_tokens_per_s'], '.1f')} | "
                         f"{_num(r['decode_tokens_per_s'] / one, '.2f', 'x')} | {r['tokens_per_s']:.1f} | "
                         f"{r['ttft_ms_p50']:.0f} | {r['ttft_ms_p99']:.0f} | {r['itl_ms_p50']:.1f} | "
                         f"{r['itl_ms_p99']:.1f} |")
    return "\n".join(lines)


def peer_gguf(model: str, peer: str) -> Path | None:
    """The .gguf file the peer is to load: the one --model names (the default model's for its name), or None
    after one line saying why the peer is skipped (the same weights or no comparison)."""
    from ..fetch import resolve_model

    if peer == "none":
        return None
    path = resolve_model(model, packed=True)
    if path.suffix != ".gguf" or not path.is_file():
        print(f"{PEER} peer skipped: it needs a .gguf file and --model {model} is a folder")
        return None
    check = subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], capture_output=True, text=True)
    if check.returncode:  # checked in a child: libllama stays out of the process that runs our server
        why = (check.stderr.strip() or "no output").splitlines()[-1]
        print(f"{PEER} peer skipped: llama_cpp.server is not importable ({why}); "
              f"pip install 'llama-cpp-python[server]'")
        return None
    return path


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llama_cpp_server(gguf: Path, threads: int, n_ctx: int, host: str = "127.0.0.1") -> Iterator[str]:
    """llama-cpp-python's OpenAI server on `gguf` in a child process; yields its URL once /v1/models answers,
    and ends the child however the block ends (Ctrl-C and errors too). --interrupt_requests false: by
    default a waiting request cuts the running stream short, which would end N-1 of N streams early."""
    port = _free_port(host)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx), "--host", host, "--port", str(port),
           "--interrupt_requests", "false"]
    url = f"http://{host}:{port}"
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait_ready(child, url, log)
            yield url
        finally:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _wait_ready(child: subprocess.Popen, url: str, log: IO[bytes]) -> None:
    """Poll /v1/models until it answers 200; the child's exit or PEER_START_TIMEOUT is an error quoting its log."""
    deadline = time.monotonic() + PEER_START_TIMEOUT
    netloc = urllib.parse.urlsplit(url).netloc
    while time.monotonic() < deadline:
        if child.poll() is not None:
            log.seek(0)
            tail = " | ".join(log.read().decode(errors="replace").strip().splitlines()[-3:]) or "no output"
            raise ChildProcessError(f"the {PEER} server exited with code {child.returncode} before answering: {tail}")
        conn = http.client.HTTPConnection(netloc, timeout=5)
        try:
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:  # not listening yet
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise TimeoutError(f"the {PEER} server did not answer {url}/v1/models within {PEER_START_TIMEOUT:.0f} s")


def _round(url: str, n: int, ns: argparse.Namespace) -> dict[str, float]:
    """The best of --reps rounds of n streams by decode rate, then by the rate with prefill (the only one of a
    server that runs one request at a time: its decode rate is NaN)."""
    rounds = [load_round(url, n, ns.max_tokens) for _ in range(ns.reps)]
    return max(rounds, key=lambda r: (-math.inf if math.isnan(r["decode_tokens_per_s"]) else r["decode_tokens_per_s"],
                                      r["tokens_per_s"]))


def run(ns: argparse.Namespace) -> int:
    import torch

    from .. import load
    from ..results import machine
    from ..serve.app import Settings, create_app, serving
    from ..serve.scheduler import Scheduler

    gguf = peer_gguf(ns.model, ns.peer)
    llm = load(ns.model, policy=ns.policy, **server_load_options(ns), **policy_params(ns))
    threads, n_ctx = torch.get_num_threads(), ns.max_tokens + 256  # 256: room for the prompt
    scheduler = Scheduler(llm, max_batch=max(ns.streams), max_queue=max(ns.streams)).start()
    rows, peer_rows = [], []
    try:
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(serving(create_app(llm, scheduler, Settings(model_names=(llm.name,)))))
            peer_url = stack.enter_context(llama_cpp_server(gguf, threads, n_ctx)) if gguf else None
            for u in filter(None, (url, peer_url)):
                _stream(u, PROMPTS[0], 4)  # warm up: first-call allocations, the RoPE tables
            for n in ns.streams:
                ours = _round(url, n, ns)
                rows.append(ours)
                line = f"{n:3d} streams: {_num(ours['decode_tokens_per_s'], '.1f')} decode tokens/s"
                if peer_url:
                    theirs = _round(peer_url, n, ns)
                    peer_rows.append(theirs)
                    line += (f" ({ours['tokens_per_s']:.1f} with prefill); {PEER}: "
                             f"{_num(theirs['decode_tokens_per_s'], '.1f')} ({theirs['tokens_per_s']:.1f})")
                print(line, flush=True)
    finally:
        scheduler.stop()
    peer = None if not gguf else {
        "server": f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')}", "gguf": str(gguf),
        "threads": threads, "n_ctx": n_ctx, "order": "alternating with ours per stream count", "results": peer_rows}
    path = write_result("serve", {"model": llm.name, "policy": llm.policy.name, "dtype": ns.dtype,
                                  "threads": threads, "max_tokens": ns.max_tokens, "results": rows, "peer": peer})
    print(table(rows, peer_rows))
    print(f"wrote {path}")
    if ns.page:
        cpu = machine().get("cpu", "")
        beside = (f" Beside it, llama-cpp-python's own OpenAI server ({peer['server']}) on the same GGUF file "
                  f"({gguf.name}) with the same threads and the same client load, alternating with ours per "
                  f"stream count; it runs one request at a time (the others wait), so with several streams it "
                  f"has no stretch where all decode (-) and tokens/s with prefill is the column to compare. "
                  f"Neither server is asked to ignore EOS: both stream greedy answers to the same prompts and a "
                  f"stream counts the tokens it received." if peer else "")
        Path(ns.page).write_text(
            f"# Serving: concurrent streams\n\n`python -m engine.bench serve` on {llm.name} ({ns.dtype}, policy "
            f"{llm.policy.name}, {threads} threads{', ' + str(cpu) if cpu else ''}): each stream a "
            f"streaming completion of up to {ns.max_tokens} tokens, all started together. Decode tokens/s counts "
            f"the stretch where every stream decodes; tokens/s with prefill is every token over the round's wall "
            f"time; TTFT and inter-token latency (ITL) as the clients saw them.{beside}\n\n"
            f"{table(rows, peer_rows)}\n\nRaw numbers: bench/results/{path.name}.\n")
    return 0
