"""What every eval shares: the model and policy grid from flags, a resumable results file, progress.

A sweep is a grid of cells (policy x budget x whatever the eval adds). Each finished cell is written to
the results JSON at once (atomically), so an interrupted sweep picks up where it stopped; a results file
written with other settings is refused rather than mixed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..cli import BUDGET_HELP, BUDGETS, COUNT, add_model_args, load_options, policy_params
from ..dist import from_rank_zero, rank
from ..dist.sweep import Workers, workers
from ..policies import Policy, list_policies, make_policy, policy_class
from ..results import run_metadata, write_json


def add_grid_args(p: argparse.ArgumentParser) -> None:
    """Model flags plus a policy x budget grid (`--policies a,b --budgets 0.25,0.5` or one --policy/--budget)."""
    add_model_args(p)
    p.add_argument("--policies", help="comma-separated policies to sweep (default: --policy)")
    p.add_argument("--budgets", type=BUDGETS, help=f"comma-separated budgets to sweep, each {BUDGET_HELP} "
                                                   "(default: --budget)")
    p.add_argument("--out", help="results JSON (a sweep resumes from it; checked writable before anything runs)")
    p.add_argument("--tp", type=COUNT, default=1,
                   help="under torchrun: ranks per tensor-parallel group splitting the model (default 1: each "
                        "rank loads it whole and the sweep's cells are spread over the ranks)")


def grid(ns: argparse.Namespace) -> list[tuple[str, int | float | None]]:
    """(policy, budget) cells; `full` appears once, with no budget."""
    names = [s.strip() for s in ns.policies.split(",")] if ns.policies else [ns.policy]
    for n in names:
        policy_class(n)  # a clear error for an unknown name
    budgets = ns.budgets or [ns.budget]
    if any(n != "full" for n in names) and None in budgets:
        raise ValueError("a policy other than full needs a budget: --budget B or --budgets B1,B2")
    return [(n, None if n == "full" else b) for n in names for b in (budgets if n != "full" else [None])]


def build_policy(ns: argparse.Namespace, name: str, budget: int | float | None) -> Policy:
    """The policy of one cell: common flags apply to every policy, a policy-specific flag only to the
    policies that take it (an error if none in the sweep does)."""
    if name == "full":
        return make_policy("full")
    fields = {f for f, _, _ in policy_class(name).options()}
    sweep = {s.strip() for s in (ns.policies or ns.policy).split(",")}
    keep = {}
    for key, value in vars(ns).items():
        if key.startswith("policy_") and value is not None:
            field = key[len("policy_"):]
            if not any(field in {f for f, _, _ in policy_class(n).options()} for n in sweep if n != "full"):
                flag = "--" + field.replace("_", "-")
                raise ValueError(f"{flag} is not a parameter of any policy in {', '.join(sorted(sweep))}")
            if field not in fields:
                continue
        keep[key] = value
    one = argparse.Namespace(**{**keep, "policy": name, "budget": budget})
    return make_policy(name, **policy_params(one))


def check_out(path: str | Path) -> None:
    """Refuse an --out that cannot be written now, before the first cell rather than after it: no folder, its
    folder exists or can be made, and a file can be created there (what write_json's rename needs)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write --out {path}: it is a folder")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"cannot write --out {path}: {path.parent} is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write --out {path}: {e.strerror or e}") from None


def load_llm(ns: argparse.Namespace, team: Workers):
    """The model once, with the full cache; cells swap `llm.policy`. Under torchrun, whole on every rank
    or split over this worker's tensor-parallel group (`team`)."""
    import engine

    return engine.load(ns.model, policy="full", tensor_parallel=team.tp or False, **load_options(ns))


Item = TypeVar("Item")


def run_cells(items: Sequence[Item], compute: Callable[[Item], dict[str, Any]], team: Workers,
              desc: str) -> Iterator[dict[str, Any]]:
    """compute(item) for every item, yielded in item order on every rank. Under torchrun each worker of
    `team` computes its share and each round's cells reach every rank (engine.dist.sweep)."""
    if team.count == 1:
        for item in progress(items, len(items), desc):
            yield compute(item)
        return
    mine = set(team.share(len(items)))
    for start in progress(range(0, len(items), team.count), -(-len(items) // team.count), f"{desc} (rounds)"):
        at = start + team.index
        yield from team.exchange(compute(items[at]) if at in mine else None)


class Results:
    """A results JSON: {"meta": {...}, "cells": [...]}. Cells are keyed by `key_fields`. "started" is the
    first run's time, commit/date/machine those of the run that wrote the file last."""

    def __init__(self, path: str | Path | None, meta: dict[str, Any], key_fields: tuple[str, ...]):
        self.path = Path(path) if path else None
        self.key_fields = key_fields
        self.meta = {**meta, "policies_available": list_policies()}
        self.cells: list[dict[str, Any]] = []
        if self.path and self.path.is_file() and rank() == 0:
            self._resume(meta)
        # under torchrun every rank resumes from rank 0's file (the others' nodes may not see it): the same cells
        # done, the same cells left to share out
        self.meta["started"], self.cells = from_rank_zero((self.meta.get("started"), self.cells))
        if self.meta["started"] is None:
            self.meta["started"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.meta.update(run_metadata())

    def _resume(self, meta: dict[str, Any]) -> None:
        try:
            old = json.loads(self.path.read_text(encoding="utf-8"))
            old_meta, cells = old["meta"], old["cells"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise ValueError(f"{self.path} exists but is not a results file of this eval; use another --out") from None
        differ = [k for k, v in meta.items() if old_meta.get(k) != v]
        if differ:
            raise ValueError(f"{self.path} holds results with other settings ({', '.join(differ)}); "
                             f"use another --out or the same settings")
        self.meta["started"] = old_meta.get("started")
        self.cells = cells

    def key(self, cell: dict[str, Any]) -> tuple:
        return tuple(cell.get(k) for k in self.key_fields)

    def done(self, **key: Any) -> bool:
        want = tuple(key.get(k) for k in self.key_fields)
        return any(self.key(c) == want for c in self.cells)

    def add(self, cell: dict[str, Any]) -> None:
        self.cells = [c for c in self.cells if self.key(c) != self.key(cell)] + [cell]
        self.save()

    def save(self) -> None:
        if self.path is not None and rank() == 0:  # under torchrun every rank holds the cells, rank 0 writes
            write_json(self.path, {"meta": self.meta, "cells": self.cells})


def progress(items: Iterable[Any], total: int, desc: str) -> Iterator[Any]:
    """tqdm when installed (the `progress` extra), else one line per item on stderr (rank 0's only)."""
    if rank() != 0:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        for i, item in enumerate(items, 1):
            print(f"{desc}: {i}/{total}", file=sys.stderr, flush=True)
            yield item
        return
    yield from tqdm(items, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


def plot_path(out: str | Path | None, suffix: str) -> Path | None:
    """Where a plot next to the results JSON goes (None when there is no --out)."""
    return Path(out).with_name(Path(out).stem + suffix) if out else None


def task_table(summary: dict[str, dict[str, dict[str, float]]], metric: str, task_width: int, digits: int) -> str:
    """task -> policy -> budget -> value, as aligned text rows."""
    width = max(8, len(metric) + 2)
    rows = [f"{'task':<{task_width}}{'policy':<14}{'budget':>8}{metric:>{width}}"]
    for task, ps in summary.items():
        for policy, bs in sorted(ps.items()):
            for budget, value in bs.items():
                rows.append(f"{task:<{task_width}}{policy:<14}{budget:>8}{value:>{width}.{digits}f}")
    return "\n".join(rows)
