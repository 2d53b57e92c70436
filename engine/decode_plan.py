"""A CPU decode step with its Python paid once: the kernels of Transformer.forward's decode path, called
straight from one loop over arguments bound when the plan is made.

On the CPU a decode step is ~180 kernel calls (the projections stream the weights; attention reads the
cache) and, through the modules, ~2000 Python-level calls around them: module calls, attribute
lookups, the op wrappers' checks and allocations. Each is cheap alone, but the projections stream
hundreds of MB through the caches between them, so that Python runs cold: at 2048 tokens on SmolLM2
the module path spends ~2.7 ms per step (of ~25) outside the kernels. This is what CUDA graphs do
on the GPU (engine/graphs.py), done the CPU's way: same kernels, same order, same buffers for the
cache and the policy (KVStore.decode runs as is), without the per-op Python.

It mirrors the decode branches of Attention.forward and FeedForward.forward, call for call; a test
checks that both give the same logits, bit for bit, every step, for every policy. The module path
stays the definition and runs whenever the plan cannot: off the CPU, without the compiled matvec
(the reference path, by request or by necessity), for batches above MATVEC_MAX_ROWS, and when any
module of the model has a forward hook (engine.profile's stage ranges, a user's probes).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from . import ops
from .cache import KVStore
from .model import Transformer

# Each store's plan, dropped with the store (a plan holds views of the store's buffers, never the store).
_plans: weakref.WeakKeyDictionary[KVStore, "DecodePlan"] = weakref.WeakKeyDictionary()


class DecodePlan:
    def __init__(self, model: Transformer, store: KVStore):
        args = model.args
        B, dtype, device = store.batch, model.tok_embeddings.weight.dtype, store.device
        self.model, self.eps = model, args.norm_eps
        self.layers = [(b.attention_norm.weight, b.attention.wqkv, b.attention.wo.weight, b.ffn_norm.weight,
                        b.feed_forward.w13, b.feed_forward.w2.weight) for b in model.layers]
        self.embedding, self.norm, self.output = model.tok_embeddings.weight, model.norm.weight, model.output.weight
        self.modules = list(model.modules())
        # the step's buffers: the fused q/k/v row and the gate/up row of one layer, reused by every layer
        self.qkv = torch.empty(B, self.layers[0][1].shape[0], dtype=dtype, device=device)
        self.gate_up = torch.empty(B, self.layers[0][4].shape[0], dtype=dtype, device=device)
        self.attended = store.out.view(B, -1)  # (B, H * D): what KVStore.decode returns, as wo's input

    def hooked(self) -> bool:
        """Whether a forward hook is set anywhere in the model (or globally): then its modules must run."""
        return (any(m._forward_hooks or m._forward_pre_hooks for m in self.modules)
                or bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks))

    def run(self, store: KVStore, token: torch.Tensor, matvec: Callable) -> torch.Tensor:
        """token [B] -> logits [B, V] (fp32), the store committed: generate.decode_step's contract."""
        qkv, gate_up, attended, eps = self.qkv, self.gate_up, self.attended, self.eps
        x = F.embedding(token, self.embedding)  # (B, dim), the residual stream, updated in place
        for layer, (attention_norm, wqkv, wo, ffn_norm, w13, w2) in enumerate(self.layers):
            matvec(x, wqkv, qkv, False, attention_norm, eps, False)
            store.decode(layer, qkv)  # writes the attention output into store.out (attended)
            matvec(attended, wo, x, True, None, 0.0, False)
            matvec(x, w13, gate_up, False, ffn_norm, eps, False)
            matvec(gate_up, w2, x, True, None, 0.0, True)
        logits = x.new_empty(x.shape[0], self.output.shape[0])
        matvec(x, self.output, logits, False, self.norm, eps, False)
        store.commit(1)
        return logits.float()


def step(model: Transformer, store: KVStore, token: torch.Tensor) -> torch.Tensor | None:
    """One decode step through the store's plan (made on first use), or None where the module path must
    run (see the module docstring)."""
    if store.device.type != "cpu" or store.batch > ops.MATVEC_MAX_ROWS or model.layers[0].attention.wqkv is None:
        return None
    if model.tok_embeddings.weight.dtype not in ops.MATVEC_DTYPES:
        return None
    matvec = ops.compiled_kernel("matvec", store.device)
    if matvec is None:
        return None
    plan = _plans.get(store)
    if plan is None or plan.model is not model or plan.layers[0][1] is not model.layers[0].attention.wqkv:  # re-fused
        plan = _plans[store] = DecodePlan(model, store)
    return None if plan.hooked() else plan.run(store, token, matvec)
