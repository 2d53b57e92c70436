"""engine: a minimal LLaMA-family inference engine for studying KV-cache eviction under a fixed budget.

    import engine
    llm = engine.load("smollm2-135m-instruct", policy="weightedkv", budget=256)
    print(llm.generate("Once upon a time", max_new_tokens=64))
"""
from __future__ import annotations

__version__ = "0.1.0"

from .llm import LLM, ContextError, load
from .policies import list_policies

__all__ = ["LLM", "ContextError", "__version__", "list_policies", "load"]
