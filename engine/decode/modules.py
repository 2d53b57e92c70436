"""A decode step through the model's modules: the definition that the CPU plan and the CUDA graphs
reproduce, and the path that runs wherever they cannot."""
from __future__ import annotations

import torch

from ..kv import KVStore
from ..model import Transformer


def step(model: Transformer, store: KVStore, token: torch.Tensor) -> torch.Tensor:
    """One token per sequence [B] -> next-token logits [B, V]. Static shapes, no host sync inside."""
    store.begin_decode()
    logits = model(token[:, None], kv=store, phase="decode", last_only=True)[:, -1]
    store.end_decode()
    return logits
