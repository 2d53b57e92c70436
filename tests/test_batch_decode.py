"""The batched decode step (engine/decode/batch.py): a row's matvec bits do not depend on the rows beside
it, and a request decoded with others gets the logits and the cache of its own decode step, bit for bit,
whatever policies, budgets and lengths the others have, and as requests join and leave."""
from __future__ import annotations

import gguf
import pytest
import torch

from engine import ops
from engine.decode import batch, decode_step
from engine.generate import prefill
from engine.llm import LLM

from .helpers import packed_twin, small, tiny_model, token_ids

Q = gguf.GGMLQuantizationType

pytestmark = pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="the batched step binds the compiled matvec")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prologue", ["none", "norm", "swiglu", "accumulate"])
@pytest.mark.parametrize("K", [64, 88, 200])  # 32-element blocks, and the 16-, 8- and scalar tails
def test_matvec_row_bits_do_not_depend_on_rows(dtype, prologue, K):
    """Row m of an M-row matvec equals the one-row matvec of x[m], bit for bit, for M = 1..8 and beyond
    (another pass over w)."""
    matvec = ops.compiled_kernel("matvec", torch.device("cpu"))
    g = torch.Generator().manual_seed(K)
    N, M = 40, 19
    w = torch.randn(N, K, generator=g).to(dtype)
    x = torch.randn(M, 2 * K if prologue == "swiglu" else K, generator=g).to(dtype)
    norm = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype) if prologue == "norm" else None
    start = torch.randn(M, N, generator=g).to(dtype)
    alone = start.clone()
    for m in range(M):
        matvec(x[m : m + 1], w, alone[m : m + 1], prologue == "accumulate", norm, 1e-5, prologue == "swiglu")
    for rows in [*range(1, 10), 16, 17, M]:
        out = start[:rows].clone()
        matvec(x[:rows], w, out, prologue == "accumulate", norm, 1e-5, prologue == "swiglu")
        assert torch.equal(out, alone[:rows]), f"{rows} rows"


REQUESTS = [  # (policy, budget, prompt length): evicting and not, per-head and layer-wide, fused and raw acc
    ("full", 64, 9), ("h2o", 12, 14), ("streaming", 10, 5), ("tova", 12, 20), ("snapkv", 12, 16),
    ("weightedkv", 12, 11), ("ahakv", 14, 18), ("scissorhands", 12, 13), ("vatp", 12, 7), ("keepkv", 12, 15),
]


def _prefilled(model, name, budget, length, seed, steps):
    llm = LLM(model, None, small(name, budget))
    store = llm.new_store(length, steps + 1)
    return store, prefill(model, store, token_ids(length, seed=seed))


@pytest.mark.parametrize("weights", ["dense", "packed", "packed-q8act"])
def test_batched_step_equals_each_requests_own_step(weights):
    """Ten requests of different policies, budgets and lengths decode together past their budgets, joining
    and leaving at step boundaries: each one's logits every step, and its store at the end, equal those of
    the same request decoded alone (on packed weights too: q/k/v and gate/up of two types; and with 8-bit
    activations, whose kernel computes 8 weight rows and up to 8 requests at a time). Most stores run a layer's
    attention in one ops.decode_layers call for all of them, the others (value norms, layer-by-layer policies)
    through their own store.decode: both ways give each request its own bits."""
    model, steps = tiny_model(n_layers=3), 24
    if weights != "dense":
        model, _ = packed_twin(model, {"": Q.Q4_1, "wv.weight": Q.Q8_0, "w1.weight": Q.Q4_0},
                               q8_activations=weights == "packed-q8act")
    alone, together, tokens = [], [], []
    for seed, (name, budget, length) in enumerate(REQUESTS):
        a, logits = _prefilled(model, name, budget, length, seed, steps)
        b, _ = _prefilled(model, name, budget, length, seed, steps)
        alone.append(a), together.append(b), tokens.append(int(logits.argmax(-1)))
    done, kinds = [0] * len(REQUESTS), set()
    for t in range(steps + len(REQUESTS)):
        members = [i for i in range(len(REQUESTS)) if i <= t and done[i] < steps - i % 4]  # staggered in and out
        if not members:
            break
        assert batch.applies(model, [together[i] for i in members])
        step = batch.BatchStep(model, [together[i] for i in members])
        kinds |= {"one call"} if len(step.together) > 1 else set()
        kinds |= {"store.decode"} if step.alone else set()
        logits = step(torch.tensor([tokens[i] for i in members]))
        for row, i in enumerate(members):
            own = decode_step(model, alone[i], torch.tensor([tokens[i]]))
            assert torch.equal(logits[row : row + 1], own), f"request {i} ({REQUESTS[i][0]}), step {done[i]}"
            tokens[i], done[i] = int(own.argmax(-1)), done[i] + 1
    assert kinds == {"one call", "store.decode"}, "both ways of a layer's attention ran: ops.decode_layers, store.decode"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a.stats() == b.stats(), REQUESTS[i][0]
        for x, y in zip(a.layers, b.layers):
            assert torch.equal(x.k, y.k) and torch.equal(x.v, y.v) and torch.equal(x.pos, y.pos)
            assert all(torch.equal(x.state[n], y.state[n]) for n in x.state)


def test_batched_step_stands_aside():
    """A store of two sequences, or a hooked model, is not the batched step's: the caller decodes alone."""
    model = tiny_model(n_layers=2)
    one, _ = _prefilled(model, "h2o", 12, 5, 0, 4)
    assert batch.applies(model, [one])
    wide = LLM(model, None, small("h2o", 12)).new_store(5, 4, batch=2)
    assert not batch.applies(model, [one, wide])
    handle = model.register_forward_hook(lambda *_: None)
    try:
        assert not batch.applies(model, [one])
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="at least one store"):
        batch.BatchStep(model, [])
