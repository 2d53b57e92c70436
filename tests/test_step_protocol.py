"""The store's step protocol names each call's phase (begin_prefill/prefill/end_prefill, begin_decode/
decode/end_decode), so requests in different phases can take turns on one model, a prompt chunk of one
between decode steps of another (what a batched server does), and each gets exactly what it gets alone."""
from __future__ import annotations

import pytest
import torch

from engine.decode import decode_step
from engine.generate import prefill
from engine.llm import LLM
from engine.policies import list_policies

from .helpers import small, tiny_model, token_ids

CHUNK, STEPS = 6, 16


def _request(model, name: str, prompt: torch.Tensor):
    policy = small(name, 10) if name != "full" else small(name, 64)
    return LLM(model, None, policy).new_store(prompt.shape[1], STEPS + 1)


def _alone(model, name: str, prompt: torch.Tensor) -> tuple[list[torch.Tensor], object]:
    store = _request(model, name, prompt)
    logits = [prefill(model, store, prompt, CHUNK)]
    for _ in range(STEPS):
        logits.append(decode_step(model, store, logits[-1].argmax(-1)))
    return logits, store


@pytest.mark.parametrize("name", list_policies())
def test_requests_in_different_phases_take_turns(name):
    model = tiny_model(n_layers=3)
    a_prompt, b_prompt = token_ids(14, seed=1), token_ids(23, seed=2)
    a_want, a_ref = _alone(model, name, a_prompt)
    b_want, b_ref = _alone(model, name, b_prompt)

    a, b = _request(model, name, a_prompt), _request(model, name, b_prompt)
    a_got = [prefill(model, a, a_prompt, CHUNK)]
    b_chunks = [b_prompt[:, i : i + CHUNK] for i in range(0, b_prompt.shape[1], CHUNK)]
    b_got: list[torch.Tensor] = []
    for step in range(STEPS + len(b_chunks)):
        if step < STEPS:  # A decodes while B's prompt goes in chunk by chunk, then B decodes beside A
            a_got.append(decode_step(model, a, a_got[-1].argmax(-1)))
        if step < len(b_chunks):
            last = prefill(model, b, b_chunks[step])
            if step == len(b_chunks) - 1:
                b_got.append(last)
        else:
            b_got.append(decode_step(model, b, b_got[-1].argmax(-1)))
    for got, want in ((a_got, a_want), (b_got, b_want)):
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
    for store, ref in ((a, a_ref), (b, b_ref)):
        assert store.stats() == ref.stats()
        assert torch.equal(store.all.pos, ref.all.pos) and torch.equal(store.all.k, ref.all.k)
        assert torch.equal(store.all.v, ref.all.v)
