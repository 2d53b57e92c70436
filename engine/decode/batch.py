"""One CPU decode step for several requests, each with its own KVStore: the weights are read once for all.

A KVStore's counters (tokens seen, slots used, occupancy) are shared by its batch rows, so requests of
different lengths, policies or budgets cannot share one store. Each request keeps its own store (batch 1,
prefilled alone, as LLM.stream does it); a batched step stacks the requests' residual rows into one
[R, dim] tensor, so that every projection (q/k/v, wo, gate/up, down, the output head) is one matvec over
all R rows, while attention and eviction run per request through its own store's step protocol.

It mirrors plan.DecodePlan.run call for call, with the products the plan bound (dense or packed). The
compiled matvec and qmatvec give a row the same bits whatever the number of rows beside it
(csrc/cpu/matvec.cpp, qmatvec_kernels.inc), so a request's logits equal those of its own plan step, bit for
bit (tests/test_batch_decode.py). The stores whose layer step is just the two attention kernels
(KVStore.batchable: most policies) run them for one layer in a single ops.decode_layers call, which spreads
the requests over the threads: at chat lengths each request's attention is too small to split, and two op
calls per request and layer cost more than the attention itself. It gives each request the same bits too.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import ops
from ..kv import KVStore
from ..model import Transformer
from . import has_forward_hooks, plan


def applies(model: Transformer, stores: Sequence[KVStore]) -> bool:
    """Whether the batched step can run these stores: each one's own plan could (CPU, compiled matvec,
    fused weights), each holds one sequence, and no forward hook wants the modules' path."""
    return (not has_forward_hooks(model)
            and all(s.batch == 1 and plan.applies(model, s) for s in stores))


class BatchStep:
    """A decode step over a fixed list of single-sequence stores, its buffers and views bound once: make
    a new one when a request joins or leaves (at a step boundary)."""

    def __init__(self, model: Transformer, stores: Sequence[KVStore]):
        if not stores:
            raise ValueError("a batched decode step needs at least one store")
        first = plan.DecodePlan(model, stores[0])  # the bound weights; its buffers are one row's
        R, dtype, device = len(stores), first.qkv.dtype, stores[0].device
        self.model, self.stores, self.eps = model, list(stores), first.eps
        self.layers, self.embedding, self.norm, self.output = first.layers, first.embedding, first.norm, first.output
        self.vocab, self.tp, self.gathers_vocab = first.vocab, first.tp, first.gathers_vocab
        self.partial = None if first.tp is None else torch.empty(R, first.partial.shape[1], dtype=dtype, device=device)
        self.qkv = torch.empty(R, first.qkv.shape[1], dtype=dtype, device=device)
        self.gate_up = torch.empty(R, first.gate_up.shape[1], dtype=dtype, device=device)
        self.attended = torch.empty(R, first.attended.shape[1], dtype=dtype, device=device)
        self.qkv_rows = [self.qkv[i : i + 1] for i in range(R)]  # request i's row, as its store takes it
        self.outs = [s.out.view(1, -1) for s in self.stores]  # where each store writes its attention output
        rows = list(zip(self.stores, self.qkv_rows))
        self.together = [(s, row) for s, row in rows if s.batchable]  # one ops.decode_layers call per layer
        self.alone = [(s, row) for s, row in rows if not s.batchable]  # store.decode, one by one
        self.operands = [layer_operands(self.together, layer) for layer in range(len(self.layers))]

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [R] (request i's last token at i) -> logits [R, V] (fp32), every store's step ended."""
        qkv, gate_up, attended, eps, tp = self.qkv, self.gate_up, self.attended, self.eps, self.tp
        for store in self.stores:
            store.begin_decode()
        step = step_operands([s for s, _ in self.together])
        x = ops.embedding(tokens, self.embedding)  # (R, dim), the residual stream, updated in place
        # wo and w2 add into x, or under tensor parallelism write this rank's share for the group's sum
        out, accumulate = (x, True) if tp is None else (self.partial, False)
        for layer, (attention_norm, wqkv, wo, ffn_norm, w13, w2) in enumerate(self.layers):
            wqkv(x, qkv, False, attention_norm, eps, False)
            if self.together:
                ops.decode_layers(**self.operands[layer], **step)
            for store, row in self.alone:
                store.decode(layer, row)
            torch.cat(self.outs, out=attended)
            wo(attended, out, accumulate, None, 0.0, False)
            if tp is not None:
                tp.add_reduced(out, x)
            w13(x, gate_up, False, ffn_norm, eps, False)
            w2(gate_up, out, accumulate, None, 0.0, True)
            if tp is not None:
                tp.add_reduced(out, x)
        logits = x.new_empty(x.shape[0], self.vocab)
        self.output(x, logits, False, self.norm, eps, False)
        if self.gathers_vocab:
            logits = tp.gather_vocab(logits)
        for store in self.stores:
            store.end_decode()
        return logits.float()


def layer_operands(rows: Sequence[tuple[KVStore, torch.Tensor]], layer: int) -> dict[str, list]:
    """What ops.decode_layers takes for one layer that stays the same from step to step: each store's
    qkv row, step rows and layer buffers, as its KVStore.decode passes them to the two kernels."""
    ops_args: dict[str, list] = {name: [] for name in ("qkv", "slot", "rotate_key", "q_out", "k_cache", "v_cache",
                                                        "pos", "out", "score_acc", "probs_out", "rope_rank")}
    for store, row in rows:
        st, step = store.layers[layer], store.step_rows[layer]
        for name, value in (("qkv", row), ("slot", step.slot), ("rotate_key", not store.cache_positions),
                            ("q_out", step.q), ("k_cache", st.k), ("v_cache", st.v), ("pos", st.pos),
                            ("out", store.out), ("score_acc", st.state["acc"] if store.fused_acc else None),
                            ("probs_out", step.probs), ("rope_rank", st.rank if store.cache_positions else None)):
            ops_args[name].append(value)
    return ops_args


def step_operands(stores: Sequence[KVStore]) -> dict[str, Any]:
    """What ops.decode_layers takes that moves with each step (the same for every layer): each store's
    query RoPE row and attended length (after begin_decode), its RoPE tables where keys rotate on the fly."""
    return dict(cos=[s.query_cos for s in stores], sin=[s.query_sin for s in stores],
                length=[s.decode_length() for s in stores], scale=stores[0].scale if stores else 1.0,
                rope_cos=[s.rope.cos if s.cache_positions else None for s in stores],
                rope_sin=[s.rope.sin if s.cache_positions else None for s in stores])
