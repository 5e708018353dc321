"""The trainings of a run, found by their folders, with the loss curve each one saved.

Every training saves `train_metrics.json` beside the model it wrote; its `loss_history` holds
[step, loss] per logged step (every `student.train.logging_steps` steps). Runs made before that
was recorded have only the mean loss, and show no curve.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAIN_METRICS = "train_metrics.json"  # written by kd.train.train_student
# A distill run's trainings, in the order they run: folder, stage name in the run store
DISTILL_TRAININGS = (("teacher", "teacher_finetune"), ("student-kd", "kd_train"), ("student", "final_ce"))


@dataclass
class Training:
    label: str  # "iteration 2" (Lion imitation) or a distill stage name
    folder: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def curve(self) -> list[tuple[float, float]]:
        """(step, loss) per logged step; a training shorter than logging_steps logged none, and shows its
        mean loss at its last step instead."""
        logged = [(float(step), float(loss)) for step, loss in self.metrics.get("loss_history") or []]
        steps, mean = self.metrics.get("steps"), self.metrics.get("loss")
        if not logged and "loss_history" in self.metrics and steps and isinstance(mean, (int, float)):
            return [(float(steps), float(mean))]
        return logged


def _read(folder: Path) -> dict[str, Any] | None:
    path = folder / TRAIN_METRICS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def lion_trainings(run_dir: Path) -> list[Training]:
    """students/iter-K of a Lion run, by K (an iteration whose stage copied the student has no metrics)."""
    found = []
    for folder in (run_dir / "students").glob("iter-*"):
        match = re.fullmatch(r"iter-(\d+)", folder.name)
        metrics = _read(folder) if match else None
        if match and metrics is not None:
            found.append((int(match[1]), Training(f"iteration {match[1]}", folder, metrics)))
    return [t for _, t in sorted(found, key=lambda pair: pair[0])]


def distill_trainings(run_dir: Path) -> list[Training]:
    out = []
    for folder, stage in DISTILL_TRAININGS:
        metrics = _read(run_dir / folder)
        if metrics is not None:
            out.append(Training(stage, run_dir / folder, metrics))
    return out
