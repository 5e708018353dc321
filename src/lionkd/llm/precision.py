"""Number formats: which one a training run computes in, and which one a model is stored in.

Training always keeps fp32 master weights and fp32 optimizer state; `precision` only chooses the
autocast format of the forward and backward passes. (Training the stored bf16 weights directly
loses most small updates: with lr 2e-5 a bf16 weight near 1.0 cannot move by less than 2^-8.)

"auto" is decided once per run, by the orchestrator, from what the hardware has (never from a timing),
and recorded in the run store: ranks of one job, the stages of one run and its reruns all compute in
that one format.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any, Literal

import torch

from ..errors import UserError

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@cache
def cpu_has_amx() -> bool:
    """Whether this CPU multiplies bf16 matrices in AMX tiles, where bf16 autocast clearly wins.

    Read from the CPU's flags, not timed: a timing on a shared machine is noise, and two runs (or two
    processes) of one config must not compute in different formats because a neighbour was busy. CPUs
    with AVX512-BF16 alone gain little or lose, measured on an AMD EPYC, so they train in fp32.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:  # not Linux: no way to tell without timing, and fp32 is always right
        return False


def training_precision(setting: str, key: str = "student.train.precision") -> Precision:
    """The autocast format a training run uses: `setting`, or the best one here for "auto"."""
    gpu = torch.cuda.is_available()
    if setting == "auto":
        if gpu:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_amx() else "fp32"
    if setting == "fp16" and not gpu:
        raise UserError(f"{key}: fp16 needs a GPU (on CPU use bf16 or fp32)")
    if setting == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        raise UserError(f"{key}: this GPU has no bf16; use fp16 (with loss scaling) or fp32")
    return setting  # type: ignore[return-value]


PRECISION_META = "training_precision"  # the run store's meta key: "<config key>=<format>" per training section


def pin_precision(store: Any, setting: str, key: str = "student.train.precision") -> Precision:
    """The concrete format every process of every training stage of a run computes in: `setting` when
    it names one; for "auto", the format recorded when the run first resolved it, else decided now and
    recorded beside the run's config binding."""
    recorded = json.loads(store.get_meta(PRECISION_META) or "{}")
    if setting != "auto":
        value = training_precision(setting, key)
    elif recorded.get(key) in ("fp32", "bf16", "fp16"):
        value = recorded[key]
    else:
        value = training_precision("auto", key)
    if recorded.get(key) != value:
        store.set_meta(PRECISION_META, json.dumps(recorded | {key: value}, sort_keys=True))
    return value
