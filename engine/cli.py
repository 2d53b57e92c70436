"""What every command-line entry point shares: one parser class, the argument types of numeric flags,
model/policy flags and one-line user errors.

Every numeric flag takes one of the types below, so the same kind of flag refuses the same values with the
same words in every command: `error: --steps must be at least 1`, `error: --temperature must be a finite
number, got 'nan'`, `error: --budget must be an integer >= 1 (tokens) or a fraction in (0, 1], got '1.5'`.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, get_args, get_type_hints

from .kv import KV_DTYPES
from .policies import list_policies, policy_class
from .quant import WEIGHT_MODES

USER_ERRORS = (ValueError, OSError)  # OSError: a missing file, a read-only folder, a full disk, ...
FLAG_FIRST = re.compile(r"^argument (\S+): (?=must )")


class Parser(argparse.ArgumentParser):
    """argparse with the errors of every other user mistake: one line on stderr, exit code 2 (--help has
    the usage)."""

    def error(self, message: str) -> NoReturn:
        # "argument --steps: must be at least 1" -> "--steps must be at least 1", as the checks after parsing say it
        self.exit(2, "error: " + FLAG_FIRST.sub(r"\1 ", message) + "\n")


def add_subcommands(p: argparse.ArgumentParser, commands: dict[str, str], package: str) -> dict[str, Parser]:
    """A subcommand per module of `package` named in `commands` (name -> help): the module's docstring is
    its description and its `add_args` its flags. Each subcommand's parser, by name."""
    sub = p.add_subparsers(dest="command", required=True)
    subs = {}
    for name, help_text in commands.items():
        module = importlib.import_module(f".{name}", package)
        subs[name] = sub.add_parser(name, help=help_text, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(subs[name])
    return subs


def _refuse(message: str) -> NoReturn:
    raise argparse.ArgumentTypeError(message)


def _shown(text: str) -> str:
    """The refused text, quoted on one line and cut short (a 5000-digit number is not worth repeating)."""
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


@dataclass(frozen=True)
class Integer:
    """An integer flag in [lo, hi] (either end open when None)."""

    lo: int | None = None
    hi: int | None = None

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            _refuse(f"must be an integer, got {_shown(text)}")
        if self.lo is not None and value < self.lo:
            _refuse(f"must be at least {self.lo}")
        if self.hi is not None and value > self.hi:
            _refuse(f"must be at most {self.hi}")
        return value


@dataclass(frozen=True)
class Real:
    """A finite number in [lo, hi] (the low end open with open_lo): NaN and inf mean nothing for any flag."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            _refuse(f"must be a number, got {_shown(text)}")
        if not math.isfinite(value):
            _refuse(f"must be a finite number, got {_shown(text)}")
        if not self.contains(value):
            _refuse(f"must be {self.interval()}, got {value}")
        return value

    def contains(self, value: float) -> bool:
        above = self.lo is None or (value > self.lo if self.open_lo else value >= self.lo)
        return above and (self.hi is None or value <= self.hi)

    def interval(self) -> str:
        if self.hi is None:
            return f"{'above' if self.open_lo else 'at least'} {self.lo:g}"
        return f"in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}]"


INTEGER, REAL = Integer(), Real()  # policy fields: the policy checks the range
COUNT = Integer(1)  # steps, tokens, chunk sizes, ...: zero or fewer means nothing
NON_NEGATIVE = Integer(0)  # sinks, top-k: 0 is "none"
SEED = Integer(0, 2**64 - 1)  # the range of torch.Generator.manual_seed
THREADS = Integer(1, 1024)  # torch accepts a million and crashes at exit
NON_NEGATIVE_REAL = Real(0.0)  # temperature: 0 is greedy
FRACTION = Real(0.0, 1.0)  # depths in [0, 1]
FRACTION_OPEN = Real(0.0, 1.0, open_lo=True)  # top-p and fractional budgets, in (0, 1]
BUDGET_HELP = "an integer >= 1 (tokens per layer and KV head) or a fraction of the prompt in (0, 1]"


def budget_arg(text: str) -> int | float:
    """`256` is tokens, `0.5` is a fraction of the prompt; what is neither is refused here, in every command."""
    try:
        return COUNT(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        return FRACTION_OPEN(text)
    except argparse.ArgumentTypeError:
        _refuse(f"must be an integer >= 1 (tokens) or a fraction in (0, 1], got {_shown(text)}")


@dataclass(frozen=True)
class CommaList:
    """`a,b,c`, each item of `item`'s type; at least one."""

    item: Callable[[str], object]

    def __call__(self, text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            _refuse(f"must list at least one value, got {_shown(text)}")
        out = []
        for i, x in enumerate(items, 1):
            try:
                out.append(self.item(x))
            except argparse.ArgumentTypeError as e:
                _refuse(f"{e} (item {i} of {_shown(text)})" if len(items) > 1 else str(e))
        return out


BUDGETS = CommaList(budget_arg)




class SetThreads(argparse.Action):
    """--threads N: the CPU threads of torch and of our kernels (OpenMP), set as the flag is parsed, so
    before any op runs. Several engine processes on one machine should each get a share: two 2-thread
    processes on 2 cores decode 1.4-1.7x slower per step than two 1-thread ones (each waits for the
    other's time slices at every parallel matvec)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: int,
                 option_string: str | None = None) -> None:
        import torch

        torch.set_num_threads(value)  # THREADS has refused what is not a thread count
        setattr(namespace, self.dest, value)


def add_threads_arg(p: argparse.ArgumentParser, help_text: str = "CPU threads (default: every core)") -> None:
    p.add_argument("--threads", type=THREADS, action=SetThreads, help=f"{help_text}; 1 to 1024")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="model folder, .gguf file or name in weights/")
    p.add_argument("--policy", default="full", help=f"eviction policy: {', '.join(list_policies())}")
    p.add_argument("--budget", type=budget_arg, help=f"KV budget: {BUDGET_HELP}")
    p.add_argument("--sinks", type=NON_NEGATIVE, help="first tokens never evicted (>= 0)")
    p.add_argument("--recent", type=Integer(-1), help="newest tokens never evicted (>= 0; -1: budget // 2)")
    p.add_argument("--positions", choices=["original", "cache"], help="RoPE positions of cached keys")
    _add_policy_field_args(p)
    p.add_argument("--prefill-chunk", type=COUNT, help="prefill this many prompt tokens at a time (>= 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="compute dtype (packed weights on the CPU: float32)")
    p.add_argument("--weights", choices=WEIGHT_MODES,
                   help="packed: keep a .gguf file's quantized blocks (its default; the default model too); "
                        "packed-q8act: the same, decode products with 8-bit activations as llama.cpp makes them "
                        "(faster, not exact); "
                        "dequantize: unpack them to --dtype (a folder's default; exact comparison with the "
                        "papers' fp32/fp16 runs); q8_0 / q4_0: quantize a checkpoint at load")
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), help="dtype of the cached K and V (default: --dtype)")
    add_threads_arg(p, "CPU threads (default: every core; give each of several concurrent processes its share)")


def load_options(ns: argparse.Namespace) -> dict[str, object]:
    """The keyword arguments of engine.load that add_model_args' flags give (besides model and policy)."""
    return {"device": ns.device, "dtype": ns.dtype, "weights": ns.weights, "kv_dtype": ns.kv_dtype,
            "prefill_chunk": ns.prefill_chunk}


def server_load_options(ns: argparse.Namespace) -> dict[str, object]:
    """load_options for a server (engine.serve, engine.bench serve). Unless --weights says otherwise, a .gguf
    model (the default model too) serves with packed-q8act: llama.cpp's arithmetic, which its own server
    always uses. A batched step multiplies each weight block by every request's row, and with fp32
    activations that is bound by the multiply-adds (8 streams: 2.0-2.6x one stream's tokens/s on 2 cores),
    with 8-bit ones by reading the blocks (3.9-4.5x). `--weights packed` serves the exact product."""
    from .fetch import DEFAULT_MODEL  # fetch's CLI imports this module

    options = load_options(ns)
    if options["weights"] is None and (ns.model == DEFAULT_MODEL or str(ns.model).endswith(".gguf")):
        options["weights"] = "packed-q8act"
    return options


def _add_policy_field_args(p: argparse.ArgumentParser) -> None:
    """A flag per policy dataclass field beyond the common four, typed from the field where its policies agree."""
    common = {"budget", "sinks", "recent", "positions"}
    extra: dict[str, list[tuple[str, object, object]]] = {}
    for name in list_policies():
        hints = get_type_hints(policy_class(name))
        for field, _, default in policy_class(name).options():
            if field not in common:
                extra.setdefault(field, []).append((name, default, _field_type(hints[field])))
    for field, users in sorted(extra.items()):
        defaults = {d for _, d, _ in users}
        shown = str(defaults.pop()) if len(defaults) == 1 else "; ".join(f"{n}: {d}" for n, d, _ in users)
        kinds = {t for _, _, t in users}
        p.add_argument(f"--{field.replace('_', '-')}", dest=f"policy_{field}", metavar="V",
                       type=kinds.pop() if len(kinds) == 1 else str,
                       help=f"policy parameter of {', '.join(n for n, _, _ in users)} (default {shown})")


def _field_type(hint: object) -> Callable[[str], object]:
    """The flag type of a policy field: an int or a finite float, else the text (the policy checks ranges)."""
    options = get_args(hint) or (hint,)
    return INTEGER if int in options else REAL if float in options else str


def policy_params(ns: argparse.Namespace) -> dict[str, object]:
    """Flags -> keyword arguments of the chosen policy's dataclass, typed from its fields."""
    if ns.policy == "full":
        return {}
    cls = policy_class(ns.policy)
    hints = get_type_hints(cls)
    fields = {n for n, _, _ in cls.options()}
    params: dict[str, object] = {"budget": ns.budget, "sinks": ns.sinks, "recent": ns.recent,
                                 "positions": ns.positions}
    for key, value in vars(ns).items():
        if not key.startswith("policy_") or value is None:
            continue
        name = key[len("policy_"):]
        if name not in fields:
            raise ValueError(f"--{name.replace('_', '-')} is not a parameter of policy {ns.policy} "
                             f"(it takes: {', '.join(sorted(fields))})")
        params[name] = _convert(value, hints[name], name)
    return params


def _convert(value: object, hint: object, name: str) -> object:
    """A flag left as text (its policies disagree on the type) gets this policy's field type."""
    if not isinstance(value, str):
        return value
    try:
        return _field_type(hint)(value)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--{name.replace('_', '-')} {e}") from None


def describe(error: BaseException) -> str:
    """The one line of a user error: an OSError as `path: reason` (its errno number means nothing to a user)."""
    if isinstance(error, OSError) and error.strerror:
        names = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        return f"{names}: {error.strerror}" if names else error.strerror
    return str(error) or type(error).__name__


def _flush_stdout() -> None:
    """Flush stdout now; where it cannot be written (a full disk, a closed pipe), what is left goes nowhere,
    so that the interpreter's own flush at exit prints no second error."""
    try:
        sys.stdout.flush()
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI main: user errors and OS errors (a full disk, a read-only folder, ...) become one line on
    stderr and exit code 2, Ctrl-C exits 130, a reader that closed stdout (`| head`) ends it quietly. Any
    other exception is a bug and keeps its traceback. Started by torchrun among several ranks, a user error
    is said by rank 0 alone (every rank found it), a failed collective by each rank that saw it, and an error
    exit skips the interpreter's teardown there (launch.leave)."""
    from .dist import launch

    try:
        code = main()
        sys.stdout.flush()  # a full disk behind stdout is an error here, not a warning at exit
        launch.finish()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        launch.leave(130)
    except BrokenPipeError:
        _flush_stdout()
        launch.leave(1)
    except USER_ERRORS as e:
        if launch.speaks(e):
            print(f"error: {describe(e)}", file=sys.stderr)
        _flush_stdout()
        launch.leave(2)
    except Exception as e:
        if not out_of_memory(e):
            raise
        print(f"error: out of memory (a context, batch or budget too large for this machine?): "
              f"{str(e).strip().splitlines()[0]}", file=sys.stderr)
        launch.leave(2)
    sys.exit(code or 0)


def out_of_memory(e: BaseException) -> bool:
    """An allocation the machine cannot give: torch raises OutOfMemoryError on a GPU but a plain
    RuntimeError from the CPU allocator."""
    import torch

    return (isinstance(e, (MemoryError, torch.OutOfMemoryError))
            or isinstance(e, RuntimeError) and "can't allocate memory" in str(e))
