"""`python -m engine.eval`: perplexity, retrieval, LongBench and the value-norm analysis, plus their data.

    python -m engine.eval data fetch
    python -m engine.eval ppl --dataset pg-essays --tokens 8192 --policies full,h2o,vatp \\
        --budgets 0.125,0.25,0.5 --out ppl.json
    python -m engine.eval retrieval --tasks niah,passkey,squad --lengths 1024,2048 --depths 0,0.5,1 \\
        --policies full,h2o,vatp --budgets 0.25,0.5 --out ret.json
    python -m engine.eval longbench --data DIR --tasks hotpotqa,trec --preset vatp --out lb.json
    python -m engine.eval analysis --dataset pg-essays --tokens 2048 --out analysis.json
"""
from __future__ import annotations

import argparse
import importlib

from ..cli import Parser, add_subcommands, run_cli
from .common import check_out

COMMANDS = {
    "ppl": "streaming perplexity under a KV budget",
    "retrieval": "needle in a haystack, passkey, SQuAD/HotpotQA in a haystack",
    "longbench": "the 16 English LongBench tasks from local jsonl files",
    "analysis": "value norms, accumulated attention, sinks, kept positions",
    "data": "fetch, check or list the evaluation data",
}


def parser() -> Parser:
    p = Parser(prog="python -m engine.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subcommands(p, COMMANDS, __package__)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    if getattr(ns, "out", None):
        check_out(ns.out)  # before any data or model loads, not after the first cell
    return importlib.import_module(f".{ns.command}", __package__).run(ns)


if __name__ == "__main__":
    run_cli(main)
