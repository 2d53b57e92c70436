"""`python weights/fetch.py [name]`: fetch/convert the default model (or resolve a named one), print its folder."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout without installing
from engine.fetch import main  # noqa: E402

main()
