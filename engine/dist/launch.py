"""The process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...; a multi-node
rendezvous sets the same), with a timeout on every collective so that a rank that died or hangs ends
the run with one clear error instead of a hang. Only rank 0 prints: the others' stdout goes nowhere."""
from __future__ import annotations

import datetime as dt
import os
import sys

from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

TIMEOUT_ENV = "ENGINE_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks
DEFAULT_TIMEOUT_S = 600.0  # long enough for ranks that load a large model at different speeds
PATIENT = dt.timedelta(days=30)  # what a patient group waits: a person at the terminal, a sweep's slowest round


class DistError(ConnectionError):
    """A collective failed: another rank died, hung past the timeout, or the ranks disagree."""


def timeout_s() -> float:
    """The collective timeout: $ENGINE_DIST_TIMEOUT seconds, else DEFAULT_TIMEOUT_S."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e7:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def launched() -> bool:
    """Whether torchrun (or a launcher that sets the same variables) started this process among others."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the process group torchrun describes (once; later calls do nothing). gloo on the CPU, NCCL
    when `device` (default: cpu) is a GPU, each rank on GPU LOCAL_RANK.
    Returns whether this process is one of several."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched():
        return False
    device = torch.device(device or "cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as e:
        raise DistError(f"cannot join the process group ({first_line(e)}); start every rank with the same "
                        "torchrun command") from None
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
    return dist.get_world_size() > 1


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def first_rank() -> bool:
    """Whether this is rank 0 (or the only process); before the group is joined torchrun's RANK says."""
    return (rank() if is_distributed() else int(os.environ.get("RANK", "0") or 0)) == 0


def speaks(error: BaseException) -> bool:
    """Whether this rank reports `error`: rank 0 says a user error once for all (each rank found the same);
    a failed collective is said by every rank that saw it (rank 0 may be the one that died)."""
    return first_rank() or isinstance(error, DistError)


def patient_group() -> dist.ProcessGroup | None:
    """A gloo group of every rank whose collectives wait PATIENT, not the collective timeout, for what may
    take hours (the next line typed, a round of cells); a rank that dies is still seen at once, its
    connections close. None in one process. Every rank must call this, in the same order."""
    return dist.new_group(backend="gloo", timeout=PATIENT) if is_distributed() else None


def from_rank_zero(value: T, group: dist.ProcessGroup | None = None, what: str = "receiving rank 0's state") -> T:
    """Rank 0's `value` on every rank of `group` (default: all; itself in one process): what only rank 0
    could read. `what` names the wait in the error a dead rank causes."""
    if not is_distributed():
        return value
    box = [value]
    try:
        dist.broadcast_object_list(box, src=0, group=group)
    except RuntimeError as e:
        raise DistError(f"rank {rank()}: {what} failed ({first_line(e)}); a rank died") from None
    return box[0]


def finish() -> None:
    """Leave the process group at a normal exit (an error exit ends without it: leave)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End an error exit with `code`. One of several ranks ends at once, its output flushed, without the
    interpreter's teardown: gloo's worker threads may still hold the tensors of a collective, and releasing
    them while the interpreter finalises aborts the process (SIGABRT instead of `code`); leaving the group
    first could wait on a rank that died."""
    if not is_distributed():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
