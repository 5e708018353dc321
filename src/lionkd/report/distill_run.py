"""What a `lionkd distill` run holds, read back for `lionkd status` and the report.

A distill run keeps everything at iteration 0 of its store: its stages (data, teacher_finetune,
student_init, pseudo_targets, kd_train, final_ce, eval_student, eval_teacher), the pseudo-targets
with their provenance, and the metrics those stages recorded. Exporting its pseudo-targets, which
reads the inputs again from the data files, is `lionkd.distill.export`.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..store import Store

DISTILL_STAGES = ("data", "teacher_finetune", "student_init", "pseudo_targets", "kd_train", "final_ce",
                  "eval_student", "eval_teacher")
# stage detail keys that are bookkeeping, not something a person reads in a one-line summary
_QUIET = {"fingerprint", "params", "path", "model", "teacher", "alignment", "alignment_metrics", "student_samples"}


def is_distill_run(store: Store, config: dict[str, Any] | None = None) -> bool:
    """A run of `lionkd distill` (not of the Lion loop): no pools, and distill stages or pseudo-targets."""
    if store.pool_iterations():
        return False
    if any(s["stage"] in DISTILL_STAGES for s in store.stages()) or store.pseudo_targets():
        return True
    return bool(((config or {}).get("kd") or {}).get("labeled", {}).get("path")) and not store.count_instructions()


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_short(v)}" for k, v in value.items())
    return str(value)


def stage_summary(detail: dict[str, Any]) -> str:
    """One line of what a stage recorded: its numbers and short values, bookkeeping left out."""
    parts = []
    for key, value in detail.items():
        if key in _QUIET or value is None or (isinstance(value, (list, dict)) and len(str(value)) > 80):
            continue
        parts.append(f"{key.replace('_', ' ')} {_short(value)}")
    return "; ".join(parts)


def stage_rows(store: Store) -> list[tuple[str, str, str]]:
    """(stage, done or not, summary) for every distill stage, in running order; skipped ones say so."""
    done = {s["stage"]: s["detail"] for s in store.stages() if s["iteration"] == 0}
    rows = []
    for stage in DISTILL_STAGES:
        if stage in done:
            rows.append((stage, "done", stage_summary(done[stage])))
        else:
            rows.append((stage, "-", ""))
    rows += [(stage, "done", stage_summary(detail)) for stage, detail in done.items() if stage not in DISTILL_STAGES]
    return rows


# --------------------------------------------------------------------------- pseudo-targets


def pt_statistics(store: Store) -> list[dict[str, Any]]:
    """Per kind of pseudo-target (method and teacher): how many, for how many inputs, how long, how varied."""
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for p in store.pseudo_targets():
        groups[(p.method, p.teacher)].append(p)
    unfinished = {}
    for s in store.stages():
        if s["stage"] == "pseudo_targets":
            unfinished[(s["detail"].get("method"), s["detail"].get("teacher"))] = s["detail"].get("unfinished")
    rows = []
    for (method, teacher), pts in sorted(groups.items()):
        by_input: dict[str, list[str]] = defaultdict(list)
        for p in pts:
            by_input[p.input_id].append(p.text.strip())
        words = [len(p.text.split()) for p in pts]
        several = [texts for texts in by_input.values() if len(texts) > 1]
        rows.append({
            "method": method, "teacher": teacher, "pseudo_targets": len(pts), "inputs": len(by_input),
            "per_input": max(len(t) for t in by_input.values()),
            "mean_words": sum(words) / len(words), "empty": sum(not p.text.strip() for p in pts),
            # Several PTs of one input are only worth their cost when they differ
            "all_distinct": (sum(len(set(t)) == len(t) for t in several) / len(several)) if several else None,
            "cut_off": unfinished.get((method, teacher)),
        })
    return rows


# --------------------------------------------------------------------------- size


def model_size(folder: Path) -> dict[str, Any] | None:
    """Parameters and weight size of a saved model folder, read from safetensors headers (nothing loaded)."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    parameters = 0
    try:
        for path in files:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            for name, tensor in header.items():
                if name != "__metadata__":
                    count = 1
                    for dim in tensor["shape"]:
                        count *= dim
                    parameters += count
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return {"parameters": parameters, "weights_mb": sum(p.stat().st_size for p in files) / 2**20}
