"""What every command-line entry point shares: model/policy flags and one-line user errors."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import get_args, get_type_hints

from .policies import list_policies, policy_class

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, UnicodeDecodeError)


def budget_arg(text: str) -> int | float:
    """`256` is tokens, `0.5` is a fraction of the prompt."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"budget must be an int or a fraction, got {text!r}") from None


class SetThreads(argparse.Action):
    """--threads N: the CPU threads of torch and of our kernels (OpenMP), set as the flag is parsed, so
    before any op runs. Several engine processes on one machine should each get a share: two 2-thread
    processes on 2 cores decode 1.4-1.7x slower per step than two 1-thread ones (each waits for the
    other's time slices at every parallel matvec)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: int,
                 option_string: str | None = None) -> None:
        if value < 1:  # type=int has already refused what is not an integer
            parser.error(f"--threads must be an integer >= 1, got {value}")
        import torch

        torch.set_num_threads(value)
        setattr(namespace, self.dest, value)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="model folder, .gguf file or name in weights/")
    p.add_argument("--policy", default="full", help=f"eviction policy: {', '.join(list_policies())}")
    p.add_argument("--budget", type=budget_arg, help="tokens kept per layer and KV head (int) or prompt fraction")
    p.add_argument("--sinks", type=int, help="first tokens never evicted")
    p.add_argument("--recent", type=int, help="newest tokens never evicted")
    p.add_argument("--positions", choices=["original", "cache"], help="RoPE positions of cached keys")
    common = {"budget", "sinks", "recent", "positions"}
    extra: dict[str, list[str]] = {}
    for name in list_policies():
        for field, _, default in policy_class(name).options():
            if field not in common:
                extra.setdefault(field, []).append((name, default))
    for field, users in sorted(extra.items()):
        defaults = {d for _, d in users}
        shown = str(defaults.pop()) if len(defaults) == 1 else "; ".join(f"{n}: {d}" for n, d in users)
        p.add_argument(f"--{field.replace('_', '-')}", dest=f"policy_{field}", metavar="V",
                       help=f"policy parameter of {', '.join(n for n, _ in users)} (default {shown})")
    p.add_argument("--prefill-chunk", type=int, help="prefill this many prompt tokens at a time")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, action=SetThreads,
                   help="CPU threads (default: every core; give each of several concurrent processes its share)")


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


def _convert(value: str, kind: object, name: str) -> object:
    options = get_args(kind) or (kind,)
    for caster in (int, float, str):
        if caster in options:
            try:
                return caster(value)
            except ValueError:
                continue
    raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected {kind}")


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI main: user errors become one line on stderr and exit code 2, Ctrl-C exits 130."""
    try:
        code = main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
