"""An evaluation sweep spread over the ranks: each worker (a rank, or a tensor-parallel group of `tp`
consecutive ranks) loads the model once and takes every W-th cell; after each round of W cells every
rank receives them all, in cell order, so rank 0 writes the one results file exactly as one process
would, round by round (an interrupted sweep resumes from it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from .launch import DistError, first_line, init_from_env, patient_group, rank, world_size
from .tensor_parallel import TensorParallel


@dataclass
class Workers:
    """This rank's worker `index` of `count`, its tensor-parallel group (None: it loads the model whole)."""

    index: int = 0
    count: int = 1
    tp: TensorParallel | None = None
    tp_size: int = 1
    rounds: dist.ProcessGroup | None = None  # the group each round's cells are exchanged over

    def share(self, n: int) -> list[int]:
        """The cells of [0, n) this worker runs: its one per round."""
        return list(range(self.index, n, self.count))

    def exchange(self, cell: dict[str, Any] | None) -> list[dict[str, Any]]:
        """This round's cells from every worker, in worker order (a worker with no cell left sends None)."""
        if self.count == 1:
            return [] if cell is None else [cell]
        seen: list[Any] = [None] * world_size()
        try:
            dist.all_gather_object(seen, cell, group=self.rounds)
        except RuntimeError as e:
            raise DistError(f"rank {rank()}: exchanging a round of cells failed ({first_line(e)}); a rank died") from None
        return [c for c in seen[:: self.tp_size] if c is not None]


def workers(tp_size: int = 1, device: str | None = None) -> Workers:
    """The workers of the process group torchrun started (joined here, NCCL if `device` is a GPU): data-parallel
    by default, each worker `tp_size` ranks splitting the model between them. One process: a single worker."""
    if not init_from_env(device):
        if tp_size != 1:
            raise ValueError(f"--tp {tp_size} needs {tp_size} or a multiple of ranks, started by torchrun")
        return Workers()
    n, r = world_size(), rank()
    if tp_size < 1 or n % tp_size:
        raise ValueError(f"--tp {tp_size} must divide the number of ranks ({n})")
    groups = [dist.new_group(list(range(g, g + tp_size))) for g in range(0, n, tp_size)] if tp_size > 1 else []
    tp = TensorParallel(groups[r // tp_size]) if groups else None
    rounds = patient_group()  # a round waits for its slowest cell, which may take hours on a CPU
    return Workers(r // tp_size, n // tp_size, tp, tp_size, rounds)
