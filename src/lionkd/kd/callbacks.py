"""Callbacks of the KD trainer: the pseudo-target epoch switch on every process, one rich progress
bar of optimiser steps, and the stop at a loss that is not finite."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers.trainer_callback import TrainerCallback

from .examples import EpochDataset


class EpochSwitch(TrainerCallback):
    """Tells an `EpochDataset` which epoch begins, on every process.

    The Trainer's own `set_epoch` reaches the dataset only on one process: under a distributed
    sampler Accelerate's `DataLoaderShard.set_epoch` stops at the sampler, so every rank would read
    pseudo-target 0 in every epoch.
    """

    def __init__(self, dataset: EpochDataset) -> None:
        self.dataset = dataset
        self.read: list[list[int]] = []  # per epoch trained by this process, the lists it read

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.read.append(sorted(self.dataset.read))



class TrainingProgress(TrainerCallback):
    """Optimiser steps as one rich progress bar, with the latest logged loss."""

    def __init__(self) -> None:
        self.bar: Progress | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.bar.start()
        self.task = self.bar.add_task("training", total=state.max_steps, completed=state.global_step, loss="")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.update(self.task, loss=f"loss {logs['loss']:.3f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class StopOnNonFinite(TrainerCallback):
    """Ends a training at the first logged loss that is not finite: nothing is learnt from NaN on."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        loss = (logs or {}).get("loss")
        if self.step is None and isinstance(loss, float) and not math.isfinite(loss):
            self.step = state.global_step
            control.should_training_stop = True
