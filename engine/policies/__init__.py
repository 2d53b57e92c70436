"""Eviction policies by name. Register your own with `register` (see the README)."""
from __future__ import annotations

from .base import Policy, PolicyError
from .ahakv import AhaKV
from .cam import CaM
from .full import Full
from .h2o import H2O
from .keepkv import KeepKV
from .scissorhands import Scissorhands
from .snapkv import SnapKV
from .streaming import Streaming
from .tova import TOVA
from .vatp import VATP
from .views import DecodeView, LayerState, PrefillView
from .weightedkv import WeightedKV

_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a Policy subclass available by its `name` (CLI, load(policy="name"))."""
    if not cls.name:
        raise PolicyError(f"{cls.__name__} needs a class attribute `name`")
    _REGISTRY[cls.name] = cls
    return cls


def list_policies() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PolicyError(f"unknown policy {name!r}; valid: {', '.join(list_policies())}") from None


def make_policy(name: str, **params: object) -> Policy:
    """Build a policy by name; `None` values keep the policy's defaults."""
    cls = policy_class(name)
    known = {f for f, _, _ in cls.options()}
    unknown = sorted(set(params) - known)
    if unknown:
        raise PolicyError(f"{name}: no parameter {unknown[0]!r} (it takes: {', '.join(sorted(known))})")
    return cls(**{k: v for k, v in params.items() if v is not None})


for _cls in (Full, Streaming, H2O, Scissorhands, TOVA, SnapKV, VATP, AhaKV, WeightedKV, CaM, KeepKV):
    register(_cls)

__all__ = ["AhaKV", "CaM", "DecodeView", "Full", "H2O", "KeepKV", "LayerState", "Policy", "PolicyError", "PrefillView", "Scissorhands", "SnapKV",
           "Streaming", "TOVA", "VATP", "WeightedKV", "list_policies", "make_policy", "policy_class", "register"]
