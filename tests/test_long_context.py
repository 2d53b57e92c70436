"""StreamingLLM with cache positions keeps the default model coherent well past its 8K context."""
from __future__ import annotations

import pytest
import torch

import engine
from engine.decode import decode_step
from engine.generate import SamplingParams
from engine.policies import Full


@pytest.fixture(scope="module")
def essays() -> str:
    from engine.eval import data

    try:
        return data.text("pg-essays")
    except data.DataError:
        data.fetch()
        return data.text("pg-essays")


def teacher_forced_nll(llm: engine.LLM, ids: list[int], n: int) -> tuple[torch.Tensor, engine.llm.Session]:
    """Prefill all but the last n tokens, then decode those n one step at a time: NLL of each."""
    session = llm.session()
    logits = session.feed(ids[:-n])
    nll = []
    for i, tid in enumerate(ids[-n:]):
        nll.append(-logits.float().log_softmax(-1)[0, tid])
        if i + 1 < n:
            logits = decode_step(llm.model, session.store, torch.tensor([tid]))
            session.tokens.append(tid)
    session.pending = [ids[-1]]  # fed with whatever comes next
    return torch.stack(nll), session


@pytest.mark.slow
def test_streaming_past_the_context(default_model_dir, essays):
    llm = engine.load(default_model_dir, policy="streaming", budget=1024, prefill_chunk=1024)
    ids = llm.tokenizer.encode(essays)[:12_000]
    assert len(ids) == 12_000 > llm.args.max_seq_len
    n = 48
    streamed, session = teacher_forced_nll(llm, ids, n)
    stats = llm.cache_stats()
    assert stats.tokens_seen == 12_000 - 1 and stats.occupancy == 1024 and stats.capacity == 1025  # last: pending

    full = engine.LLM(llm.model, llm.tokenizer, Full(), prefill_chunk=1024)
    reference, _ = teacher_forced_nll(full, ids[-2048:], n)  # the same tokens, inside the trained context
    assert streamed.mean() <= reference.mean() + 0.5, (streamed.mean(), reference.mean())

    words = "".join(session.stream([], SamplingParams(max_new_tokens=40))).split()
    english = [w for w in words if w.strip(".,;:!?'\"()").isalpha()]
    assert len(words) >= 15 and len(english) >= 0.8 * len(words) and len(set(words)) >= 8, words  # words, not debris
