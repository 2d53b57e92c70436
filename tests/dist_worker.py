"""What tests/test_distributed.py runs on every rank (and, for the reference, in one process): the same
code path either way, so the two are compared call for call.

    python -m tests.dist_worker policies MODEL OUT STEPS   every policy, both position modes
    python -m tests.dist_worker decode-forever MODEL OUT   decode until killed (the dead-rank test)
    python -m tests.dist_worker mean-heads MODEL OUT       TensorParallel.mean_heads of this rank's heads
    python -m tests.dist_worker load MODEL OUT DTYPES      load with dtype DTYPES[rank] (ranks that disagree)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import engine
from engine.cli import run_cli
from engine.decode import Decoder
from engine.dist import rank
from engine.generate import prefill
from engine.policies import list_policies, make_policy, policy_class
from tests.helpers import SMALL  # the parameters that leave room to evict under BUDGET, as in test_policies

BUDGET, PROMPT = 16, 24


def feed(n: int, vocab: int) -> torch.Tensor:
    """The tokens every run feeds (fixed, not sampled: a near-tie in the logits cannot change the input)."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))


def engine_policies() -> list[str]:
    """The policies engine itself registers (not one a test registered in this process)."""
    return [n for n in list_policies() if policy_class(n).__module__.startswith("engine.")]


def policy_runs(llm: engine.LLM, steps: int, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Per policy and position mode: this rank's slot positions after a prompt and `steps` decode steps
    ("pos/NAME/MODE", [L, Hkv, C]) and the last step's logits ("logits/NAME/MODE")."""
    ids = feed(PROMPT + steps, llm.args.vocab_size)
    out = {}
    for name in names or engine_policies():
        for positions in ("original", "cache"):
            extra = {} if name == "full" else dict(budget=BUDGET, **SMALL.get(name, {}))
            llm.policy = make_policy(name, positions=positions, **extra)
            store = llm.new_store(PROMPT, steps)
            logits = prefill(llm.model, store, ids[:, :PROMPT])
            step = Decoder(llm.model, store).step
            for t in range(PROMPT, PROMPT + steps):
                logits = step(ids[:, t])
            out[f"pos/{name}/{positions}"] = store.all.pos.clone()
            out[f"logits/{name}/{positions}"] = logits.clone()
    return out


def prompt_logits(llm: engine.LLM, n: int = 40) -> torch.Tensor:
    """Logits of a plain causal forward (no cache) over n fixed tokens."""
    return llm.logits(feed(n, llm.args.vocab_size))


def mean_inputs() -> dict[str, torch.Tensor]:
    """Score-like tensors (B, H, ...) of awkward sizes, values spread over decades so that the order of
    the sum over heads shows in the last bits; 40 and 64 heads reach torch's cascaded sum (past 16)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 8, 37), (2, 40, 29), (1, 64, 5, 3)]
    return {str(s): torch.rand(s, generator=g) * 10 ** torch.randn(s, generator=g) for s in shapes}


def main() -> int:
    mode, model, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if mode == "load":
        engine.load(model, weights="dequantize", dtype=sys.argv[4].split(",")[int(os.environ["RANK"])])
        return 0
    llm = engine.load(model, policy="full", weights="dequantize")
    if mode == "policies":
        result = policy_runs(llm, int(sys.argv[4]), sys.argv[5].split(",") if len(sys.argv) > 5 else None)
        result["prompt_logits"] = prompt_logits(llm)
        torch.save(result, out / f"rank{rank()}.pt")
    elif mode == "mean-heads":
        tp = llm.model.tp
        means = {}
        for key, x in mean_inputs().items():
            h = x.shape[1] // tp.size
            means[key] = tp.mean_heads(x[:, tp.rank * h : (tp.rank + 1) * h])
        torch.save(means, out / f"rank{rank()}.pt")
    elif mode == "decode-forever":
        llm.policy = make_policy("h2o", budget=BUDGET)
        store = llm.new_store(PROMPT, 10**6)
        step = Decoder(llm.model, store).step
        prefill(llm.model, store, feed(PROMPT, llm.args.vocab_size))
        (out / f"ready{rank()}").touch()
        token = torch.zeros(1, dtype=torch.long)
        while True:
            step(token)
    return 0


if __name__ == "__main__":
    run_cli(main)
