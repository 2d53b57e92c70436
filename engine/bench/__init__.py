"""`python -m engine.bench {model,kernels,gpu,serve,llama.cpp}`: speed, measured as ratios against a peer timed in the same run.

    python -m engine.bench                            # model: engine vs transformers vs the matvec floor
    python -m engine.bench --policy h2o --budget 256  # flags without a subcommand go to model
    python -m engine.bench allocation --policy h2o --budget 256  # uniform vs adaptive vs pyramid allocation
    python -m engine.bench kernels                    # each op vs its reference, attention vs SDPA
    python -m engine.bench gpu --preset smollm2-135m  # CUDA: full cache vs policies, eager vs CUDA graph
    python -m engine.bench serve                      # the server under concurrent streams
    python -m engine.bench llama.cpp                  # streamed generation vs llama.cpp on the same GGUF
    python -m engine.bench distributed                # tensor-parallel decode at 1, 2, 3 ranks (torchrun)

Each subcommand takes only the flags it uses (`python -m engine.bench SUBCOMMAND --help`). Results go to
bench/results/<name>-<date>.json ($ENGINE_BENCH_DIR elsewhere).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..cli import Parser, add_subcommands

COMMANDS = {
    "model": "a real model: decode and prefill vs transformers, or a policy's overhead (the default)",
    "allocation": "one policy under uniform, adaptive and pyramid allocation: decode step time ratios, KV bytes per layer",
    "kernels": "each op vs its reference, attention vs SDPA, on random inputs",
    "gpu": "CUDA decode of a random model: full cache vs policies, eager vs CUDA graph",
    "serve": "the OpenAI-compatible server under 1, 4, 8, 16 concurrent streams: tokens/s, TTFT, inter-token latency",
    "llamacpp": "streamed generation vs llama.cpp on one GGUF (also as `llama.cpp`)",
    "distributed": "tensor-parallel CPU decode at 1, 2, 3 ranks under torchrun: step time, time in collectives",
}
ALIASES = {"llama.cpp": "llamacpp"}  # a subcommand's name that cannot be its module's


def parsers() -> tuple[Parser, dict[str, Parser]]:
    """The top-level parser and each subcommand's."""
    p = Parser(prog="python -m engine.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subs = add_subcommands(p, COMMANDS, __package__)
    for alias, name in ALIASES.items():
        subs[name].prog = f"{p.prog} {alias}"
    return p, subs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments that do not start with a subcommand are `model`'s, so the command lines of the bench's
    first, single-mode form still work."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ALIASES:
        argv[0] = ALIASES[argv[0]]
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["model", *argv]
    p, subs = parsers()
    ns, unknown = p.parse_known_args(argv)
    if unknown:  # the subcommand's name in the error, not the top level's
        subs[ns.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return ns


def main(argv: list[str] | None = None) -> int:
    """Parse and run one subcommand."""
    ns = parse_args(argv)
    return importlib.import_module(f".{ns.command}", __package__).run(ns)
