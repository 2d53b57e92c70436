"""Decode steps replayed from CUDA graphs: one capture per cache phase.

A decode step (all layers, the policy's scoring and eviction) launches hundreds of small kernels; at
batch 1 the launch gaps cost as much as the work. KVStore keeps host values out of the step's tensor
ops (engine/kv/store.py), so the step is captured once and replayed. What host values still decide is
which ops run: whether the cache is still filling, whether the step evicts, and which RoPE table the
step reads. Those form the key of a captured graph.
"""
from __future__ import annotations

import warnings

import torch

from ..kv import KVStore
from ..model import Transformer

MAX_GRAPHS = 8  # phases are few; more keys means the RoPE table keeps moving (dynamic NTK past the context)


class CudaGraphs:
    """`step(token [B]) -> logits [B, V]` from a replayed graph, or None where this step must run eagerly.

    A key is captured the second time it is seen (its first step runs eagerly and warms up the
    libraries' workspaces). After a failed capture, or past MAX_GRAPHS keys, `failed` is set (with one
    warning) and every later step runs eagerly."""

    def __init__(self, model: Transformer, store: KVStore):
        self.model, self.store = model, store
        self.graphs: dict[tuple[bool, bool, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.seen: set[tuple[bool, bool, int]] = set()
        self.failed = False
        self.token = torch.zeros(store.batch, dtype=torch.long, device=store.device)
        self.pool = torch.cuda.graph_pool_handle()

    def _fail(self, why: str) -> None:
        warnings.warn(f"decoding without CUDA graphs: {why}", RuntimeWarning, stacklevel=4)
        self.failed = True

    def step(self, token: torch.Tensor) -> torch.Tensor | None:
        filling, evicting = self.store.prepare_decode()
        key = (filling, evicting, self.store.rope.cos.data_ptr())
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:
                self._fail(f"more than {MAX_GRAPHS} cache phases")
                return None
            if key not in self.seen:  # its first step runs eagerly
                self.seen.add(key)
                return None
            try:
                self.graphs[key] = self._capture()
            except RuntimeError as err:
                self._fail(f"capture failed: {str(err).strip().splitlines()[0]}")
                return None
        graph, logits = self.graphs[key]
        self.token.copy_(token)
        graph.replay()
        self.store.advance_decode()
        return logits.clone()

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record one decode step (nothing runs while recording); the caller replays it."""
        graph, store = torch.cuda.CUDAGraph(), self.store
        store.pin_shapes()
        store.static_length = True  # attend over every slot: the graph's shapes cannot follow `used`
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                store.begin_decode()
                logits = self.model(self.token[:, None], kv=store, phase="decode", last_only=True)[:, -1]
                store.finish_decode()
        finally:
            store.static_length = False
        return graph, logits
