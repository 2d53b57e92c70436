"""A CPU decode step with its Python paid once: the kernels of Transformer.forward's decode path, called
straight from one loop over arguments bound when the plan is made.

On the CPU a decode step is ~180 kernel calls (the projections stream the weights; attention reads the
cache) and, through the modules, ~2000 Python-level calls around them: module calls, attribute
lookups, the op wrappers' checks and allocations. Each is cheap alone, but the projections stream
hundreds of MB through the caches between them, so that Python runs cold: at 2048 tokens on SmolLM2
the module path spends ~2.7 ms per step (of ~25) outside the kernels. This is what CUDA graphs do
on the GPU (graphs.py), done the CPU's way: same kernels, same order, same buffers for the
cache and the policy (KVStore.decode runs as is), without the per-op Python.

It mirrors the decode branches of Attention.forward and FeedForward.forward, call for call; a test
checks that both give the same logits, bit for bit, every step, for every policy. The module path
(modules.py) stays the definition and runs whenever the plan cannot (`applies`; engine/decode/__init__.py
also sends hooked models there).

Under tensor parallelism (model.tp) wo and w2 write their partial products into a scratch row that the
group's deterministic sum adds into the residual (model.add_projection's split, the same collective), and
a vocabulary-split head's logits are gathered; with one process neither runs.
"""
from __future__ import annotations

import weakref
import torch

from .. import ops
from ..kv import KVStore
from ..model import Transformer

# Each store's plan, dropped with the store (a plan holds views of the store's buffers, never the store).
_plans: weakref.WeakKeyDictionary[KVStore, "DecodePlan"] = weakref.WeakKeyDictionary()


class DecodePlan:
    """The decode path's kernel arguments for one model and store, bound once: weights, buffers, views.
    Each projection is a product bound to its weight (ops.bound_matvec: dense or packed, the same call)."""

    def __init__(self, model: Transformer, store: KVStore):
        args = model.args
        B, dtype, device = store.batch, model.tok_embeddings.weight.dtype, store.device
        self.model, self.eps, self.fused = model, args.norm_eps, model.layers[0].attention.wqkv
        self.layers = [(b.attention_norm.weight, ops.bound_matvec(b.attention.wqkv), ops.bound_matvec(b.attention.wo.weight),
                        b.ffn_norm.weight, ops.bound_matvec(b.feed_forward.w13),
                        ops.bound_matvec(b.feed_forward.w2.weight)) for b in model.layers]
        self.embedding, self.norm = model.tok_embeddings.weight, model.norm.weight
        self.output = ops.bound_matvec(model.output.weight)
        # the step's buffers: the fused q/k/v row and the gate/up row of one layer, reused by every layer
        block = model.layers[0]
        self.qkv = torch.empty(B, block.attention.wqkv.shape[0], dtype=dtype, device=device)
        self.gate_up = torch.empty(B, block.feed_forward.w13.shape[0], dtype=dtype, device=device)
        self.vocab = model.output.weight.shape[0]
        self.attended = store.out.view(B, -1)  # (B, H * D): what KVStore.decode returns, as wo's input
        self.tp, self.gathers_vocab = model.tp, model.vocab_cut is not None
        self.partial = None if model.tp is None else torch.empty(B, args.dim, dtype=dtype, device=device)

    def run(self, store: KVStore, token: torch.Tensor) -> torch.Tensor:
        """token [B] -> logits [B, V] (fp32), the store's step ended: modules.step's contract."""
        qkv, gate_up, attended, eps, tp = self.qkv, self.gate_up, self.attended, self.eps, self.tp
        store.begin_decode()
        x = ops.embedding(token, self.embedding)  # (B, dim), the residual stream, updated in place
        # wo and w2 add into x, or under tensor parallelism write this rank's share for the group's sum
        out, accumulate = (x, True) if tp is None else (self.partial, False)
        for layer, (attention_norm, wqkv, wo, ffn_norm, w13, w2) in enumerate(self.layers):
            wqkv(x, qkv, False, attention_norm, eps, False)
            store.decode(layer, qkv)  # writes the attention output into store.out (attended)
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
        store.end_decode()
        return logits.float()


def applies(model: Transformer, store: KVStore) -> bool:
    """Whether the plan can run this model over this store: on the CPU, at most MATVEC_MAX_ROWS sequences,
    fused weights, and a compiled product for every weight (not the reference kernels, by request or for
    want of the extension; dense weights in a dtype the matvec takes, or packed blocks)."""
    if store.device.type != "cpu" or store.batch > ops.MATVEC_MAX_ROWS:
        return False
    block = model.layers[0]
    weights = (block.attention.wqkv, block.attention.wo.weight, block.feed_forward.w13,
               block.feed_forward.w2.weight, model.output.weight)
    return block.attention.wqkv is not None and all(ops.bound_matvec(w) is not None for w in weights)


def step(model: Transformer, store: KVStore, token: torch.Tensor) -> torch.Tensor:
    """One decode step through the store's plan, made on first use (and again if the model is re-fused)."""
    plan = _plans.get(store)
    if plan is None or plan.model is not model or plan.fused is not model.layers[0].attention.wqkv:
        plan = _plans[store] = DecodePlan(model, store)
    return plan.run(store, token)
