"""Black-box KD in the sandbox world: PTs alone vs PTs + the teacher's top-k log-probabilities.

The sandbox oracle gives no log-probabilities, so the teacher here is the shipped base student trained
further on fresh world problems (`--teacher-steps`, warmup + cosine as `train_on_world`), which makes it
clearly stronger than the base; it is cached in the temp dir, keyed by its settings and the base
weights, so reruns reuse it. It is served over real HTTP by `lionkd serve`'s app. For each seed the
same API calls (K sampled PTs with top-k logprobs per unlabeled instruction, through the call cache)
feed two students with the same start and the same steps:
- pt_ce:     sequence-level KD, cross-entropy on the PT text
- pt_topk:   sparse top-k KD on the aligned teacher targets + cross-entropy
The students start from the base student pruned to its first and last layers (`--student pruned`, as
the paper's pruned students), far enough below the teacher for a few thousand PTs to matter, or from
the base student itself (`--student base`). Unlabeled instructions are fresh training-split problems
drawn as the test set is (uniform over tasks and levels). Accuracy is greedy exact match on held-out
world problems. Teacher and student share a tokenizer here (the alignment is then exact); the
cross-tokenizer path is tested in tests/test_kd_api_teacher.py. Prints a table and writes
benchmarks/results/api_teacher_kd.{json,md}.

    python benchmarks/api_teacher_kd.py [--seeds 0 1 2 3 4 --inputs 1000 --k 2 --steps 600 --teacher-steps 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from _common import write_results
from lionkd.config import KDConfig, TrainConfig
from lionkd.kd.api_teacher import APIPTConfig, aligned_schedule, generate_api_pseudo_targets
from lionkd.kd.examples import TrainExample
from lionkd.kd.job import TrainJob
from lionkd.kd.prune import prune_layers
from lionkd.kd.pseudo_targets import pt_schedule
from lionkd.kd.train import train_student
from lionkd.llm.cache import CachedLLM
from lionkd.llm.hf import HFBackend
from lionkd.llm.openai_backend import OpenAIBackend
from lionkd.llm.server import ServerThread, create_app
from lionkd.sandbox import world
from lionkd.sandbox.student import base_student_dir, evaluate_student, save_student, train_on_world
from lionkd.store import Store

ARMS = ("pt_ce", "pt_topk")


def load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def teacher_dir(steps: int, lr: float, seed: int, batch_size: int = 32) -> tuple[Path, bool]:
    """The base student trained `steps` more on fresh problems, built once per settings and base weights;
    returns (its directory, whether it came from the cache)."""
    base = base_student_dir()
    weights = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()[:12]
    key = f"{weights}-s{steps}-lr{lr:g}-seed{seed}-b{batch_size}"
    out = Path(tempfile.gettempdir()) / f"lionkd-api-teacher-{key}"
    if (out / "config.json").exists():
        print(f"teacher: reusing {out}", flush=True)
        return out, True
    model, tok = load(base)
    started = time.time()
    losses = train_on_world(model, tok, steps=steps, seed=seed, batch_size=batch_size, lr=lr,
                            log_every=max(1, steps // 10))
    partial = out.with_name(out.name + f".part{os.getpid()}")
    save_student(model, tok, partial)
    built = {"steps": steps, "lr": lr, "seed": seed, "batch_size": batch_size,
             "seconds": round(time.time() - started, 1), "final_loss": sum(losses[-50:]) / len(losses[-50:])}
    (partial / "teacher_train.json").write_text(json.dumps(built, indent=1))
    partial.rename(out)  # whole or absent: an interrupted build is never reused
    return out, False


def unlabeled_instructions(n: int, seed: int) -> list[str]:
    """`n` distinct training-split instructions, uniform over tasks and levels (the test distribution)."""
    rng = random.Random(f"blackbox-kd-inputs:{seed}")  # the seed string the recorded figures were made with
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen[world.sample(rng).instruction] = None
    return list(seen)


def student_start(kind: str, keep: str, out: Path) -> Path:
    """Where both students start: the base student, or a copy with only the `keep` layers."""
    if kind == "base":
        return base_student_dir()
    prune_layers(base_student_dir(), out, keep)
    return out


def pt_accuracy(pts: list[Any], instruction_of: dict[str, str]) -> float:
    """Share of PTs that are exactly right (how noisy the pseudo-targets are)."""
    hits = [world.is_correct(world.parse(instruction_of[p.input_id]), p.text) for p in pts]
    return sum(hits) / max(1, len(hits))


def start_text(args: dict[str, Any]) -> str:
    if args["student"] == "base":
        return "the base student"
    return f"the base student pruned to layers '{args['keep']}'"


def markdown(report: dict[str, Any]) -> str:
    a, s, teacher = report["args"], report["summary"], report["teacher"]
    base, start, diff = report["base_accuracy"], report["start_accuracy"], s["difference"]
    how = "reused from the cache" if teacher["cached"] else "built"
    lines = [
        "# Black-box KD in the sandbox world: PTs only vs PTs + top-k log-probabilities",
        "",
        f"Command: `{report['command']}`  ",
        f"Wall time: {report['seconds']:.0f} s, teacher {how} in this run (building it takes "
        f"{teacher['seconds']:.0f} s); 1 torch thread, shared 2-core CPU",
        "",
        f"Settings: teacher = base student + {a['teacher_steps']} steps on fresh world problems (batch 32, "
        f"peak lr {a['teacher_lr']:g}, warmup + cosine), served over HTTP by `lionkd serve`'s app; per seed "
        f"{a['inputs']} unlabeled instructions x K={a['k']} sampled PTs (T=1, top-p 0.95) with "
        f"top-{a['top']} logprobs = {a['inputs']} teacher requests for both arms (fresh training-split "
        f"instructions, uniform over tasks and levels); students start from {start_text(a)}, "
        f"{a['steps']} steps, batch {a['batch_size']}, constant lr {a['lr']:g}; test: "
        f"{report['test_items']} held-out items ({a['test_per_task']} per task), greedy exact match.",
        "",
        f"Base student accuracy: **{base:.3f}**; teacher accuracy (greedy): "
        f"**{report['teacher_accuracy']:.3f}**; students' start: **{start:.3f}**.",
        "",
        "| seed | PT exact-match | aligned fraction | mass kept | pt_ce acc | pt_topk acc | topk - ce |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, r in report["per_seed"].items():
        lines.append(f"| {seed} | {r['pt_accuracy']:.3f} | {r['aligned_fraction']:.3f} | "
                     f"{r['mass_kept']:.3f} | {r['pt_ce']:.3f} | {r['pt_topk']:.3f} | "
                     f"{r['pt_topk'] - r['pt_ce']:+.3f} |")
    lines += [
        f"| **mean** | | | | **{s['pt_ce']['mean']:.3f}** | **{s['pt_topk']['mean']:.3f}** | "
        f"**{diff['mean']:+.3f}** |",
        "",
        f"Difference pt_topk - pt_ce: mean {diff['mean']:+.3f}, per-seed sd {diff['sd']:.3f} "
        f"({len(report['per_seed'])} seeds). Change vs base: pt_ce {s['pt_ce']['mean'] - base:+.3f}, "
        f"pt_topk {s['pt_topk']['mean'] - base:+.3f}; vs the students' start: "
        f"pt_ce {s['pt_ce']['mean'] - start:+.3f}, pt_topk {s['pt_topk']['mean'] - start:+.3f}.",
        "",
    ]
    return "\n".join(lines)


def teacher_pseudo_targets(base_url: str, instructions: list[str], args: argparse.Namespace, seed: int,
                           store_dir: Path) -> tuple[list[TrainExample], list[Any]]:
    """K sampled PTs with top-k log-probabilities per instruction, asked over HTTP through the call cache."""
    inputs = [TrainExample(target="", messages=[{"role": "user", "content": q}]) for q in instructions]
    settings = APIPTConfig(k=args.k, top_logprobs=args.top, instruction="", max_tokens=32, seed=seed,
                             temperature=1.0, top_p=0.95)
    with Store.open_run(store_dir) as store:
        llm = CachedLLM(OpenAIBackend("teacher", base_url=base_url, api_key="unused"), store)
        return inputs, generate_api_pseudo_targets(llm, inputs, [], settings, store=store)


def run_seed(base_url: str, start: Path, tok: Any, tests: list[Any], args: argparse.Namespace, seed: int,
             work: Path) -> dict[str, Any]:
    """One seed: the teacher's PTs for fresh instructions, then both arms trained on them and evaluated."""
    t0 = time.time()
    inputs, pts = teacher_pseudo_targets(base_url, unlabeled_instructions(args.inputs, seed), args, seed,
                                         work / f"run{seed}")
    by_id = {x.id: x for x in inputs}
    records = [{"input_id": p.input_id, "k": p.index, "target": p.text, "prompt": None,
                "messages": by_id[p.input_id].messages} for p in pts]
    sparse, stats = aligned_schedule([], pts, tok, inputs, args.top)
    out: dict[str, Any] = {
        "pt_accuracy": pt_accuracy(pts, {x.id: x.messages[0]["content"] for x in inputs}),
        "aligned_fraction": stats.aligned_fraction, "mass_kept": stats.mass_kept, "pseudo_targets": len(pts),
        "teacher_requests": len(inputs), "pt_s": round(time.time() - t0, 1),
    }
    print(f"seed {seed}: {len(pts)} PTs from {len(inputs)} requests, PT exact-match "
          f"{out['pt_accuracy']:.3f}, aligned {stats.aligned_fraction:.3f}, mass kept {stats.mass_kept:.3f} "
          f"({out['pt_s']:.0f}s)", flush=True)
    arms = {"pt_ce": (pt_schedule([], records), {"ce": 1.0}), "pt_topk": (sparse, {"logits": 1.0, "ce": 1.0})}
    train = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=seed,
                        warmup_ratio=0.0, lr_scheduler="constant", save_steps=100_000, logging_steps=50)
    for arm in ARMS:
        t0 = time.time()
        schedule, objective = arms[arm]
        student = work / f"{arm}-{seed}"
        metrics = train_student(TrainJob(str(start), schedule, student, settings=train, objective=objective,
                                         kd=KDConfig(), template="chat", progress=False))
        out[arm] = evaluate_student(load(student)[0], tok, tests)["overall"]
        out[f"{arm}_train_loss"] = metrics["loss"]
        out[f"{arm}_s"] = round(time.time() - t0, 1)
        print(f"seed {seed} {arm:8s} accuracy {out[arm]:.3f} ({out[f'{arm}_s']:.0f}s)", flush=True)
    return out


def summarize(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for arm in ARMS:
        accs = [r[arm] for r in per_seed.values()]
        summary[arm] = {"mean": statistics.mean(accs), "per_seed": accs}
    diffs = [r["pt_topk"] - r["pt_ce"] for r in per_seed.values()]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    summary["difference"] = {"mean": statistics.mean(diffs), "sd": sd, "per_seed": diffs}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--inputs", type=int, default=1000, help="teacher requests per seed")
    ap.add_argument("--k", type=int, default=2, help="PTs per instruction")
    ap.add_argument("--top", type=int, default=5, help="top_logprobs asked of the teacher")
    ap.add_argument("--teacher-steps", type=int, default=2000, help="extra training of the base student")
    ap.add_argument("--teacher-lr", type=float, default=2e-3)
    ap.add_argument("--student", choices=("pruned", "base"), default="pruned", help="where students start")
    ap.add_argument("--keep", default="first_last", help="layers a pruned student keeps")
    ap.add_argument("--steps", type=int, default=600, help="student training steps (both arms)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4, help="student learning rate (constant)")
    ap.add_argument("--test-per-task", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a model this small gains nothing from a second thread on a busy machine
    hf_logging.disable_progress_bar()
    started = time.time()
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])

    base = base_student_dir()
    tdir, cached = teacher_dir(args.teacher_steps, args.teacher_lr, seed=99)
    teacher, tok = load(tdir)
    tests = world.test_set(per_task=args.test_per_task)
    with tempfile.TemporaryDirectory(prefix="lionkd-api-teacher-kd-") as tmp:
        work = Path(tmp)
        start = student_start(args.student, args.keep, work / "student-start")
        base_acc = evaluate_student(load(base)[0], tok, tests)["overall"]
        start_acc = evaluate_student(load(start)[0], tok, tests)["overall"] if start != base else base_acc
        teacher_acc = evaluate_student(teacher, tok, tests)["overall"]
        print(f"base student {base_acc:.3f}, student start ({args.student}) {start_acc:.3f}, "
              f"teacher {teacher_acc:.3f} ({time.time() - started:.0f}s)", flush=True)
        with ServerThread(create_app({"teacher": HFBackend(teacher, tokenizer=tok, batch_size=64)})) as srv:
            per_seed = {s: run_seed(srv.base_url, start, tok, tests, args, s, work) for s in args.seeds}

    summary = summarize(per_seed)
    elapsed = time.time() - started
    print(f"\n{'arm':10s} {'mean acc':>9s}   per seed")
    for arm in ARMS:
        accs = " ".join(f"{a:.3f}" for a in summary[arm]["per_seed"])
        print(f"{arm:10s} {summary[arm]['mean']:9.3f}   {accs}")
    print(f"topk - ce  {summary['difference']['mean']:+9.3f}")
    print(f"base {base_acc:.3f} | start {start_acc:.3f} | teacher {teacher_acc:.3f} | {elapsed:.0f}s")
    report = {"command": command, "args": vars(args), "seconds": round(elapsed, 1),
              "teacher": json.loads((tdir / "teacher_train.json").read_text()) | {"cached": cached},
              "base_accuracy": base_acc, "start_accuracy": start_acc, "teacher_accuracy": teacher_acc,
              "test_items": len(tests), "summary": summary, "per_seed": per_seed}
    write_results("api_teacher_kd", report, markdown(report))


if __name__ == "__main__":
    main()
