"""The collectives a tensor-parallel model calls, each deterministic: sums are taken after an all-gather,
in rank order, the same way on every rank, so the replicated residual stream stays bit-identical across
ranks and a run repeats exactly (an all-reduce may sum in any order). No host sync inside: a decode step
with them stays capturable in a CUDA graph under NCCL.

With one rank nothing here runs: the model holds no TensorParallel (`Transformer.tp is None`)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .launch import DistError, first_line, timeout_s
from .shard import Shard

T = TypeVar("T")
SPLIT_VOCAB = True  # the output head split by vocabulary (bench/DISTRIBUTED.md: faster than replicated on the CPU)


class TensorParallel:
    """One model's tensor-parallel group (default: every rank) with this rank's Shard. `seconds` and
    `calls` count the host time spent in collectives (bench/DISTRIBUTED.md)."""

    def __init__(self, group: dist.ProcessGroup | None = None, split_vocab: bool = SPLIT_VOCAB):
        self.group = group
        self.ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        self.size, self.rank = len(self.ranks), dist.get_rank(group)
        self.shard = Shard(self.rank, self.size, split_vocab)
        self.seconds, self.calls = 0.0, 0

    def _run(self, what: str, collective: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        try:
            out = collective()
        except RuntimeError as e:  # gloo and NCCL report a dead or silent peer as a RuntimeError
            raise DistError(f"rank {dist.get_rank()}: {what} with the other tensor-parallel ranks failed "
                            f"({first_line(e)}); a rank died or waited past the {timeout_s():g} s timeout "
                            f"(ENGINE_DIST_TIMEOUT)") from None
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """t (R, ...) from every rank -> (N, R, ...), in rank order."""
        out = t.new_empty(self.size * t.shape[0], *t.shape[1:])
        self._run("all_gather", lambda: dist.all_gather_single(out, t.contiguous(), group=self.group))
        return out.view(self.size, *t.shape)

    def add_reduced(self, partial: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x += the sum over ranks of `partial` (a row-parallel projection's share), in rank order; x returned."""
        return x.add_(self.gather(partial).sum(0))

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V/N) this rank's vocabulary rows -> (..., V) every rank's, in order."""
        lead, part = logits.shape[:-1], logits.shape[-1]
        every = self.gather(logits.reshape(-1, part))  # (N, rows, V/N)
        return every.transpose(0, 1).reshape(*lead, self.size * part)

    def mean_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, ...) this rank's heads -> (B, 1, ...) the mean over the heads of every rank: what a
        layer-wide decision (TOVA) takes over all heads. Every head is gathered and the mean taken over the
        whole (B, H, ...) laid out as in one process, so it is x.mean(1, keepdim=True) of one process bit for
        bit: summing per-rank partial sums would add in another order (torch adds the heads one after the
        other, cascading past 16), a last-bit change that can flip a near-tie between two tokens' scores.
        It moves N times the data of partial sums, B x H x C floats per layer and step for TOVA only."""
        every = self.gather(x).transpose(0, 1)  # (B, N, h, ...)
        return every.reshape(x.shape[0], -1, *x.shape[2:]).mean(1, keepdim=True)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """t as the group's first rank holds it, on every rank (in place): the token it sampled."""
        self._run("broadcast", lambda: dist.broadcast(t, self.ranks[0], group=self.group))
        return t

    def check_same(self, what: str, value: Any) -> None:
        """Every rank holds the same `value` (the model's settings), else an error naming the first rank that
        differs, said once, by the group's first rank (a DistError, which it speaks; ValueError, quiet, elsewhere)."""
        seen: list[Any] = [None] * self.size
        self._run("comparing settings", lambda: dist.all_gather_object(seen, value, group=self.group))
        for r, v in enumerate(seen):
            if v != seen[0]:
                error = DistError if self.rank == 0 else ValueError
                raise error(f"the tensor-parallel ranks disagree on {what}: rank {self.ranks[0]} has {seen[0]}, "
                            f"rank {self.ranks[r]} has {v}; start every rank with the same command")
