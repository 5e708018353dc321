"""What the benchmarks share: where their results go and how they are written, the chat messages
of the arithmetic tasks the training benchmarks teach, and paired intervals over seeds in Markdown.

A benchmark runs as a script (`python benchmarks/NAME.py`), so it imports this as `_common`.
"""

from __future__ import annotations

import json
import math
import statistics
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


# two-sided 95% critical values of Student's t, by degrees of freedom (beyond 30: the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def interval(values: list[float]) -> dict[str, Any]:
    """Mean, sample std and the 95% t-interval of the mean (None with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "std": 0.0, "ci95": None, "per_seed": values}
    std = statistics.stdev(values)
    t = _T975[len(values) - 2] if len(values) - 1 <= len(_T975) else 1.96
    half = t * std / math.sqrt(len(values))
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "per_seed": values}


def fmt(stat: dict[str, Any], signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{stat['mean']:{sign}.3f}"
    if stat.get("ci95"):
        lo, hi = stat["ci95"]
        text += f" [{lo:{sign}.3f}, {hi:{sign}.3f}]"
    elif "std" in stat and signed is False:
        text += f" ± {stat['std']:.3f}"
    return text


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]
