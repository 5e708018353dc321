"""`lionkd demo`: a whole Lion run on the offline sandbox world, through the real HTTP client path.

The world's teacher, referee and generator are served by `lionkd serve --sandbox` machinery on
127.0.0.1 and reached with the OpenAI SDK, exactly as an API teacher would be. The student is the
small Llama-style base student shipped with lionkd. After the run, every iteration's student is
scored on a held-out, balanced test set of the world, so the table shows what each iteration bought.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..config import EndpointConfig, GenerationConfig, LionConfig, RunConfig, StudentConfig, TrainConfig
from ..data import write_jsonl
from ..store import Store
from .loop import RunSummary, run_lion

# Gentle: the base student has converged on its own schedule, and a few thousand new examples at a
# higher rate make it forget more than it learns (measured: 3e-4 lost 5 points over 3 iterations).
LEARNING_RATE = 1e-4


@dataclass
class DemoSettings:
    run_dir: Path = Path("runs/demo")
    iterations: int = 3
    seeds: int = 1000
    new_per_iteration: int = 600
    train_epochs: float = 2.0
    test_per_task: int = 100
    seed: int = 0
    progress: bool = True
    # A half-million-parameter student gains nothing from a second thread, and on a busy machine two
    # threads that wait on each other train many times slower than one.
    threads: int = 1


def demo_config(settings: DemoSettings, base_url: str) -> RunConfig:
    """A Lion run whose three LLM roles are the sandbox world behind an OpenAI-compatible server."""

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
            model="sandbox:base-student",
            template="chat",
            # Continue from the previous student at a gentle constant rate, replaying earlier data:
            # a fresh warmup every round costs the small student what it learned (sandbox findings).
            train=TrainConfig(epochs=settings.train_epochs, learning_rate=LEARNING_RATE, lr_scheduler="constant",
                              warmup_ratio=0.0, batch_size=32, max_length=64, replay_fraction=0.5,
                              logging_steps=50, save_steps=100000),
            generation=GenerationConfig(temperature=0.0, max_new_tokens=24, batch_size=128),
        ),
        lion=LionConfig(seed_pool=settings.run_dir / "seeds.jsonl", iterations=settings.iterations,
                        new_per_iteration=settings.new_per_iteration, generation_rounds=6),
    )


def write_seed_pool(settings: DemoSettings) -> Path:
    from ..sandbox import seed_pool

    path = settings.run_dir / "seeds.jsonl"
    if not path.is_file():  # written once: a resumed demo must see the same seeds
        write_jsonl(path, seed_pool(settings.seeds, seed=settings.seed))
    return path


def score_students(summary: RunSummary, settings: DemoSettings) -> dict[int, dict[str, Any]]:
    """Held-out accuracy of the base student and of every iteration's student, stored as metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..llm.factory import resolve_model_path
    from ..sandbox import test_set
    from ..sandbox.student import evaluate_student

    items = test_set(per_task=settings.test_per_task, seed=settings.seed + 1)
    students = {0: Path(resolve_model_path("sandbox:base-student"))}
    students |= {k: summary.run_dir / "students" / f"iter-{k}" for k in range(1, summary.iterations + 2)}
    scores = {}
    with Store.open_run(summary.run_dir) as store:
        done = store.metrics()
        for k, path in students.items():
            if "accuracy" in done.get(k, {}):
                scores[k] = done[k]["accuracy"]
                continue
            model = AutoModelForCausalLM.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            result = evaluate_student(model, tokenizer, items)
            scores[k] = {"overall": result["overall"], **result["by_domain"]}
            store.put_metrics(k, {"accuracy": scores[k]})
    return scores


def run_demo(settings: DemoSettings) -> tuple[RunSummary, dict[int, dict[str, Any]]]:
    import torch

    from ..llm.server import ServerThread, create_app
    from ..sandbox import SandboxBackend

    torch.set_num_threads(settings.threads)
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
        console.print(f"sandbox world served at {server.base_url} (teacher, referee, generator)")
        summary = run_lion(demo_config(settings, server.base_url), progress=settings.progress, report=False)
    console.print("scoring every iteration's student on the held-out test set ...")
    scores = score_students(summary, settings)
    from ..eval.report import build_report

    summary.report_path, _ = build_report(summary.run_dir)
    return summary, scores


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
