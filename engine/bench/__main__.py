"""`python -m engine.bench`: the command line of engine/bench/__init__.py."""
from __future__ import annotations

from ..cli import run_cli
from . import main

if __name__ == "__main__":
    run_cli(main)
