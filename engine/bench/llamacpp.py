"""`python -m engine.bench llama.cpp`: this engine against llama.cpp (llama-cpp-python) on one GGUF file
(bench/CPU.md).

    python -m engine.bench llama.cpp                      # 128, 2048, 8192 tokens of context, 2 threads
    python -m engine.bench llama.cpp --weights packed     # passed through to engine.load

Both engines live in one process, load the same GGUF and run with the same thread count; their runs
alternate (ours, llama.cpp, ours, ...), so the machine's noise hits both alike. Each run is a real
streamed generation measured the same way end to end: greedy, every end-of-generation token forbidden so
that each run yields exactly --tokens tokens (ours: `llm.stream(..., suppress=...)`; llama.cpp:
`create_completion(stream=True, logit_bias=...)`), the prompt the first N tokens of real text, the
whole context kept (full cache). Per run: the time to the first streamed piece (prefill plus the first
token; prefill tokens/s is the 512-token prompt over it) and the mean time per token after it, with
detokenization, stop checks and sampling in. H2O (our side only) runs beside them at the largest context.
Peak RSS: each engine alone in a fresh process (the largest context's run): the peak resident memory
above what the interpreter held after importing torch.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..cli import COUNT, THREADS
from ..results import write_result
from .timing import summary, time_alternating

# Where Paul Graham's essays are not fetched (`python -m engine.eval data fetch`): a public-domain text,
# repeated to length (Lincoln, Gettysburg, 1863).
FALLBACK_TEXT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great "
    "civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We "
    "are met on a great battle-field of that war. We have come to dedicate a portion of that field, as a final "
    "resting place for those who here gave their lives that that nation might live. It is altogether fitting "
    "and proper that we should do this. But, in a larger sense, we can not dedicate -- we can not consecrate "
    "-- we can not hallow -- this ground. The brave men, living and dead, who struggled here, have consecrated "
    "it, far above our poor power to add or detract. The world will little note, nor long remember what we say "
    "here, but it can never forget what they did here. It is for us the living, rather, to be dedicated here "
    "to the unfinished work which they who fought here have thus far so nobly advanced. It is rather for us to "
    "be here dedicated to the great task remaining before us -- that from these honored dead we take increased "
    "devotion to that cause for which they gave the last full measure of devotion -- that we here highly "
    "resolve that these dead shall not have died in vain -- that this nation, under God, shall have a new birth "
    "of freedom -- and that government of the people, by the people, for the people, shall not perish from "
    "the earth.\n\n"
)
PREFILL_TOKENS = 512
MISSING = ("engine.bench llama.cpp: llama_cpp is not installed (pip install llama-cpp-python, or the "
           "project's `bench` extra)")


def source_text() -> tuple[str, str]:
    """The prompt text and its name: the essays where fetched, else the fallback."""
    from ..eval import data

    try:
        return data.text("pg-essays"), "pg-essays"
    except data.DataError:
        return FALLBACK_TEXT, "gettysburg-address (repeated)"


def prompt_ids(encode: Callable[[str], list[int]], n: int, text: str) -> list[int]:
    """The first n tokens of `text` (repeated where it is shorter); ~8 characters per token is plenty."""
    ids: list[int] = []
    while len(ids) < n:
        ids += encode(text[: 8 * n])
    return ids[:n]


def load_kwargs(ns: argparse.Namespace) -> dict[str, str]:
    """engine.load's weight and cache options, only those given (a load that lacks them still works)."""
    return {k: v for k, v in (("weights", ns.weights), ("kv_dtype", ns.kv_dtype)) if v is not None}


def timed_stream(pieces: Callable[[], Any], tokens: int) -> dict[str, float]:
    """Run one streamed generation of exactly `tokens` tokens: seconds to the first piece and per token
    after it (the last piece's time less the first's, over the tokens - 1 decode steps between)."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in pieces()]
    if not stamps:
        raise RuntimeError("the generation streamed nothing")
    out = {"first_s": stamps[0] - t0}
    if tokens > 1:
        out["per_token_s"] = (stamps[-1] - stamps[0]) / (tokens - 1)
    return out


def ours_run(llm, ids: list[int], tokens: int, suppress: Sequence[int]) -> dict[str, float]:
    """One greedy llm.stream of exactly `tokens` tokens (checked on the cache's clock)."""
    r = timed_stream(lambda: llm.stream(ids, max_new_tokens=tokens, suppress=suppress), tokens)
    if llm.store.t != len(ids) + tokens - 1:  # the last token is sampled, never fed
        raise RuntimeError(f"our generation fed {llm.store.t - len(ids)} tokens after the prompt, not {tokens - 1}")
    return r


def theirs_run(llama, ids: list[int], tokens: int, bias: dict[int, float]) -> dict[str, float]:
    """One greedy llama.cpp completion of exactly `tokens` tokens, from an empty cache (reset: no reuse of
    the previous run's prompt)."""
    finish: list[str] = []

    def chunks() -> Any:
        for chunk in llama.create_completion(ids, max_tokens=tokens, temperature=0.0, repeat_penalty=1.0,
                                             stream=True, logit_bias=bias):
            finish.append(chunk["choices"][0]["finish_reason"])
            yield chunk

    llama.reset()
    r = timed_stream(chunks, tokens)
    if finish[-1] != "length":
        raise RuntimeError(f"llama.cpp stopped before {tokens} tokens ({finish[-1]})")
    return r


def open_llama(path: Path, n_ctx: int, threads: int):
    """llama.cpp on the GGUF with its defaults, bar the context and the threads."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)


def end_of_generation_ids(llama, ours: Sequence[int]) -> list[int]:
    """Every token llama.cpp ends a generation on, plus our tokenizer's EOS ids: both engines forbid these."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    return sorted({*ours, *(i for i in range(llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i))})


def cell(runs: list[dict[str, float]]) -> dict[str, object]:
    """Medians over the timed runs (the first, a warm-up, dropped)."""
    runs = runs[1:]
    out: dict[str, object] = {"first_s": summary([r["first_s"] for r in runs])}
    if "per_token_s" in runs[0]:
        out["per_token_s"] = summary([r["per_token_s"] for r in runs])
        out["tok_s"] = 1 / out["per_token_s"]["median"]
    return out


def alternate(runners: dict[str, Callable[[], dict[str, float]]], reps: int) -> dict[str, dict[str, object]]:
    """Each runner once to warm up, then `reps` rounds in turn; each one's cell."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    fns = {name: (lambda name=name: runs[name].append(runners[name]())) for name in runners}
    time_alternating(fns, reps=reps, warmup=1)  # the runners time themselves; time_alternating sets the order
    return {name: cell(r) for name, r in runs.items()}


def bench(ns: argparse.Namespace, gguf: Path) -> tuple[dict[str, object], list[int]]:
    """The alternating runs at each context and at the 512-token prefill: medians and ratios; also the
    largest context's prompt and the forbidden ids (for the peak-RSS runs)."""
    import engine
    import llama_cpp

    ours = engine.load(gguf, **load_kwargs(ns))
    h2o = engine.load(gguf, policy="h2o", budget=ns.budget, **load_kwargs(ns))
    room = ours.args.max_seq_len - ns.tokens - 1  # llama.cpp's context holds prompt + tokens + 1
    contexts = sorted({min(c, room) for c in ns.contexts})
    llama = open_llama(gguf, max(*contexts, PREFILL_TOKENS) + ns.tokens + 1, ns.threads)
    forbid = end_of_generation_ids(llama, ours.tokenizer.eos_ids)
    bias = {i: -float("inf") for i in forbid}
    text, text_name = source_text()

    def runners(ids: list[int], tokens: int, with_h2o: bool) -> dict[str, Callable[[], dict[str, float]]]:
        out = {"ours": lambda: ours_run(ours, ids, tokens, forbid),
               "llama.cpp": lambda: theirs_run(llama, ids, tokens, bias)}
        if with_h2o:
            out["ours_h2o"] = lambda: ours_run(h2o, ids, tokens, forbid)
        return out

    results: dict[str, object] = {}
    for ctx in contexts:
        ids = prompt_ids(ours.tokenizer.encode, ctx, text)
        with_h2o = ctx == contexts[-1] and ctx > ns.budget
        row: dict[str, object] = alternate(runners(ids, ns.tokens, with_h2o), ns.reps)
        o, t = row["ours"], row["llama.cpp"]
        if ns.tokens > 1:
            row["decode_speed_vs_llama_cpp"] = o["tok_s"] / t["tok_s"]
            line = (f"ctx {ctx:5d}: ours {o['per_token_s']['median'] * 1e3:6.2f} ms/token, llama.cpp "
                    f"{t['per_token_s']['median'] * 1e3:6.2f} -> ours at {row['decode_speed_vs_llama_cpp']:.2f}x "
                    "llama.cpp's tokens/s")
            if with_h2o:
                row["h2o_vs_llama_cpp_full"] = row["ours_h2o"]["tok_s"] / t["tok_s"]
                line += (f"; h2o@{ns.budget} {row['ours_h2o']['per_token_s']['median'] * 1e3:6.2f} ms/token = "
                         f"{row['h2o_vs_llama_cpp_full']:.2f}x")
            print(line, flush=True)
        results[str(ctx)] = row
    ids = prompt_ids(ours.tokenizer.encode, PREFILL_TOKENS, text)
    row = alternate(runners(ids, 1, False), ns.reps)
    row["prefill_tok_s"] = {k: PREFILL_TOKENS / row[k]["first_s"]["median"] for k in ("ours", "llama.cpp")}
    row["prefill_speed_vs_llama_cpp"] = row["llama.cpp"]["first_s"]["median"] / row["ours"]["first_s"]["median"]
    results[f"prefill_{PREFILL_TOKENS}"] = row
    print(f"prefill {PREFILL_TOKENS} tokens: ours {row['prefill_tok_s']['ours']:6.0f} tok/s, llama.cpp "
          f"{row['prefill_tok_s']['llama.cpp']:6.0f} -> {row['prefill_speed_vs_llama_cpp']:.2f}x", flush=True)
    doc = {"text": text_name, "contexts": contexts, "forbidden_ids": forbid, "llama_cpp": llama_cpp.__version__,
           "results": results}
    return doc, prompt_ids(ours.tokenizer.encode, contexts[-1], text)


# ---- peak RSS, each engine alone --------------------------------------------------------------------

def vm_hwm() -> int:
    """This process's peak RSS in bytes since the last reset_peak()."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    """Set the peak to the current RSS. ru_maxrss cannot be reset, and a child inherits its parent's: a
    worker forked from the bench's process (both models loaded) would start above its own peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_worker(spec_path: str) -> None:
    """In a fresh process: one generation at the spec's context by one engine; prints the peak RSS (bytes)
    it added above the interpreter with torch imported."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    reset_peak()
    base = vm_hwm()
    ids, tokens = spec["ids"], spec["tokens"]
    if spec["engine"] == "ours":
        import engine

        llm = engine.load(spec["gguf"], **spec["load"])
        ours_run(llm, ids, tokens, spec["forbid"])
    else:
        llama = open_llama(Path(spec["gguf"]), len(ids) + tokens + 1, spec["threads"])
        theirs_run(llama, ids, tokens, {i: -float("inf") for i in spec["forbid"]})
    print(vm_hwm() - base)


def peak_rss(name: str, spec: dict[str, object]) -> int:
    """peak_rss_worker for `name` in its own interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps({**spec, "engine": name}))
        code = f"from engine.bench.llamacpp import peak_rss_worker; peak_rss_worker({str(path)!r})"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"peak RSS run of {name} failed: {proc.stderr.strip()[-2000:]}")
    return int(proc.stdout.split()[-1])


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a GGUF file (default: the default model's, SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--weights", help="engine.load's weights= (passed only when given)")
    p.add_argument("--kv-dtype", help="engine.load's kv_dtype= (passed only when given)")
    p.add_argument("--contexts", type=COUNT, nargs="+", default=[128, 2048, 8192],
                   help="prompt tokens before the timed tokens (capped so the full cache fits the model)")
    p.add_argument("--tokens", type=COUNT, default=32, help="tokens generated per run (>= 1)")
    p.add_argument("--reps", type=COUNT, default=3, help="timed runs of each engine per context, after one warm-up (>= 1)")
    p.add_argument("--threads", type=THREADS, default=2, help="CPU threads of both engines (default 2)")
    p.add_argument("--budget", type=COUNT, default=256, help="H2O's budget at the largest context (>= 1)")


def run(ns: argparse.Namespace) -> int:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit(MISSING) from None
    import torch

    from ..fetch import default_gguf

    torch.set_num_threads(ns.threads)
    gguf = Path(ns.model) if ns.model else default_gguf(lambda msg: print(msg, file=sys.stderr))
    doc, ids = bench(ns, gguf)
    spec = {"gguf": str(gguf), "threads": ns.threads, "tokens": ns.tokens, "load": load_kwargs(ns),
            "forbid": doc["forbidden_ids"], "ids": ids}
    rss = {name: peak_rss(name, spec) for name in ("ours", "llama.cpp")}
    print(f"peak RSS at {len(ids)} tokens (above interpreter + torch): ours {rss['ours'] / 2**20:.0f} MiB, "
          f"llama.cpp {rss['llama.cpp'] / 2**20:.0f} MiB")
    path = write_result("llama-cpp", {"model": gguf.name, "threads": ns.threads, "tokens": ns.tokens,
                                      "reps": ns.reps, "budget": ns.budget, "load": load_kwargs(ns),
                                      **doc, "peak_rss_bytes": {"prompt_tokens": len(ids), **rss}})
    print(f"wrote {path}")
    return 0
