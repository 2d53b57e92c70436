"""How a decode step runs: the one place that chooses among the three paths, each in its own file.

- modules.py: through the model's modules. The definition; runs wherever the others cannot, and
  whenever a forward hook is set (engine.profile's stage ranges, a user's probes), so hooks fire.
- plan.py:    on the CPU, the same kernels called from one loop over arguments bound once (bit-equal).
- graphs.py:  on a GPU, the step captured once per cache phase and replayed (CUDA graphs).

Every path follows the store's step protocol (begin_decode, decode per layer, end_decode; see
engine/kv/store.py), so the store, the policy and the logits are the same whichever runs.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Literal

import torch
from torch.nn.modules import module as nn_module

from ..kv import KVStore
from ..model import Transformer
from . import modules, plan
from .graphs import CudaGraphs

Path = Literal["graphs", "plan", "modules"]

# Each model's submodules, listed once (walking ~360 modules every step costs more than checking them).
_submodules: weakref.WeakKeyDictionary[torch.nn.Module, list[torch.nn.Module]] = weakref.WeakKeyDictionary()


def has_forward_hooks(model: torch.nn.Module) -> bool:
    """Whether a forward (pre-)hook is set on `model`, any module in it, or globally. torch keeps these in
    private attributes; this is the one place that reads them."""
    subs = _submodules.get(model)
    if subs is None:
        subs = _submodules[model] = list(model.modules())[1:]  # not the model itself: the key must stay weak
    return (bool(model._forward_hooks or model._forward_pre_hooks)
            or any(m._forward_hooks or m._forward_pre_hooks for m in subs)
            or bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks))


class Decoder:
    """`step(token [B]) -> logits [B, V]` over one store, each step down the path `path()` names.

    CUDA graphs are used on a GPU unless `cuda_graphs=False`, and not for a policy that reads host values
    inside its step (`decode_layer_by_layer`, AhaKV: one warning)."""

    def __init__(self, model: Transformer, store: KVStore, cuda_graphs: bool = True):
        self.model, self.store = model, store
        self.graphs: CudaGraphs | None = None
        if cuda_graphs and store.device.type == "cuda":
            if store.policy.decode_layer_by_layer:
                warnings.warn(f"decoding without CUDA graphs: policy {store.policy.name} reads host values in "
                              "each decode step", RuntimeWarning, stacklevel=2)
            else:
                self.graphs = CudaGraphs(model, store)

    def path(self) -> Path:
        """The path the next step takes."""
        if has_forward_hooks(self.model):
            return "modules"
        if self.graphs is not None and not self.graphs.failed:
            return "graphs"
        return "plan" if plan.applies(self.model, self.store) else "modules"

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        path = self.path()
        if path == "graphs":
            logits = self.graphs.step(token)
            if logits is not None:
                return logits
        elif path == "plan":
            return plan.step(self.model, self.store, token)
        return modules.step(self.model, self.store, token)


def decode_step(model: Transformer, store: KVStore, token: torch.Tensor) -> torch.Tensor:
    """One eager decode step (no CUDA graphs): token [B] -> next-token logits [B, V]."""
    return Decoder(model, store, cuda_graphs=False).step(token)


__all__ = ["Decoder", "Path", "decode_step", "has_forward_hooks"]
