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


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="model folder, .gguf file or name in weights/")
    p.add_argument("--policy", default="full", help=f"eviction policy: {', '.join(list_policies())}")
    p.add_argument("--budget", type=budget_arg, help="tokens kept per layer and KV head (int) or prompt fraction")
    p.add_argument("--sinks", type=int, help="first tokens never evicted")
    p.add_argument("--recent", type=int, help="newest tokens never evicted")
    p.add_argument("--positions", choices=["original", "cache"], help="RoPE positions of cached keys")
    p.add_argument("--policy-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="a policy-specific parameter (see --help-policy POLICY)")
    p.add_argument("--prefill-chunk", type=int, help="prefill this many prompt tokens at a time")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")


def policy_params(ns: argparse.Namespace) -> dict[str, object]:
    """Flags -> keyword arguments of the policy dataclass, typed from its fields."""
    cls = policy_class(ns.policy)
    hints = get_type_hints(cls)
    params: dict[str, object] = {"budget": ns.budget, "sinks": ns.sinks, "recent": ns.recent,
                                 "positions": ns.positions}
    for item in ns.policy_arg:
        name, sep, value = item.partition("=")
        if not sep or name not in {n for n, _, _ in cls.options()}:
            valid = ", ".join(n for n, _, _ in cls.options())
            raise ValueError(f"--policy-arg {item!r}: expected NAME=VALUE with NAME one of {valid}")
        kind = hints.get(name, str)
        params[name] = budget_arg(value) if name == "budget" else _convert(value, kind, name)
    if ns.policy == "full":
        params = {}
    return params


def _convert(value: str, kind: object, name: str) -> object:
    options = get_args(kind) or (kind,)
    for caster in (int, float, str):
        if caster in options:
            try:
                return caster(value)
            except ValueError:
                continue
    raise ValueError(f"--policy-arg {name}={value!r}: expected {kind}")


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
