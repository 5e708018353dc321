"""Lion against plain imitation with the same number of teacher-answered training instructions.

Five arms on the offline sandbox world, each from the shipped base student and each run with
several seeds:

- `lion`            the paper's rule: generation seeds drawn uniformly from the hard set, hard:easy
                    1:1, tau 1.0;
- `lion-learnable`  the same loop with `lion.seed_weighting: learnable` (seeds weighted towards
                    partly learned task types);
- `lion-rouge0.9`   the paper's rule with a looser novelty filter, `lion.rouge_l_max: 0.9` (0.7 rejects
                    nearly every generated instruction of the world's short, templated domains);
- `imitation`       no discrimination and no generation: iteration k trains on as many fresh
                    instructions drawn uniformly from the world's training split as the paired `lion`
                    run actually trained on in iteration k (generated pools can fall short of N after
                    the novelty filter), answered by the same teacher with the same request settings,
                    with the same replay rule, trainer settings and starting point. Iteration 1 of
                    every arm is the same training on the same seed pool, so the imitation arm takes
                    the `lion` run's iteration-1 student as it is;
- `imitation-0.9`   the same, matched to the `lion-rouge0.9` run's counts (where they equal the `lion`
                    run's, it is the `imitation` run itself).

Each Lion arm is compared with the imitation arm matched to its own counts (`lion-learnable`, which
generates its own pools, with `imitation`).

The final students are scored with greedy exact match on one held-out test set, balanced over
task types, whose arguments come from the world's test split (never trained on in any phrasing).
Mean and sample standard deviation over seeds per domain and overall, and the per-seed paired
differences against imitation.

    python benchmarks/lion_vs_imitation.py                 (about 35 minutes on 2 busy cores)
    python benchmarks/lion_vs_imitation.py --quick         (a few minutes: smaller pools, 2 seeds)
    python benchmarks/lion_vs_imitation.py --seeds 5

Runs live in runs/bench/lion_vs_imitation/<settings hash>/ (an interrupted benchmark resumes);
results go to benchmarks/results/lion_vs_imitation.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shlex
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from lionkd.config import (
    EndpointConfig,
    GenerationConfig,
    LionConfig,
    RunConfig,
    SandboxOptions,
    StudentConfig,
    TrainConfig,
)
from lionkd.kd.data import TrainExample
from lionkd.kd.trainer import train_student
from lionkd.lion.imitation import student_dir, training_examples
from lionkd.lion.loop import run_lion
from lionkd.lion.prompts import LionPrompts, student_messages
from lionkd.llm.base import GenRequest
from lionkd.llm.factory import request_defaults
from lionkd.llm.models import resolve_model_path
from lionkd.sandbox import DOMAINS, SandboxBackend, parse, sample, test_set
from lionkd.store import Store

RESULTS = Path(__file__).parent / "results"
WORK = Path("runs/bench/lion_vs_imitation")
ARMS = ("lion", "lion-learnable", "lion-rouge0.9", "imitation", "imitation-0.9")


@dataclass(frozen=True)
class LionArm:
    seed_weighting: str = "uniform"
    rouge_l_max: float = 0.7


LION_ARMS = {"lion": LionArm(), "lion-learnable": LionArm(seed_weighting="learnable"),
             "lion-rouge0.9": LionArm(rouge_l_max=0.9)}
IMITATION_ARMS = {"imitation": "lion", "imitation-0.9": "lion-rouge0.9"}  # arm: the Lion arm it is matched to
BASELINES = {"lion": "imitation", "lion-learnable": "imitation", "lion-rouge0.9": "imitation-0.9"}
T = TypeVar("T")
TEST_SEED = 1000  # one test set for every arm and seed: the comparison is paired


@dataclass(frozen=True)
class Settings:
    seeds: int = 3
    iterations: int = 3
    seed_pool: int = 1000
    new_per_iteration: int = 1000
    epochs: float = 2.0
    learning_rate: float = 3e-4
    replay_fraction: float = 0.5
    test_per_task: int = 100

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


QUICK = Settings(seeds=2, iterations=2, seed_pool=400, new_per_iteration=400, test_per_task=50)


# --------------------------------------------------------------------------- configs


def sandbox_endpoint(model: str, **options: Any) -> EndpointConfig:
    return EndpointConfig(backend="sandbox", model=model, api_key_env=None, concurrency=32, **options)


def lion_config(s: Settings, seed: int, arm: LionArm, run_dir: Path) -> RunConfig:
    """The Lion run of one arm and seed; the trainer settings are the ones the imitation arm uses too."""
    return RunConfig(
        run_dir=run_dir,
        seed=seed,
        teacher=sandbox_endpoint("teacher", temperature=0.7, max_tokens=64),
        # position bias and malformed replies as in the demo: the swap and the parser do their work
        referee=sandbox_endpoint("referee", temperature=0.2, max_tokens=128,
                                 sandbox=SandboxOptions(position_bias=0.5, malformed_rate=0.03)),
        generator=sandbox_endpoint("generator", temperature=1.0, max_tokens=64),
        student=StudentConfig(
            model="sandbox:base-student",
            template="chat",
            # continue from the previous student at a constant rate with replay (sandbox findings)
            train=TrainConfig(epochs=s.epochs, learning_rate=s.learning_rate, lr_scheduler="constant",
                              warmup_ratio=0.0, batch_size=32, max_length=64, replay_fraction=s.replay_fraction,
                              logging_steps=100000, save_steps=100000, seed=seed),
            generation=GenerationConfig(temperature=0.0, max_new_tokens=24, batch_size=128),
        ),
        lion=LionConfig(seed_pool_size=s.seed_pool, iterations=s.iterations, new_per_iteration=s.new_per_iteration,
                        tau=1.0, hard_easy_ratio="1:1", seed_weighting=arm.seed_weighting,
                        rouge_l_max=arm.rouge_l_max, generation_rounds=6),
    )


# --------------------------------------------------------------------------- the arms


def lion_counts(cfg: RunConfig) -> list[dict[str, Any]]:
    """What each iteration of a finished Lion run trained on, read back from its store and students."""
    with Store.open_existing(cfg.run_dir) as store:
        metrics = store.metrics()
    out = []
    for k in range(1, cfg.lion.iterations + 2):
        m = metrics.get(k, {})
        trained = json.loads((student_dir(cfg, k) / "train_metrics.json").read_text())
        out.append({"iteration": k, "examples": m.get("train_examples"), "replayed": m.get("train_replayed"),
                    "steps": trained["steps"], "hard_ratio": m.get("hard_ratio"),
                    "new_instructions": m.get("new_instructions")})
    return out


def teacher_answers(cfg: RunConfig, texts: list[str]) -> list[str]:
    """The sandbox teacher's answers, asked exactly as the Lion loop asks (prompt and request settings)."""
    prompts = LionPrompts.from_config(cfg.lion.prompts)
    opts = cfg.teacher.sandbox
    teacher = SandboxBackend(cfg.teacher.model, error_rate=opts.error_rate)
    requests = [GenRequest.chat(prompts.teacher_messages(t), **request_defaults(cfg.teacher)) for t in texts]
    return [r.choices[0].text.strip() for r in teacher.generate(requests)]


def fresh_instructions(count: int, rng: random.Random, seen: set[str]) -> list[str]:
    """`count` distinct training-split instructions drawn uniformly over task types and levels."""
    out: list[str] = []
    while len(out) < count:
        text = sample(rng).instruction
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def run_imitation(lion_cfg: RunConfig, counts: list[dict[str, Any]], run_dir: Path
                  ) -> tuple[Path, list[int], list[str]]:
    """Plain imitation matched to a Lion run's per-iteration counts.

    Returns the final student, the optimiser steps per iteration and the new instructions of
    iterations 2 and later.
    """
    cfg = lion_cfg.model_copy(update={"run_dir": run_dir})
    students = run_dir / "students"
    first = student_dir(cfg, 1)
    if not (first / "train_metrics.json").is_file():  # iteration 1: the same training on the same seed pool
        shutil.copytree(student_dir(lion_cfg, 1), first, dirs_exist_ok=True)
    with Store.open_existing(lion_cfg.run_dir) as store:
        seeds = store.instructions(store.pool(1, "train"))
        earlier = training_examples(seeds, store.responses("teacher", 1))
    seen = {ins.text for ins in seeds}
    steps = [json.loads((first / "train_metrics.json").read_text())["steps"]]
    drawn: list[str] = []
    for row in counts[1:]:
        k = row["iteration"]
        if not row["examples"]:  # the Lion run had nothing new to train on: its student stayed as it was
            shutil.copytree(student_dir(cfg, k - 1), student_dir(cfg, k), dirs_exist_ok=True)
            steps.append(steps[-1])
            continue
        rng = random.Random(f"imitation:{cfg.seed}:{k}")
        texts = fresh_instructions(row["examples"], rng, seen)
        drawn += texts
        examples = [TrainExample(messages=student_messages(t), target=a)
                    for t, a in zip(texts, teacher_answers(cfg, texts), strict=True)]
        # the Lion loop's replay rule: a seeded share of everything trained on before
        replay = random.Random(f"{cfg.seed}-{k}-replay").sample(earlier, round(cfg.student.train.replay_fraction
                                                                                * len(earlier)))
        if len(replay) != row["replayed"]:
            raise RuntimeError(f"iteration {k}: replay {len(replay)} != the Lion run's {row['replayed']}")
        metrics = train_student(student_dir(cfg, k - 1), examples + replay, student_dir(cfg, k),
                                settings=cfg.student.train, template=cfg.student.template, progress=False)
        steps.append(metrics["steps"])
        earlier += examples
    return students / f"iter-{len(counts)}", steps, drawn


def generated_instructions(cfg: RunConfig) -> list[str]:
    """The new instructions a finished Lion run trained on after the seed pool."""
    with Store.open_existing(cfg.run_dir) as store:
        ids = [i for k in range(2, cfg.lion.iterations + 2) for i in store.pool(k, "train")]
        return [ins.text for ins in store.instructions(ids)]


def composition(texts: list[str]) -> dict[str, float]:
    """Share of instructions per domain and per difficulty level."""
    found = [inst for inst in map(parse, texts) if inst is not None]
    n = max(1, len(found))
    domains = Counter(inst.domain for inst in found)
    levels = Counter(inst.level for inst in found)
    return ({d: domains[d] / n for d in DOMAINS} | {f"level {lv}": levels[lv] / n for lv in (1, 2, 3)}
            | {"n": len(texts)})


def timed(run_dir: Path, work: Callable[[], T]) -> tuple[T, float, bool]:
    """Run `work`; returns its value, the seconds it took when first computed, and whether it was reused.

    The seconds are kept in the run folder, so a resumed benchmark reports what finished arms cost.
    """
    record = run_dir / "bench_seconds.json"
    reused = record.is_file()
    t0 = time.time()
    value = work()
    seconds = json.loads(record.read_text())["seconds"] if reused else round(time.time() - t0, 1)
    if not reused:
        record.write_text(json.dumps({"seconds": seconds}) + "\n")
    return value, seconds, reused


def sizes(counts: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(r["examples"], r["replayed"]) for r in counts]


def imitation_arm(seed_runs: dict[str, Any], arm: str, source: str, lion_cfg: RunConfig, run_dir: Path,
                  items: list[Any]) -> dict[str, Any]:
    """The imitation arm matched to the Lion arm `source` of one seed.

    An imitation arm already matched to the same counts is that arm's run: the draws are seeded by seed
    and iteration, so a second run would repeat it.
    """
    counts = seed_runs[source]["iterations"]
    for other, other_source in IMITATION_ARMS.items():
        if other in seed_runs and sizes(seed_runs[other_source]["iterations"]) == sizes(counts):
            return seed_runs[other] | {"same_as": other}
    run_dir.mkdir(parents=True, exist_ok=True)
    (final, steps, drawn), seconds, reused = timed(run_dir, partial(run_imitation, lion_cfg, counts, run_dir))
    if steps != [r["steps"] for r in counts]:
        raise RuntimeError(f"{run_dir}: imitation steps {steps} != {source} steps {[r['steps'] for r in counts]}")
    return {
        "matched_to": source,
        "iterations": [{"iteration": r["iteration"], "examples": r["examples"], "replayed": r["replayed"],
                        "steps": n} for r, n in zip(counts, steps, strict=True)],
        "seconds": seconds, "reused": reused, "accuracy": evaluate(final, items), "trained_on": composition(drawn),
    }


# --------------------------------------------------------------------------- scoring


def evaluate(path: str | Path, items: list[Any]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lionkd.sandbox.student import evaluate_student

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    result = evaluate_student(model, tokenizer, items)
    return {**result["by_domain"], "overall": result["overall"], "by_task": result["by_task"]}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(scores: dict[str, list[dict[str, float]]], columns: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"arms": {}, "differences": {}}
    for arm, per_seed in scores.items():
        out["arms"][arm] = {c: mean_std([s[c] for s in per_seed]) for c in columns}
    for arm, baseline in BASELINES.items():
        diffs = {c: [a[c] - b[c] for a, b in zip(scores[arm], scores[baseline], strict=True)] for c in columns}
        out["differences"][f"{arm} - {baseline}"] = {c: mean_std(v) | {"per_seed": v} for c, v in diffs.items()}
    return out


def fmt(stat: dict[str, float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{stat['mean']:{sign}.3f} ± {stat['std']:.3f}"


def table_rows(summary: dict[str, Any], base: dict[str, float], columns: list[str]) -> list[list[str]]:
    rows = [["base student", *(f"{base[c]:.3f}" for c in columns)]]
    rows += [[arm, *(fmt(stats[c]) for c in columns)] for arm, stats in summary["arms"].items()]
    for name, diff in summary["differences"].items():
        rows.append([name, *(fmt(diff[c], signed=True) for c in columns)])
        rows.append(["  per seed", *(" ".join(f"{v:+.3f}" for v in diff[c]["per_seed"]) for c in columns)])
    return rows


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def seed_mean(runs: dict[int, dict[str, Any]], arm: str, get: Callable[[dict[str, Any]], float]) -> float:
    return statistics.fmean(get(r[arm]) for r in runs.values())


def filter_note(result: dict[str, Any], columns: list[str]) -> list[str]:
    """What loosening the novelty filter changed, read off the results (a paragraph, or nothing)."""
    runs, arms, diffs = result["runs"], result["arms"], result["differences"]
    if "lion-rouge0.9 - imitation-0.9" not in diffs:
        return []

    def new_counts(arm: str) -> list[int]:
        return [row["examples"] for r in runs.values() for row in r[arm]["iterations"][1:]]

    def shares(arm: str, parts: tuple[str, ...]) -> str:
        return ", ".join(f"{p} {seed_mean(runs, arm, lambda r, p=p: r['trained_on'][p]):.2f}" for p in parts)

    def overall(arm: str) -> str:
        return fmt(arms[arm]["overall"])

    old, new = diffs["lion - imitation"], diffs["lion-rouge0.9 - imitation-0.9"]
    per_seed_gain = [a["accuracy"]["overall"] - b["accuracy"]["overall"]
                     for a, b in ((r["lion-rouge0.9"], r["lion"]) for r in runs.values())]
    negative = sum(v < 0 for v in new["overall"]["per_seed"])
    domains = [c for c in columns if c != "overall"]

    def span(counts: list[int]) -> str:
        return f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)} to {max(counts)}"

    def gaps(diff: dict[str, Any]) -> str:
        return " ".join(f"{diff[d]['mean']:+.3f}" for d in domains)

    return [
        f"**Looser novelty filter (`lion-rouge0.9`).** With `rouge_l_max` 0.9 the generated pools hold "
        f"{span(new_counts('lion-rouge0.9'))} new instructions per iteration (the `lion` runs: "
        f"{span(new_counts('lion'))}); their shares are {shares('lion-rouge0.9', DOMAINS)} "
        f"(`lion`: {shares('lion', DOMAINS)}), and level 3 is "
        f"{seed_mean(runs, 'lion-rouge0.9', lambda r: r['trained_on']['level 3']):.2f} "
        f"(`lion`: {seed_mean(runs, 'lion', lambda r: r['trained_on']['level 3']):.2f}). "
        f"Overall accuracy is {overall('lion-rouge0.9')} against {overall('lion')} for `lion` (per seed "
        f"{' '.join(f'{v:+.3f}' for v in per_seed_gain)}); the imitation baseline matched to its counts scores "
        f"{overall('imitation-0.9')} (`imitation`: {overall('imitation')}), so "
        f"`lion-rouge0.9 - imitation-0.9` is {fmt(new['overall'], signed=True)} overall, negative in {negative} "
        f"of {len(runs)} seeds (`lion - imitation`: {fmt(old['overall'], signed=True)}). Per domain "
        f"({', '.join(domains)}) the gap goes from {gaps(old)} to {gaps(new)}. The base student scores "
        f"{result['base_student']['overall']:.3f} overall.",
        "",
    ]


def markdown(result: dict[str, Any], rows: list[list[str]], columns: list[str]) -> str:
    s, runs = result["settings"], result["runs"]
    wall, arms = result["wall_s"] / 60, result["arm_seconds_total"] / 60
    per_arm = ", ".join(f"{arm} {sum(r[arm]['seconds'] for r in runs.values()) / 60:.1f}" for arm in ARMS
                        if not any("same_as" in r[arm] for r in runs.values()))
    timing = (f"Wall time: {wall:.1f} min for this invocation, which reused finished runs; the arms took "
              f"{arms:.1f} min when computed ({per_arm} min over the seeds)" if result["reused_finished_runs"]
              else f"Wall time: {wall:.1f} min (the arms {arms:.1f} min, the rest is scoring)")
    lines = [
        "# Lion vs plain imitation (sandbox world, same number of training instructions)",
        "",
        f"Command: `{result['command']}`  ",
        f"{timing}, on {result['machine']}  ",
        f"Settings: {s['seeds']} seeds, {s['iterations']} iterations, seed pool {s['seed_pool']}, "
        f"N = {s['new_per_iteration']} new per iteration, {s['epochs']:g} epochs per iteration, "
        f"lr {s['learning_rate']:g} constant, batch 32, replay {s['replay_fraction']:g}, tau 1.0, hard:easy 1:1; "
        f"test set: {s['test_per_task']} held-out items per task type ({result['test_items']} items).",
        "",
        "Greedy exact-match accuracy of the final students, mean ± sample std over seeds; differences are "
        "paired by seed.",
        "",
        *md_table(["arm", *columns], rows),
        "",
        *filter_note(result, columns),
        f"What the students trained on after the seed pool: share of the new instructions of iterations 2 to "
        f"{s['iterations'] + 1} per domain and difficulty level, mean over seeds.",
        "",
    ]
    parts = [*DOMAINS, "level 1", "level 2", "level 3"]
    lines += md_table(["arm", "instructions", *parts], [
        [arm, f"{seed_mean(runs, arm, lambda r: r['trained_on']['n']):.0f}",
         *(f"{seed_mean(runs, arm, lambda r, p=p: r['trained_on'][p]):.2f}" for p in parts)] for arm in ARMS])
    lines += ["", "Accuracy per task type, mean over seeds:", ""]
    tasks = list(result["base_student"]["by_task"])
    lines += md_table(["task", "base student", *ARMS], [
        [t, f"{result['base_student']['by_task'][t]:.3f}",
         *(f"{seed_mean(runs, arm, lambda r, t=t: r['accuracy']['by_task'][t]):.3f}" for arm in ARMS)]
        for t in tasks])
    lines += ["", "Training instructions per iteration (new + replayed) and optimiser steps, per seed (`imitation` "
              "is matched to the `lion` run of the same seed and `imitation-0.9` to the `lion-rouge0.9` run; "
              "`lion-learnable` generates its own pools, whose sizes differ slightly after the novelty filter):",
              ""]
    for seed, run in runs.items():
        for arm in ARMS:
            if "same_as" in run[arm]:
                lines.append(f"- seed {seed}, {arm}: the same counts as `{run[arm]['same_as']}`, so that run")
                continue
            it = run[arm]["iterations"]
            desc = ", ".join(f"{r['examples']}+{r['replayed']} ({r['steps']} steps)" for r in it)
            lines.append(f"- seed {seed}, {arm}: {desc}")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller pools, 2 iterations, 2 seeds, 50 test items per type")
    p.add_argument("--seeds", type=int, help="number of seeds per arm (0, 1, ...)")
    p.add_argument("--iterations", type=int)
    p.add_argument("--seed-pool", type=int)
    p.add_argument("--new", type=int, dest="new_per_iteration")
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", type=float, dest="learning_rate")
    args = vars(p.parse_args(argv))
    base = QUICK if args.pop("quick") else Settings()
    return Settings(**(asdict(base) | {k: v for k, v in args.items() if v is not None}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    s = parse_args(argv)
    torch.set_num_threads(1)  # a model this small gains nothing from a second thread on shared cores
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    console = Console(stderr=True)
    started = time.time()
    work = WORK / s.key()
    items = test_set(per_task=s.test_per_task, seed=TEST_SEED)
    base = evaluate(resolve_model_path("sandbox:base-student"), items)
    columns = [c for c in base if c not in ("overall", "by_task")] + ["overall"]
    scores: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    runs: dict[int, dict[str, Any]] = {}
    for seed in range(s.seeds):
        runs[seed] = {}
        configs: dict[str, RunConfig] = {}
        for arm, spec in LION_ARMS.items():
            cfg = configs[arm] = lion_config(s, seed, spec, work / f"seed-{seed}" / arm)
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            summary, seconds, reused = timed(cfg.run_dir, partial(run_lion, cfg, progress=False, report=False))
            runs[seed][arm] = {"iterations": lion_counts(cfg), "seconds": seconds, "reused": reused,
                               "accuracy": evaluate(summary.final_student, items),
                               "trained_on": composition(generated_instructions(cfg))}
            console.print(f"seed {seed} {arm}: {runs[seed][arm]['accuracy']['overall']:.3f} ({seconds:.0f} s)")
        for arm, source in IMITATION_ARMS.items():
            runs[seed][arm] = imitation_arm(runs[seed], arm, source, configs[source], work / f"seed-{seed}" / arm,
                                            items)
            console.print(f"seed {seed} {arm}: {runs[seed][arm]['accuracy']['overall']:.3f} "
                          f"({runs[seed][arm]['seconds']:.0f} s)")
        for arm in ARMS:
            scores[arm].append(runs[seed][arm]["accuracy"])

    summary = summarise(scores, columns)
    rows = table_rows(summary, base, columns)
    table = Table(title="Lion vs imitation: held-out exact match of the final students (mean ± std over seeds)")
    for c in ["arm", *columns]:
        table.add_column(c, justify="left" if c == "arm" else "right")
    for r in rows:
        table.add_row(*r)
    Console().print(table)

    result = {
        "benchmark": "lion_vs_imitation",
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/lion_vs_imitation.py",
                                                                  *(sys.argv[1:] if argv is None else argv)]),
        "wall_s": round(time.time() - started, 1),
        "arm_seconds_total": round(sum(r[arm]["seconds"] for r in runs.values() for arm in ARMS
                                       if "same_as" not in r[arm]), 1),
        "reused_finished_runs": any(r[arm]["reused"] for r in runs.values() for arm in ARMS),
        "machine": "CPU, 1 torch thread (2 shared cores)",
        "settings": asdict(s),
        "test_items": len(items),
        "test_set": {"per_task": s.test_per_task, "seed": TEST_SEED},
        "base_student": base,
        **summary,
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lion_vs_imitation.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "lion_vs_imitation.md").write_text(markdown(result, rows, columns))
    console.print(f"wall time {result['wall_s'] / 60:.1f} min; wrote {RESULTS / 'lion_vs_imitation.json'} and .md")
    return result


if __name__ == "__main__":
    main()
