"""`python -m engine.chat`: answer one prompt (--prompt) or chat in the terminal."""
from __future__ import annotations

import argparse
import sys

from .cli import add_model_args, policy_params, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.chat", description=__doc__)
    add_model_args(p)
    p.add_argument("--prompt", help="answer this once and exit ('-' reads stdin)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--transcript", help="append every turn to this JSONL file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    import engine

    params = policy_params(ns)
    llm = engine.load(ns.model, policy=ns.policy, device=ns.device, dtype=ns.dtype,
                      prefill_chunk=ns.prefill_chunk, **params)
    sampling = dict(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p,
                    top_k=ns.top_k, seed=ns.seed)
    if ns.prompt is None:
        raise ValueError("the interactive chat is not written yet; pass --prompt TEXT (or - for stdin)")
    prompt = sys.stdin.read() if ns.prompt == "-" else ns.prompt
    messages = ([{"role": "system", "content": ns.system}] if ns.system else []) + [{"role": "user", "content": prompt}]
    for piece in llm.stream(llm.tokenizer.apply_chat(messages), **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
