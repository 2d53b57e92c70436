"""Decode steps replayed from CUDA graphs equal eager steps, for every policy whose step can be captured;
the fixed-shape attention a graph uses (every slot, masked) equals attention over the used slots (CPU too)."""
from __future__ import annotations

import pytest
import torch

from engine.generate import prefill
from engine.decode import Decoder
from engine.llm import LLM
from engine.model import Transformer
from engine.policies import Policy, list_policies, make_policy

from .helpers import small, tiny_model, token_ids

CAPTURABLE = [n for n in list_policies() if n != "ahakv"]  # AhaKV reads host values in its step


def policy_for(name: str, positions: str) -> Policy:
    return make_policy("full") if name == "full" else small(name, 12, positions=positions)


def decode(model: Transformer, policy: Policy, prompt: torch.Tensor, ids: torch.Tensor, *, graphs: bool = True,
           static_length: bool = False):
    """Prefill `prompt`, then feed `ids` one decode step each: logits (1, n + 1, V), the store, the decoder."""
    store = LLM(model, None, policy).new_store(prompt.shape[1], ids.shape[1] + 1)
    logits = [prefill(model, store, prompt.to(store.device))]
    decoder = Decoder(model, store, cuda_graphs=graphs)
    store.static_length = static_length
    for i in range(ids.shape[1]):
        logits.append(decoder.step(ids[:, i].to(store.device)))
    return torch.stack(logits, 1), store, decoder


def assert_same_cache(a, b) -> None:
    assert torch.equal(a.all.pos, b.all.pos)
    assert (a.t, a.used, a.occupancy, a.evictions) == (b.t, b.used, b.occupancy, b.evictions)
    assert torch.equal(a.clock, b.clock) and a.clock.tolist() == [a.t, a.used, a.qpos]


@pytest.mark.parametrize("positions", ["original", "cache"])
@pytest.mark.parametrize("name", list_policies())
def test_static_length_equals_used_slots(name, positions):
    """Attending over every slot (the empty ones masked) gives what attending over the used ones gives."""
    model, prompt, ids = tiny_model(), token_ids(9, seed=3), token_ids(30, seed=4)
    want, ref, _ = decode(model, policy_for(name, positions), prompt, ids, graphs=False)
    got, store, _ = decode(model, policy_for(name, positions), prompt, ids, graphs=False, static_length=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_same_cache(store, ref)


def test_decoder_off_cuda_is_eager():
    model, prompt, ids = tiny_model(), token_ids(9, seed=3), token_ids(5, seed=4)
    _, _, decoder = decode(model, policy_for("h2o", "original"), prompt, ids)
    assert decoder.graphs is None and decoder.path() != "graphs"


cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("positions", ["original", "cache"])
@pytest.mark.parametrize("name", CAPTURABLE)
def test_graph_replay_equals_eager(name, positions):
    """Prefill 9 tokens, 40 steps (the cache fills, then evicts every step): the same logits, the same
    slots kept, and the steps after the warm-up of each phase replayed from graphs."""
    model = tiny_model(device="cuda")
    prompt, ids = token_ids(9, seed=3), token_ids(40, seed=4)
    want, ref, eager = decode(model, policy_for(name, positions), prompt, ids, graphs=False)
    got, store, decoder = decode(model, policy_for(name, positions), prompt, ids)
    assert eager.path() != "graphs" and decoder.path() == "graphs" and decoder.graphs.graphs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_same_cache(store, ref)
    for a, b in zip(store.layers, ref.layers):
        torch.testing.assert_close(a.v, b.v, rtol=1e-5, atol=1e-6)  # weightedkv merges values
        for s in a.state:
            torch.testing.assert_close(a.state[s], b.state[s], rtol=1e-5, atol=1e-6)


@cuda
def test_graph_falls_back_for_a_layerwise_policy():
    model, prompt, ids = tiny_model(device="cuda"), token_ids(9, seed=3), token_ids(20, seed=4)
    want, _, _ = decode(model, small("ahakv", 12), prompt, ids, graphs=False)
    with pytest.warns(RuntimeWarning, match="ahakv reads host values"):
        got, _, decoder = decode(model, small("ahakv", 12), prompt, ids)
    assert decoder.graphs is None and decoder.path() != "graphs"
    assert torch.equal(got, want)
