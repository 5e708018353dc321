"""Number formats: which one a training run computes in, and which one a model is stored in.

Training always keeps fp32 master weights and fp32 optimizer state; `precision` only chooses the
autocast format of the forward and backward passes. (Training the stored bf16 weights directly
loses most small updates: with lr 2e-5 a bf16 weight near 1.0 cannot move by less than 2^-8.)
"""

from __future__ import annotations

import time
from functools import cache
from typing import Literal

import torch

from ..errors import UserError

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@cache
def cpu_bf16_is_faster() -> bool:
    """Whether bf16 autocast beats fp32 on this CPU, measured on a small forward and backward.

    CPUs with AMX or AVX512-BF16 run bf16 matrix products natively and win; others emulate them
    and lose, which the measurement shows without a table of CPU models.
    """
    x = torch.randn(256, 576)
    w = torch.randn(576, 1536, requires_grad=True)

    def seconds(bf16: bool) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                (x @ w).float().square().sum().backward()
            best = min(best, time.perf_counter() - start)
        return best

    seconds(True), seconds(False)  # warm-up: first calls pay for kernel selection
    return seconds(True) < 0.8 * seconds(False)


def training_precision(setting: str, key: str = "student.train.precision") -> Precision:
    """The autocast format a training run uses: `setting`, or the best one here for "auto"."""
    gpu = torch.cuda.is_available()
    if setting == "auto":
        if gpu:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_bf16_is_faster() else "fp32"
    if setting == "fp16" and not gpu:
        raise UserError(f"{key}: fp16 needs a GPU (on CPU use bf16 or fp32)")
    if setting == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        raise UserError(f"{key}: this GPU has no bf16; use fp16 (with loss scaling) or fp32")
    return setting  # type: ignore[return-value]
