"""Past one process, on torch.distributed (gloo on the CPU, NCCL on GPUs, started by torchrun).

- launch.py:          the process group from torchrun's environment, its timeout, who prints.
- shard.py:           which rows or columns of each weight a tensor-parallel rank holds (Megatron-style).
- tensor_parallel.py: the collectives a sharded model calls (deterministic sums, vocabulary gather,
                      heads mean for layer-wide policies, the sampled token's broadcast).
- sweep.py:           an evaluation sweep's cells spread over the ranks, merged on rank 0.
"""
from __future__ import annotations

from .launch import DistError, from_rank_zero, init_from_env, is_distributed, rank, speaks, world_size
from .shard import Shard, ShardError
from .tensor_parallel import TensorParallel

__all__ = ["DistError", "Shard", "ShardError", "TensorParallel", "from_rank_zero", "init_from_env",
           "is_distributed", "rank", "speaks", "world_size"]
