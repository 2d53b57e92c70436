"""PNG plots for the evals. matplotlib is optional (the `plot` extra): without it every function returns
None and the numbers stay in the JSON."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Series = dict[str, tuple[Sequence[float], Sequence[float]]]


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt: Any, n: int, ncols: int, size: tuple[float, float]) -> tuple[Any, list[Any]]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _save(plt: Any, fig: Any, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lines(path: Path, panels: dict[str, Series], xlabel: str, ylabel: str, title: str,
          hlines: dict[str, float] | None = None, logx: bool = False, logy: bool = False,
          ncols: int = 3) -> Path | None:
    """One panel per key of `panels`, one line per series; `hlines` are drawn dashed in every panel."""
    plt = _plt()
    if plt is None or not panels:
        return None
    fig, axes = _grid(plt, len(panels), ncols, (5.0, 3.6))
    for ax, (name, series) in zip(axes, panels.items()):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, label=label)
        for label, y in (hlines or {}).items():
            ax.axhline(y, linestyle="--", color="gray", label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=name)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    return _save(plt, fig, path, title)


def heatmaps(path: Path, grids: dict[str, tuple[Sequence[Sequence[float]], Sequence[Any], Sequence[Any]]],
             xlabel: str, ylabel: str, title: str, ncols: int = 3, vmin: float = 0.0, vmax: float = 1.0) -> Path | None:
    """One heatmap per key: (matrix [rows][cols], row labels, column labels); NaN cells stay blank."""
    plt = _plt()
    if plt is None or not grids:
        return None
    fig, axes = _grid(plt, len(grids), ncols, (4.2, 3.4))
    for ax, (name, (matrix, rows, cols)) in zip(axes, grids.items()):
        im = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize=7)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=name)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(plt, fig, path, title)


def histograms(path: Path, hists: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
               title: str, ncols: int = 3) -> Path | None:
    """One bar histogram per key: (bin edges, heights)."""
    plt = _plt()
    if plt is None or not hists:
        return None
    fig, axes = _grid(plt, len(hists), ncols, (4.2, 3.0))
    for ax, (name, (edges, heights)) in zip(axes, hists.items()):
        widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
        ax.bar(edges[:-1], heights, width=widths, align="edge")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=name)
    return _save(plt, fig, path, title)


def boxes(path: Path, groups: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str,
          logy: bool = False) -> Path | None:
    """One box (quartiles, 5-95% whiskers) per group, side by side."""
    plt = _plt()
    if plt is None or not groups:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(groups)), 4.0))
    ax.boxplot(list(groups.values()), whis=(5, 95), showfliers=False)
    ax.set_xticks(range(1, len(groups) + 1), list(groups), fontsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    return _save(plt, fig, path, title)


def scatters(path: Path, panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], xlabel: str,
             ylabel: str, title: str, logx: bool = False, logy: bool = False, ncols: int = 3) -> Path | None:
    """One panel per key; each panel holds labelled point sets."""
    plt = _plt()
    if plt is None or not panels:
        return None
    fig, axes = _grid(plt, len(panels), ncols, (4.2, 3.4))
    for ax, (name, sets) in zip(axes, panels.items()):
        for label, (xs, ys) in sets.items():
            ax.scatter(xs, ys, s=4, alpha=0.5, label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=name)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.legend(fontsize=7, markerscale=3)
    return _save(plt, fig, path, title)
