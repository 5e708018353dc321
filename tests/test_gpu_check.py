"""The GPU check cannot run here (no GPU), but it must not rot: its imports and arguments are checked on CPU."""

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def test_the_gpu_check_imports_what_exists():
    names = runpy.run_path(str(SCRIPT), run_name="gpu_check")  # runs the imports and definitions, not main()
    assert callable(names["main"]) and callable(names["train"])

