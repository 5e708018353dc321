"""What the benchmarks share: where their results go and how they are written, and the chat messages
of the arithmetic tasks the training benchmarks teach.

A benchmark runs as a script (`python benchmarks/NAME.py`), so it imports this as `_common`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
SYSTEM = "Answer with the result only."


def write_results(name: str, result: dict[str, Any], markdown: str | None = None, *, path: Path | None = None) -> Path:
    """RESULTS/NAME.json, or `path` (and the .md beside it when given); says where they went."""
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown, encoding="utf-8")
    print(f"wrote {path}" + (" and .md" if markdown is not None else ""))
    return path


def messages(instruction: str) -> list[dict[str, str]]:
    """A task as the student sees it: the short system prompt, then the instruction."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": instruction}]
