"""Decode steps replayed from CUDA graphs: one capture per cache phase, eager where capture cannot work.

A decode step (all layers, the policy's scoring and eviction) launches hundreds of small kernels; at
batch 1 the launch gaps cost as much as the work. KVStore keeps host values out of the step's tensor
ops (engine/cache.py), so the step is captured once and replayed. What host values still decide is
which ops run: whether the cache is still filling, whether the step evicts, and which RoPE table the
step reads. Those form the key of a captured graph.
"""
from __future__ import annotations

import warnings

import torch

from .cache import KVStore
from .generate import decode_step
from .model import Transformer

MAX_GRAPHS = 8  # phases are few; more keys means the RoPE table keeps moving (dynamic NTK past the context)


class GraphDecoder:
    """`step(token [B]) -> logits [B, V]`, the same as generate.decode_step, from a replayed graph on CUDA.

    A key is captured the second time it is seen (its first step runs eagerly and warms up the
    libraries' workspaces). Eager steps instead, with one warning: off CUDA or with `enabled=False`
    (silently), for a policy that reads host values inside its step (`layerwise_decode`, AhaKV), after
    a capture fails, and past MAX_GRAPHS keys."""

    def __init__(self, model: Transformer, store: KVStore, enabled: bool = True):
        self.model, self.store = model, store
        self.graphs: dict[tuple[bool, bool, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.seen: set[tuple[bool, bool, int]] = set()
        self.eager = not enabled or store.device.type != "cuda"
        if not self.eager and store.policy.layerwise_decode:
            self._fall_back(f"policy {store.policy.name} reads host values in each decode step")
        if not self.eager:
            self.token = torch.zeros(store.batch, dtype=torch.long, device=store.device)
            self.pool = torch.cuda.graph_pool_handle()

    def _fall_back(self, why: str) -> None:
        warnings.warn(f"decoding without CUDA graphs: {why}", RuntimeWarning, stacklevel=3)
        self.eager = True

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return decode_step(self.model, self.store, token)
        filling, evicting = self.store.prepare_decode()
        key = (filling, evicting, self.store.rope.cos.data_ptr())
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:
                self._fall_back(f"more than {MAX_GRAPHS} cache phases")
                return decode_step(self.model, self.store, token)
            if key not in self.seen:  # its first step runs eagerly
                self.seen.add(key)
                return decode_step(self.model, self.store, token)
            try:
                self.graphs[key] = self._capture()
            except RuntimeError as err:
                self._fall_back(f"capture failed: {str(err).strip().splitlines()[0]}")
                return decode_step(self.model, self.store, token)
        graph, logits = self.graphs[key]
        self.token.copy_(token)
        graph.replay()
        self.store.advance(1)
        return logits.clone()

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record one decode step (nothing runs while recording); the caller replays it."""
        graph, store = torch.cuda.CUDAGraph(), self.store
        store.static_length = True  # attend over every slot: the graph's shapes cannot follow `used`
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.model(self.token[:, None], kv=store, last_only=True)[:, -1]
                store.finish_decode()
        finally:
            store.static_length = False
        return graph, logits
