"""The README's code is run as written, so it cannot drift from the engine."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_custom_policy_runs(default_model_dir, capsys):
    section = README.split("## Your own policy", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("readme_example")  # dataclasses look their module up in sys.modules
    sys.modules[module.__name__] = module
    exec(compile(code, "README.md", "exec"), module.__dict__)
    out = capsys.readouterr().out
    assert "CacheStats(occupancy=64" in out and "evictions=" in out
    import engine

    assert "keynorm" in engine.list_policies()
