"""Size and speed of a local model: parameters, latency at batch 1, throughput at the largest batch
that fits a memory budget, and peak memory, measured the same way for a student and its teacher.

Generation is greedy with a fixed number of new tokens (EOS cannot end it early), so two models are
timed on the same amount of work. Memory is the peak of the accelerator allocator on GPU; on CPU it
is the model's weights plus the growth of the process's resident memory during the call.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..kd.examples import is_encoder_decoder
from ..llm.templates import Template, render_prompt

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue, and what changes at sunset."
MB = 1024 * 1024


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: Any) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- peak memory


def _proc_status_kb(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+)", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def resident_mb() -> float:
    """This process's resident memory now, in MiB (Linux; 0 where /proc is missing)."""
    return (_proc_status_kb("VmRSS") or 0) / 1024


class _ResidentPeak:
    """Peak growth of this process's resident memory while the block runs.

    Linux: reset the high-water mark (/proc/self/clear_refs) and read VmHWM after. Elsewhere: sample
    the resident size from a thread (psutil).
    """

    def __enter__(self) -> _ResidentPeak:
        self.growth = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._mode = "proc"
            self._start = (_proc_status_kb("VmRSS") or 0) * 1024
        except OSError:
            self._mode = "sample"
            self._start = self._rss()
            self._peak = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        try:
            import psutil
        except ImportError:
            return 0
        return psutil.Process().memory_info().rss

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        if self._mode == "proc":
            self.growth = max(0, (_proc_status_kb("VmHWM") or 0) * 1024 - self._start)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.growth = max(0, max(self._peak, self._rss()) - self._start)


@contextlib.contextmanager
def peak_memory(model: Any, device: torch.device) -> Any:
    """Yields a dict whose "bytes" is set, on exit, to the peak memory the block needed."""
    out = {"bytes": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        with _ResidentPeak() as rss:
            yield out
        out["bytes"] = weight_bytes(model) + rss.growth


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def default_budget_gb(device: torch.device) -> float:
    """90% of the GPU's memory, or a quarter of the machine's RAM."""
    if device.type == "cuda":
        return 0.9 * torch.cuda.get_device_properties(device).total_memory / 1024**3
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return 0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return 4.0


# --------------------------------------------------------------------------- timing


@dataclass
class BatchTrial:
    batch_size: int
    seconds: float | None
    peak_memory_mb: float | None
    fits: bool
    note: str = ""


@dataclass
class SpeedResult:
    parameters: int
    weights_mb: float
    device: str
    new_tokens: int
    latency_s: float  # median of the timed runs at batch 1
    latency_runs_s: list[float]
    peak_memory_mb: float  # at batch 1
    budget_gb: float
    max_batch: int  # the largest batch tried that stayed within the budget (0: none did)
    throughput_per_min: float | None  # examples per minute at max_batch
    peak_memory_mb_at_max_batch: float | None
    trials: list[BatchTrial] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _inputs(model: Any, tokenizer: Any, prompt: str, batch_size: int, template: Template) -> dict[str, torch.Tensor]:
    if is_encoder_decoder(model):
        text = prompt
        encoded = tokenizer([text] * batch_size, return_tensors="pt", padding=True)
    else:
        text = render_prompt(tokenizer, [{"role": "user", "content": prompt}], template)
        rendered_by_chat = template == "chat" and bool(getattr(tokenizer, "chat_template", None))
        encoded = tokenizer([text] * batch_size, return_tensors="pt", padding=True,
                            add_special_tokens=not rendered_by_chat)
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def _timed_generate(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int, pad_id: int) -> float:
    device = inputs["input_ids"].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   num_beams=1, pad_token_id=pad_id)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_speed(
    model: Any,
    tokenizer: Any,
    *,
    prompt: str = DEFAULT_PROMPT,
    new_tokens: int = 64,
    runs: int = 5,
    budget_gb: float | None = None,
    max_batch: int = 256,
    template: Template = "chat",
) -> SpeedResult:
    """Parameters, batch-1 latency (median of `runs` after a warm-up), and throughput at the largest
    batch (doubling from 1 up to `max_batch`) whose peak memory stays within `budget_gb`."""
    if runs < 1 or new_tokens < 1 or max_batch < 1:
        raise ValueError("runs, new_tokens and max_batch must be >= 1")
    model.eval()
    device = next(model.parameters()).device
    budget = budget_gb if budget_gb is not None else default_budget_gb(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id

    single = _inputs(model, tokenizer, prompt, 1, template)
    _timed_generate(model, single, new_tokens, pad_id)  # warm-up: kernels, caches, lazy init
    with peak_memory(model, device) as mem:
        latencies = [_timed_generate(model, single, new_tokens, pad_id) for _ in range(runs)]

    trials: list[BatchTrial] = []
    batch = 1
    while batch <= max_batch:
        trial = _try_batch(model, tokenizer, prompt, batch, template, new_tokens, pad_id, device, budget)
        trials.append(trial)
        if not trial.fits:
            break
        batch *= 2
    best = next((t for t in reversed(trials) if t.fits), None)
    return SpeedResult(
        parameters=parameter_count(model),
        weights_mb=weight_bytes(model) / MB,
        device=str(device),
        new_tokens=new_tokens,
        latency_s=statistics.median(latencies),
        latency_runs_s=latencies,
        peak_memory_mb=mem["bytes"] / MB,
        budget_gb=budget,
        max_batch=best.batch_size if best else 0,
        throughput_per_min=best.batch_size * 60 / best.seconds if best and best.seconds else None,
        peak_memory_mb_at_max_batch=best.peak_memory_mb if best else None,
        trials=trials,
    )


def _try_batch(model: Any, tokenizer: Any, prompt: str, batch: int, template: Template, new_tokens: int,
               pad_id: int, device: torch.device, budget_gb: float) -> BatchTrial:
    try:
        inputs = _inputs(model, tokenizer, prompt, batch, template)
        with peak_memory(model, device) as mem:
            seconds = _timed_generate(model, inputs, new_tokens, pad_id)
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return BatchTrial(batch, None, None, fits=False, note="out of memory")
    peak_mb = mem["bytes"] / MB
    fits = peak_mb <= budget_gb * 1024
    return BatchTrial(batch, seconds, peak_mb, fits=fits, note="" if fits else "over the memory budget")


def speed_ratios(student: SpeedResult, teacher: SpeedResult) -> dict[str, float | None]:
    """Each student figure divided by the teacher's (below 1: smaller, faster to answer, leaner;
    `throughput` above 1: more examples per minute), and the batch-1 speed-up."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "parameters": ratio(student.parameters, teacher.parameters),
        "latency": ratio(student.latency_s, teacher.latency_s),
        "throughput": ratio(student.throughput_per_min, teacher.throughput_per_min),
        "peak_memory": ratio(student.peak_memory_mb, teacher.peak_memory_mb),
        "speedup": ratio(teacher.latency_s, student.latency_s),
    }
