"""The pseudo-target KD study in miniature, on sandbox world tasks.

Replicates the stages of Calderon et al. (ACL 2023), "A Systematic Study of Knowledge Distillation
for Natural Language Generation with Pseudo-Target Training", with the sandbox world as the task:

- teacher: the shipped sandbox base student (a 4-layer Llama trained on the world, standing in for a
  pretrained model) fine-tuned with cross-entropy on labeled (instruction, answer) pairs of a few
  task types;
- unlabeled inputs: four times as many world instructions of the same types, without answers;
- student: the teacher pruned to its first and last layers (`prune_layers`, keep "first_last");
- arms, as the paper's stages: fine-tuning (CE on gold), Logits KD on gold, + a single greedy PT
  per labeled input, + unlabeled inputs (greedy PTs for them too), K beam PTs per input (epoch e
  trains on PT e mod K), K sampled PTs (temperature 1, top-p 0.95), K sampled PTs at temperature
  1.5, and Joint-Teaching (alpha 0.5) on top of the sampled PTs.

Every student arm starts from the same pruned weights and trains the same number of optimiser
steps with the same batch size, learning rate and schedule: the training budget is held equal, so
arms with more data see fewer epochs of it. Metrics on held-out test problems (greedy decoding):
exact match (the world's `is_correct`), ROUGE (mean of R-1/2/L F1) and sacreBLEU of the answers
against the gold answers; for each arm the fraction of the teacher-student gap it closes,
(arm - FT student) / (teacher - FT student), per metric and averaged, as in the paper's Table 3.

    python benchmarks/pt_kd_study.py            # the full study (about an hour on 2 shared cores)
    python benchmarks/pt_kd_study.py --quick    # a short smoke run, results printed only

Writes benchmarks/results/pt_kd_study.json and .md (the full run).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from _common import write_results

METRICS = ("exact_match", "rouge", "bleu")


@dataclass
class Settings:
    tasks: tuple[str, ...] = ("compare", "max", "repeat", "uppercase")
    labeled: int = 1000
    unlabeled_ratio: int = 4
    teacher_steps: int = 600
    teacher_lr: float = 2e-3
    student_steps: int = 750
    student_lr: float = 2e-3
    batch_size: int = 32
    pt_count: int = 4  # K pseudo-targets per input
    pt_max_new_tokens: int = 24  # every answer of these tasks is shorter
    test_per_task: int = 200
    seeds: tuple[int, ...] = (0, 1)
    joint_alpha: float = 0.5


QUICK = Settings(labeled=200, teacher_steps=60, student_steps=40, pt_count=2, test_per_task=25, seeds=(0,))


@dataclass(frozen=True)
class Arm:
    name: str
    objective: str  # "ce" or "logits"
    pts: str | None = None  # pseudo-target set: "greedy", "beam", "sample", "high_temp"
    unlabeled: bool = False  # PTs for the unlabeled inputs too
    joint: bool = False


ARMS = (
    Arm("Fine-tuning (CE on gold)", "ce"),
    Arm("Logits KD", "logits"),
    Arm("Logits + single PT", "logits", pts="greedy"),
    Arm("+ unlabeled inputs", "logits", pts="greedy", unlabeled=True),
    Arm("K beam PTs", "logits", pts="beam", unlabeled=True),
    Arm("K sampled PTs (T=1)", "logits", pts="sample", unlabeled=True),
    Arm("K sampled PTs (T=1.5)", "logits", pts="high_temp", unlabeled=True),
    Arm("Joint-Teaching", "logits", pts="sample", unlabeled=True, joint=True),
)


# --------------------------------------------------------------------------- data


def draw_problems(tasks: tuple[str, ...], n: int, rng: random.Random, taken: set[str]) -> list[Any]:
    """`n` training-split problems of `tasks` with instructions not in `taken` (which grows)."""
    from lionkd.sandbox import world

    out = []
    while len(out) < n:
        x = world.sample(rng, task=rng.choice(tasks))
        if x.instruction not in taken:
            taken.add(x.instruction)
            out.append(x)
    return out


def as_example(instruction: str, target: str = "") -> Any:
    from lionkd.kd.examples import TrainExample

    return TrainExample(target=target, messages=[{"role": "user", "content": instruction}],
                        source="gold" if target else "input")


# --------------------------------------------------------------------------- models


def train_settings(s: Settings, steps: int, lr: float, seed: int) -> Any:
    from lionkd.config import TrainConfig

    return TrainConfig(max_steps=steps, learning_rate=lr, batch_size=s.batch_size, max_length=96, precision="fp32",
                       warmup_ratio=0.03, weight_decay=0.01, seed=seed, logging_steps=50, save_steps=10**6)


def evaluate(model_dir: Path, tests: list[Any]) -> tuple[dict[str, float], list[str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lionkd.eval.metrics import bleu, rouge
    from lionkd.sandbox import world
    from lionkd.sandbox.student import generate_answers

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    answers = generate_answers(model, tok, [x.instruction for x in tests])
    gold = [x.answer for x in tests]
    metrics = {
        "exact_match": 100 * sum(world.is_correct(x, a) for x, a in zip(tests, answers, strict=True)) / len(tests),
        "rouge": rouge(answers, gold)["rouge_mean"],
        "bleu": bleu(answers, gold),
    }
    return metrics, answers


def by_task_accuracy(tests: list[Any], answers: list[str]) -> dict[str, float]:
    from lionkd.sandbox import world

    hits: dict[str, list[bool]] = {}
    for x, a in zip(tests, answers, strict=True):
        hits.setdefault(x.task, []).append(world.is_correct(x, a))
    return {t: round(100 * sum(v) / len(v), 1) for t, v in sorted(hits.items())}


def pseudo_targets(teacher_dir: Path, inputs: list[Any], method: str, k: int, s: Settings) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lionkd.kd.pseudo_targets import PTConfig, generate_pseudo_targets

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    pt_method = "beam" if method == "greedy" else method
    settings = PTConfig(method=pt_method, k=k, num_beams=k, max_new_tokens=s.pt_max_new_tokens,
                          batch_size=256, seed=0)
    return generate_pseudo_targets(teacher, tok, inputs, settings, teacher_name="sandbox-teacher")


# --------------------------------------------------------------------------- the study


def gap_closed(arm: dict[str, float], teacher: dict[str, float], ft: dict[str, float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for m in METRICS:
        gap = teacher[m] - ft[m]
        out[m] = 100 * (arm[m] - ft[m]) / gap if abs(gap) > 1e-9 else None
    values = [v for v in out.values() if v is not None]
    out["mean"] = sum(values) / len(values) if values else None
    return out


def run_study(s: Settings, work: Path) -> dict[str, Any]:
    from lionkd.kd.job import TrainJob
    from lionkd.kd.joint_teaching import JointTeaching
    from lionkd.kd.prune import prune_layers
    from lionkd.kd.pseudo_targets import pt_schedule
    from lionkd.kd.train import train_student
    from lionkd.sandbox import world
    from lionkd.sandbox.student import base_student_dir

    started = time.perf_counter()
    rng = random.Random("pt-kd-study-data")
    taken: set[str] = set()
    labeled = draw_problems(s.tasks, s.labeled, rng, taken)
    unlabeled = draw_problems(s.tasks, s.labeled * s.unlabeled_ratio, rng, taken)
    tests = [x for x in world.test_set(s.test_per_task, seed=0) if x.task in s.tasks]
    gold = [as_example(x.instruction, x.answer) for x in labeled]
    labeled_inputs = [as_example(x.instruction) for x in labeled]
    all_inputs = labeled_inputs + [as_example(x.instruction) for x in unlabeled]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    teacher_dir = work / "teacher"
    teacher_train = train_student(TrainJob(base_student_dir(), gold, teacher_dir, objective="ce", resume=False,
                                           settings=train_settings(s, s.teacher_steps, s.teacher_lr, 0), progress=False))
    teacher_metrics, teacher_answers = evaluate(teacher_dir, tests)
    base_metrics, base_answers = evaluate(base_student_dir(), tests)
    student_init = work / "student-init"
    pruned = prune_layers(teacher_dir, student_init, "first_last")
    init_metrics, _ = evaluate(student_init, tests)
    timings["teacher_s"] = time.perf_counter() - t
    say(f"teacher: {fmt(teacher_metrics)} by task {by_task_accuracy(tests, teacher_answers)} "
        f"({timings['teacher_s']:.0f} s); base model {fmt(base_metrics)}; pruned init {fmt(init_metrics)}")

    # PTs are generated once, offline, as in the paper; seeds vary the students' training only
    t = time.perf_counter()
    pt_sets = {
        "greedy": pseudo_targets(teacher_dir, all_inputs, "greedy", 1, s),
        "beam": pseudo_targets(teacher_dir, all_inputs, "beam", s.pt_count, s),
        "sample": pseudo_targets(teacher_dir, all_inputs, "sample", s.pt_count, s),
        "high_temp": pseudo_targets(teacher_dir, all_inputs, "high_temp", s.pt_count, s),
    }
    timings["pseudo_targets_s"] = time.perf_counter() - t
    pt_stats = {name: pt_quality(records, labeled) for name, records in pt_sets.items()}
    say(f"pseudo-targets in {timings['pseudo_targets_s']:.0f} s; their accuracy on labeled inputs: {pt_stats}")
    labeled_ids = {x.id for x in labeled_inputs}
    runs: list[dict[str, Any]] = []
    for seed in s.seeds:
        for arm in ARMS:
            examples: Any = gold
            if arm.pts is not None:
                records = pt_sets[arm.pts]
                if not arm.unlabeled:
                    records = [r for r in records if r["input_id"] in labeled_ids]
                examples = pt_schedule(gold, records)
            joint = JointTeaching(alpha=s.joint_alpha, max_new_tokens=s.pt_max_new_tokens, temperature=1.0,
                                  top_p=0.95, seed=seed) if arm.joint else None
            out_dir = work / f"seed{seed}" / slug(arm.name)
            t = time.perf_counter()
            train = train_student(TrainJob(
                student_init, examples, out_dir, teacher=teacher_dir if arm.objective != "ce" else None,
                objective=arm.objective, joint=joint, resume=False, progress=False,
                settings=train_settings(s, s.student_steps, s.student_lr, seed),
            ))
            train_s = time.perf_counter() - t
            metrics, answers = evaluate(out_dir, tests)
            per_epoch = len(examples[0]) if isinstance(examples[0], list) else len(examples)
            runs.append({
                "arm": arm.name, "seed": seed, **metrics, "by_task": by_task_accuracy(tests, answers),
                "train_s": round(train_s, 1), "steps": train["steps"], "epochs": round(train["epochs"], 2),
                "examples_per_epoch": per_epoch, "final_loss": train.get("final_logged_loss"),
            })
            say(f"seed {seed} | {arm.name}: {fmt(metrics)} | {train['steps']} steps, "
                f"{train['epochs']:.2f} epochs of {per_epoch} examples, {train_s:.0f} s")

    ft_name = ARMS[0].name
    rows = []
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm.name]
        mean = {m: statistics.fmean(r[m] for r in mine) for m in METRICS}
        sd = {m: statistics.stdev([r[m] for r in mine]) if len(mine) > 1 else 0.0 for m in METRICS}
        per_seed_gap = [
            gap_closed(r, teacher_metrics, next(f for f in runs if f["arm"] == ft_name and f["seed"] == r["seed"]))
            ["mean"] for r in mine
        ]
        rows.append({"arm": arm.name, **{m: mean[m] for m in METRICS}, "sd": sd,
                     "train_s": statistics.fmean(r["train_s"] for r in mine)})
        rows[-1]["gap_closed_per_seed"] = per_seed_gap
    ft = next(r for r in rows if r["arm"] == ft_name)
    for row in rows:
        row["gap_closed"] = gap_closed(row, teacher_metrics, ft)
    return {
        "settings": asdict(s),
        "teacher": {**teacher_metrics, "by_task": by_task_accuracy(tests, teacher_answers), "train": teacher_train},
        "base_model": base_metrics,
        "pruned_init": {**init_metrics, "kept_layers": pruned["kept"]},
        "sizes": {"labeled": len(labeled), "unlabeled": len(unlabeled), "test": len(tests),
                  "teacher_parameters": parameters(teacher_dir), "student_parameters": parameters(student_init)},
        "pseudo_target_accuracy": pt_stats,
        "rows": rows,
        "runs": runs,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }


def say(text: str) -> None:
    print(text, flush=True)


def pt_quality(records: list[dict], labeled: list[Any]) -> float:
    """Exact-match accuracy (%) of the PTs of the labeled inputs: how often the teacher's targets are right."""
    from lionkd.sandbox import world

    by_id = {as_example(x.instruction).id: x for x in labeled}
    hits = [world.is_correct(by_id[r["input_id"]], r["target"]) for r in records if r["input_id"] in by_id]
    return round(100 * sum(hits) / max(1, len(hits)), 1)


def parameters(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def fmt(metrics: dict[str, float]) -> str:
    return f"EM {metrics['exact_match']:.1f}, ROUGE {metrics['rouge']:.1f}, BLEU {metrics['bleu']:.1f}"


# --------------------------------------------------------------------------- report


def table(result: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    seeds = len(result["settings"]["seeds"])
    lines = [
        "| arm | EM | ROUGE | BLEU | gap closed EM % | ROUGE % | BLEU % | mean % | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    t = result["teacher"]
    lines.append(f"| teacher (4 layers) | {t['exact_match']:.1f} | {t['rouge']:.1f} | {t['bleu']:.1f} "
                 "| 100 | 100 | 100 | 100 | |")
    for row in result["rows"]:
        g = row["gap_closed"]
        sd = row["sd"]
        cells = [f"{row[m]:.1f}" + (f" ± {sd[m]:.1f}" if seeds > 1 else "") for m in METRICS]
        lines.append(f"| {row['arm']} | {' | '.join(cells)} | {pct(g['exact_match'])} | {pct(g['rouge'])} "
                     f"| {pct(g['bleu'])} | {pct(g['mean'])} | {row['train_s']:.0f} |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    sizes = result["sizes"]
    first = result["runs"][0]
    unl = next(r for r in result["runs"] if r["arm"] == ARMS[3].name)
    return "\n".join([
        "# Pseudo-target KD study in miniature (sandbox world)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"It took {result['wall_s'] / 60:.0f} minutes ({result['wall_s']:.0f} s) on {result['machine']}, "
        "1 torch thread.",
        "",
        table(result),
        "",
        f"Metrics on {sizes['test']} held-out test problems ({s['test_per_task']} per task type), greedy "
        "decoding, mean over seeds " + ", ".join(map(str, s["seeds"]))
        + (" (± sample standard deviation)" if len(s["seeds"]) > 1 else "")
        + ". Gap closed = (arm - FT student) / (teacher - FT student) on the seed means; mean % averages "
        "the three metrics. Per-seed mean gaps are in the JSON.",
        "",
        "Settings:",
        f"- tasks: {', '.join(s['tasks'])}; {sizes['labeled']} labeled problems, {sizes['unlabeled']} "
        "unlabeled instructions (1:4), all from the training split; test problems from the test split.",
        f"- teacher: the sandbox base student (4-layer Llama, {sizes['teacher_parameters']:,} parameters) "
        f"fine-tuned with CE on the labeled data, {s['teacher_steps']} steps, lr {s['teacher_lr']}.",
        f"- student: the teacher pruned to layers {result['pruned_init']['kept_layers']} "
        f"({sizes['student_parameters']:,} parameters); before training: "
        f"{fmt(result['pruned_init'])}.",
        f"- held equal across arms: {s['student_steps']} optimiser steps of batch {s['batch_size']}, lr "
        f"{s['student_lr']}, cosine schedule with 3% warmup, the same pruned initialisation. Arms with more "
        f"data see fewer epochs: gold only {first['epochs']} epochs of {first['examples_per_epoch']} examples; "
        f"with unlabeled PTs {unl['epochs']} epochs of {unl['examples_per_epoch']}.",
        f"- PTs: K = {s['pt_count']} per input (greedy arms: 1), max {s['pt_max_new_tokens']} new tokens; "
        "beam search with K beams, sampling at temperature 1 or 1.5 with top-p 0.95; epoch e uses PT e mod K. "
        "Logits KD: forward KL, temperature 1, live teacher. Joint-Teaching: alpha "
        f"{s['joint_alpha']}, student samples at temperature 1, top-p 0.95, refreshed every step.",
        "- no final CE fine-tuning stage; PTs are generated once (seed 0); seeds vary the students' data "
        "order and Joint-Teaching sampling (teacher, data and PTs fixed).",
        f"- PT exact-match accuracy on the labeled inputs, by PT set: {result['pseudo_target_accuracy']}.",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (results printed, not written)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 2; quick 1)")
    parser.add_argument("--student-steps", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep models here (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the machine's cores are shared
    s = QUICK if args.quick else Settings()
    if args.seeds is not None:
        s.seeds = tuple(range(args.seeds))
    if args.student_steps is not None:
        s.student_steps = args.student_steps
    with tempfile.TemporaryDirectory(prefix="pt_kd_study-") as tmp:
        work = args.workdir or Path(tmp)
        result = run_study(s, work)
    result["command"] = "python benchmarks/pt_kd_study.py" + "".join(f" {a}" for a in sys.argv[1:])
    result["machine"] = f"{platform.machine()} with {os.cpu_count()} CPU cores (shared), torch {torch.__version__}"
    print(table(result))
    print(f"it took {result['wall_s'] / 60:.1f} minutes")
    if args.quick:
        print(markdown(result))
    else:
        write_results("pt_kd_study", result, markdown(result))


if __name__ == "__main__":
    main()
