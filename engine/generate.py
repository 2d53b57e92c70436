"""Prompt chunks into the cache, sampling, stop rules and streaming of text pieces (decode steps: engine/decode/)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .kv import KVStore
from .model import Transformer

FLOAT32_TINY = torch.finfo(torch.float32).tiny
TOP_P_FIRST = 256  # the likeliest tokens top-p looks among first (they usually hold far more than top_p)


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # token ids never sampled (their logits go to -inf first): the EOS ids give a reply of exactly
    # max_new_tokens, as a benchmark needs; ids past the vocabulary are refused where it is known (Session)
    suppress: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Refuse here what sampling would turn into NaN probabilities or a torch error mid-reply."""
        _check_int("max_new_tokens", self.max_new_tokens, 0)
        _check_int("top_k", self.top_k, 0)
        if not isinstance(self.suppress, (tuple, list)):
            raise ValueError(f"suppress must be token ids, got {self.suppress!r}")
        for i in self.suppress:
            _check_int("suppress", i, 0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**64 - 1)  # torch.Generator.manual_seed's range
        _check_real("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be strings, got {self.stop!r}")


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {value}")


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@torch.inference_mode()
def prefill(model: Transformer, store: KVStore, ids: torch.Tensor, chunk: int | None = None,
            all_logits: bool = False) -> torch.Tensor:
    """Feed ids [B, T] in chunks of `chunk` tokens (default: all at once); returns logits of the last
    token [B, V], or of every token [B, T, V] with `all_logits`."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"prefill chunk must be an int >= 1 (or None: the whole prompt), got {chunk!r}")
    T = ids.shape[1]
    step = chunk or T
    outs = []
    for start in range(0, T, step):
        part = ids[:, start : start + step]
        store.begin_prefill(part.shape[1])
        outs.append(model(part, kv=store, phase="prefill", last_only=not all_logits))
        store.end_prefill(part.shape[1])
    return torch.cat(outs, dim=1) if all_logits else outs[-1][:, -1]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] -> [B]: the argmax when greedy, else an exponential race (argmax of p / Exp(1)) among the
    tokens that top-k and top-p keep."""
    if params.suppress:
        logits = logits.index_fill(-1, torch.tensor(params.suppress, device=logits.device), -float("inf"))
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs, ids = candidates(logits, params)
    # Exp(1) as -log(U), U at least float32's smallest normal, so no draw is infinite (a sole candidate's would
    # zero every ratio and pick index 0); torch's exponential_ takes ~10x longer over a whole vocabulary
    race = torch.rand(probs.shape, generator=generator, device=probs.device).clamp_min_(FLOAT32_TINY).log_().neg_()
    pick = (probs / race).argmax(dim=-1)
    return pick if ids is None else ids.gather(-1, pick[:, None])[:, 0]


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What sampling draws from: the probabilities after temperature and top-k over the vocabulary [B, V]
    and no ids; with top-p, those of the K likeliest tokens [B, K] (0 where top-p drops one) and their ids."""
    # The best token at 0 before scaling, the temperature at least float32's smallest normal: a tiny one sends
    # the rest to -inf (greedy, as it should be), never to inf - inf or 0 / 0 (NaN probabilities, token 0).
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(params.temperature, FLOAT32_TINY)
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = logits.softmax(-1)
    return (probs, None) if params.top_p == 1.0 else nucleus(probs, params.top_p)


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p without sorting the vocabulary (that sort alone cost more than the rest of sampling ten times
    over): the likeliest tokens, in order, up to and including the one whose mass crosses top_p. It looks
    among the TOP_P_FIRST likeliest and widens while a row's candidates hold less than top_p (one host read
    per look: whether they do); every token past them is dropped, since the mass before it is at least theirs.
    Returns the K candidates' probabilities (0 where dropped) and ids [B, K]."""
    V = probs.shape[-1]
    k = min(TOP_P_FIRST, V)
    while True:
        top, ids = probs.topk(k, dim=-1)  # likeliest first
        cum = top.cumsum(-1)
        if k == V or bool((cum[:, -1] >= top_p).all()):
            return top.masked_fill(cum - top >= top_p, 0.0), ids
        k = min(4 * k, V)


class StopFilter:
    """Holds back text that could still become a stop string; `feed` returns what is safe to show."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.pending, self.stopped = tuple(s for s in stops if s), "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((n for s in self.stops for n in range(len(s), 0, -1) if self.pending.endswith(s[:n])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
