"""Scaling: one training stage on 1 process vs N processes at the same global batch, and the student's
Cache-Pool answers with the transformers backend vs vLLM.

Training: SmolLM2-135M-Instruct, full fine-tuning, fp32, global batch 16, the same sandbox examples, run
by `train_student` in this process (1) and as a torchrun job of N processes (gloo on CPU; N = the GPUs
when there are 2 or more, else 2). Tokens/s is measured inside the training loop (the job's own
`runtime_s`), so the ratio is the scaling efficiency of the training itself; the launcher's start-up
(process start, model load) is reported beside it. On a 2-core CPU two processes share the same two
cores as one process with two threads: the ratio shows the cost of the distributed machinery (gradient
all-reduce, token-count gather), not a speed-up.

Generation: greedy answers to 64 world instructions (at most 32 new tokens): HFBackend batch 32, and
vLLM when it is installed (skipped otherwise, and said so).

    python -m benchmarks scaling          (or: python benchmarks/scaling.py)
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _common import messages, write_results
from lionkd.config import TrainConfig
from lionkd.kd.examples import TrainExample
from lionkd.kd.job import TrainJob
from lionkd.kd.train import train_student
from lionkd.llm.base import GenRequest
from lionkd.llm.hf import HFBackend
from lionkd.llm.models import resolve_model_path
from lionkd.sandbox import world

MODEL = "smollm2-135m-instruct"
BATCH = 16
STEPS = 6
ANSWERS = 64


def train(path: str, examples: list[TrainExample], processes: int, out: Path) -> dict:
    settings = TrainConfig(max_steps=STEPS, batch_size=BATCH, learning_rate=2e-5, warmup_ratio=0, max_length=96,
                           precision="fp32", processes=processes, save_steps=10_000, logging_steps=100)
    started = time.perf_counter()
    metrics = train_student(TrainJob(path, examples, out, settings=settings, progress=False))
    return {"processes": processes, "tokens_per_s": round(metrics["tokens_per_s"], 1),
            "train_s": round(metrics["runtime_s"], 1), "wall_s": round(time.perf_counter() - started, 1)}


def answer_rate(backend, instructions: list[str]) -> float:  # noqa: ANN001
    requests = [GenRequest.chat(messages(q), temperature=0, max_tokens=32) for q in instructions]
    started = time.perf_counter()
    backend.generate(requests)
    return len(requests) / (time.perf_counter() - started)


def main() -> dict:
    load = os.getloadavg()[0]
    path = resolve_model_path(MODEL)
    rng = random.Random(0)
    examples = [TrainExample(messages=messages(x.instruction), target=x.answer)
                for x in (world.sample(rng) for _ in range(BATCH * STEPS))]
    gpus = torch.cuda.device_count()
    many = gpus if gpus >= 2 else 2
    scratch = Path(tempfile.mkdtemp(prefix="lionkd-scaling-"))
    try:
        rows = [train(path, examples, n, scratch / f"p{n}") for n in (1, many)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    efficiency = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]

    instructions = [world.sample(rng).instruction for _ in range(ANSWERS)]
    generation = {"hf": round(answer_rate(HFBackend(path, batch_size=32), instructions), 2)}
    try:
        from lionkd.llm.vllm_backend import VLLMBackend

        generation["vllm"] = round(answer_rate(VLLMBackend(path), instructions), 2)
    except Exception as exc:  # vLLM absent (no GPU, not installed): say so instead of a number
        generation["vllm"] = f"not measured: {str(exc).splitlines()[0][:120]}"

    device = f"{gpus} GPU(s)" if gpus else f"CPU, {os.cpu_count()} cores"
    print(f"\nOne training stage, SmolLM2-135M-Instruct, global batch {BATCH}, {STEPS} steps, {device}, "
          f"load average {load:.1f}\n")
    print(f"{'processes':>9} {'tokens/s':>9} {'train s':>8} {'wall s':>7}")
    for r in rows:
        print(f"{r['processes']:>9} {r['tokens_per_s']:>9.1f} {r['train_s']:>8.1f} {r['wall_s']:>7.1f}")
    print(f"\nscaling efficiency ({many} processes vs 1, tokens/s): {efficiency:.2f}")
    print(f"Cache-Pool answers/s: {generation}")
    result = {"model": MODEL, "device": device, "load_average": load, "global_batch": BATCH, "steps": STEPS,
              "training": rows, "efficiency": round(efficiency, 3), "answers_per_s": generation}
    write_results("scaling", result)
    return result


if __name__ == "__main__":
    main()
