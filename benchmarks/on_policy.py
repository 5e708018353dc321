"""On-policy KD from a served teacher, side by side with SFT on its answers and with TRL's GKD trainer.

The sandbox world's tasks (exact answers, exact-match accuracy on held-out problems). The teacher is
SmolLM2-135M-Instruct fine-tuned on the tasks by this benchmark (cross-entropy on the world's exact
answers) and served over HTTP by `lionkd serve`'s app; the student is SmolLM2-135M-Instruct as it
comes, which does not know them. Every arm trains the same student on the same training prompts for
the same steps, batch and learning rate:

- sft:       cross-entropy on the served teacher's greedy answers (asked once through the call cache)
- on_policy: lionkd's on-policy objective (lmbda 1, top-k reverse KL), the teacher scoring over HTTP
- mixed:     half of each batch on-policy, the other half cross-entropy on the teacher's answers
- trl_gkd:   TRL's GKD trainer with the same teacher in process (lmbda 1, beta 1: reverse KL on the
             student's samples), the reference implementation, without its default activation checkpointing

For each arm and seed, each arm in its own process: held-out exact match at the end and at half the
steps, the teacher tokens used by then (the answers trained on, prompt + answer, and every scored
sample, prompt + sample; for TRL, every sequence its in-process teacher read), wall time, and peak
memory from the start of the training (resident set on CPU, allocated memory on a GPU); the teacher's
own accuracy on the same problems. Paired differences per seed with 95% t-intervals, and the two
aims read off them (on-policy at half its steps against SFT's final accuracy; on-policy against TRL
GKD at equal steps and memory). Finished arms are kept under --work and reused by a rerun.

    python -m benchmarks on_policy                     (the full run: 3 seeds, GPU advised)
    python benchmarks/on_policy.py --quick             (a reduced run that proves the pipeline works)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import RESULTS, SYSTEM, fmt, interval, md_table, messages, write_results

MODEL = "smollm2-135m-instruct"
ARMS = ("sft", "on_policy", "mixed", "trl_gkd")


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"seeds": 1, "teacher_steps": 6, "steps": 3, "batch": 4, "train_prompts": 12, "test_per_task": 1,
                "max_new_tokens": 12, "lr": 5e-5, "teacher_lr": 1.5e-4}
    return {"seeds": 3, "teacher_steps": 120, "steps": 60, "batch": 8, "train_prompts": 480, "test_per_task": 8,
            "max_new_tokens": 16, "lr": 5e-5, "teacher_lr": 1.5e-4}


def reset_peak_memory() -> None:
    """Start the peak-memory count at the training: what loading and imports took before is not the arm's."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # Linux: resets the resident set's high-water mark
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- the teacher


def make_teacher(work: Path, cfg: dict[str, Any]) -> Path:
    """SmolLM2 fine-tuned on the sandbox tasks (once per settings; reused by later runs)."""
    from lionkd.config import TrainConfig
    from lionkd.kd.examples import TrainExample
    from lionkd.kd.job import TrainJob
    from lionkd.kd.train import train_student
    from lionkd.llm.models import resolve_model_path
    from lionkd.sandbox import world

    out = work / f"teacher-{cfg['teacher_steps']}"
    rng = random.Random("teacher-data")
    examples = []
    for _ in range(cfg["teacher_steps"] * 8):
        x = world.sample(rng)
        examples.append(TrainExample(messages=messages(x.instruction), target=x.answer))
    train_student(TrainJob(resolve_model_path(MODEL), examples, out, objective="ce", progress=False,
                           settings=TrainConfig(max_steps=cfg["teacher_steps"], batch_size=8,
                                                learning_rate=cfg["teacher_lr"], lr_scheduler="constant",
                                                warmup_ratio=0, max_length=128, save_steps=10_000)))
    return out


# --------------------------------------------------------------------------- one arm (its own process)


def midpoint_callback(step: int, measure: Callable[[Any], dict[str, float]]) -> Any:
    """A `TrainerCallback` (lionkd's trainer and TRL's take it alike) whose `result` is `measure(model)`
    at `step`, half the steps: held-out accuracy and the teacher tokens used so far."""
    from transformers import TrainerCallback

    class Midpoint(TrainerCallback):
        result: dict[str, float] | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if state.global_step == step and self.result is None:
                self.result = measure(model)
                model.train()  # the evaluation put it in eval mode

    return Midpoint()


def run_arm(arm: str, seed: int, base_url: str, teacher_dir: str, work: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lionkd.llm.models import resolve_model_path
    from lionkd.sandbox import world
    from lionkd.sandbox.student import evaluate_student

    torch.manual_seed(seed)
    student = resolve_model_path(MODEL)
    rng = random.Random(f"train-prompts:{seed}")
    prompts = [world.sample(rng).instruction for _ in range(cfg["train_prompts"])]
    test = world.test_set(per_task=cfg["test_per_task"], seed=100 + seed)

    def accuracy(model: Any, tok: Any) -> float:
        return evaluate_student(model, tok, test, batch_size=32, max_new_tokens=cfg["max_new_tokens"],
                                system_prompt=SYSTEM)["overall"]

    if arm == "teacher":  # what the arms distil from, on the same held-out problems
        return {"arm": arm, "seed": seed, "accuracy": accuracy(AutoModelForCausalLM.from_pretrained(teacher_dir),
                                                               AutoTokenizer.from_pretrained(teacher_dir)),
                "test_items": len(test)}
    out = work / f"{arm}-{seed}"
    reset_peak_memory()
    start = time.perf_counter()
    if arm == "trl_gkd":
        tokens, half = train_trl(student, teacher_dir, prompts, out, seed, cfg, accuracy)
    else:
        tokens, half = train_lionkd(arm, student, base_url, prompts, out, seed, cfg, accuracy)
    wall = time.perf_counter() - start
    peak = peak_memory_mb()
    model = AutoModelForCausalLM.from_pretrained(out)
    return {"arm": arm, "seed": seed, "accuracy": accuracy(model, AutoTokenizer.from_pretrained(out)),
            "teacher_tokens": tokens, "half": half, "wall_s": wall, "peak_mb": peak, "test_items": len(test)}


def train_lionkd(arm: str, student: str, base_url: str, prompts: list[str], out: Path, seed: int,
                 cfg: dict[str, Any], accuracy: Callable[[Any, Any], float]) -> tuple[int, dict[str, float]]:
    from lionkd.config import OnPolicyConfig, TrainConfig
    from lionkd.kd.examples import TrainExample
    from lionkd.kd.job import TrainJob
    from lionkd.kd.loading import load_tokenizer
    from lionkd.kd.on_policy import OnPolicySetup
    from lionkd.kd.train import train_student
    from lionkd.llm.base import GenRequest
    from lionkd.llm.cache import CachedLLM
    from lionkd.llm.openai_backend import OpenAIBackend
    from lionkd.llm.scoring import ScoringBackend, TeacherScorer
    from lionkd.llm.templates import render_prompt
    from lionkd.store import Store

    folder = out.parent / f"store-{arm}-{seed}"
    shutil.rmtree(folder, ignore_errors=True)  # an empty call cache: every teacher token of this run is counted
    store = Store.open_run(folder)
    tok = load_tokenizer(student)
    answers, per_answer = [""] * len(prompts), 0.0
    if arm in ("sft", "mixed"):
        llm = CachedLLM(OpenAIBackend("teacher", base_url=base_url, api_key="unused"), store, role="teacher")
        results = llm.generate([GenRequest.chat(messages(p), temperature=0.0, max_tokens=cfg["max_new_tokens"])
                                for p in prompts])
        answers = [r.text.strip() for r in results]
        per_answer = statistics.fmean(r.prompt_tokens + r.completion_tokens for r in results)
    examples = [TrainExample(messages=messages(p), target=a) for p, a in zip(prompts, answers, strict=True)]
    settings = TrainConfig(max_steps=cfg["steps"], batch_size=cfg["batch"], learning_rate=cfg["lr"], seed=seed,
                           lr_scheduler="constant", warmup_ratio=0, max_length=128, save_steps=10_000)
    setup, objective = None, {"ce": 1.0}
    if arm in ("on_policy", "mixed"):
        scorer = TeacherScorer(CachedLLM(ScoringBackend("teacher", base_url=base_url, scoring="vllm"), store,
                                         role="teacher"), 5)
        op = OnPolicyConfig(lmbda=1.0 if arm == "on_policy" else 0.5, max_new_tokens=cfg["max_new_tokens"])
        setup = OnPolicySetup(op, scorer, {e.id: render_prompt(tok, e.prompt_messages()) for e in examples}, seed)
        objective = {"on_policy": 1.0} if arm == "on_policy" else {"on_policy": 1.0, "ce": 1.0}

    def used(step: int) -> int:
        """Teacher tokens the training has used by `step`: the answers of the examples it trained on
        off-policy (asked as needed, they would cost no more) and every scoring call."""
        scored = sent = 0
        if setup is not None:
            stats = setup.scorer.stats
            scored = stats["calls_sent"] + stats["calls_cached"] + stats["failed"]
            sent = stats["prompt_tokens"] + stats["completion_tokens"]
        return round(per_answer * max(0, step * cfg["batch"] - scored)) + sent

    midpoint = midpoint_callback(cfg["steps"] // 2, lambda model: {"accuracy": accuracy(model, tok),
                                                          "teacher_tokens": used(cfg["steps"] // 2)})
    train_student(TrainJob(student, examples, out, settings=settings, objective=objective, progress=False,
                           on_policy=setup, resume=False, callbacks=[midpoint]))
    store.close()
    return used(cfg["steps"]), midpoint.result


def train_trl(student: str, teacher_dir: str, prompts: list[str], out: Path, seed: int, cfg: dict[str, Any],
              accuracy: Callable[[Any, Any], float]) -> tuple[int, dict[str, float]]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(student)
    tok.padding_side = "left"
    rows = []
    for p in prompts:  # tokenized rows: TRL's trainer then prepares nothing itself
        ids = tok(tok.apply_chat_template(messages(p), tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": ids, "labels": [-100] * len(ids)})
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def collate(batch: list[dict]) -> dict:
        # the prompts alone, left padded: with lmbda 1 every batch is replaced by the student's own samples
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r["input_ids"]):] = torch.tensor(r["input_ids"])
            mask[i, width - len(r["input_ids"]):] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, -100),
                "prompts": ids, "prompt_attention_mask": mask}

    seen = {"tokens": 0}  # what the in-process teacher read: every sequence it scored
    cuda = torch.cuda.is_available()
    args = GKDConfig(output_dir=str(out / "trl"), max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                     learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0, lmbda=1.0, beta=1.0,
                     temperature=1.0, max_new_tokens=cfg["max_new_tokens"], max_length=128, seed=seed,
                     report_to="none", save_strategy="no", logging_steps=10_000, use_cpu=not cuda,
                     disable_tqdm=True, bf16=cuda, remove_unused_columns=False,
                     # TRL turns activation checkpointing on by default; lionkd's arms train without it, and
                     # with it TRL's sampling runs without a KV cache: the same settings for every arm
                     gradient_checkpointing=False)
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(student),
                         teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir), args=args,
                         train_dataset=Dataset.from_list(rows), data_collator=collate, processing_class=tok)
    trainer.generation_config.eos_token_id = [end, tok.eos_token_id]
    # The Trainer would count the step's tokens on the prompts-only batch (0 labels) before the student's
    # samples replace it, and TRL's loss would divide by that 0: each batch is normalised by its own tokens.
    trainer.model_accepts_loss_kwargs = False
    teacher_forward = trainer.teacher_model.forward

    def counting_forward(*a: Any, **kw: Any) -> Any:
        mask = kw.get("attention_mask")
        seen["tokens"] += int(mask.sum()) if mask is not None else 0
        return teacher_forward(*a, **kw)

    trainer.teacher_model.forward = counting_forward
    midpoint = midpoint_callback(cfg["steps"] // 2, lambda model: {"accuracy": accuracy(model, tok),
                                                          "teacher_tokens": seen["tokens"]})
    trainer.add_callback(midpoint)
    trainer.train()
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    return seen["tokens"], midpoint.result


# --------------------------------------------------------------------------- the whole comparison


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm over seeds, paired differences per seed, and the two aims read off them."""
    by = {a: {r["seed"]: r for r in rows if r["arm"] == a} for a in ("teacher", *ARMS)}
    seeds = sorted(set.intersection(*(set(by[a]) for a in ARMS)))

    def over(arm: str, get: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
        return interval([get(by[arm][s]) for s in seeds])

    def paired(a: str, b: str, get_a: Callable[[dict[str, Any]], float] = lambda r: r["accuracy"],
               get_b: Callable[[dict[str, Any]], float] = lambda r: r["accuracy"]) -> dict[str, Any]:
        return interval([get_a(by[a][s]) - get_b(by[b][s]) for s in seeds])

    half_acc, half_tok = (lambda r: r["half"]["accuracy"]), (lambda r: r["half"]["teacher_tokens"])
    out: dict[str, Any] = {"seeds_done": seeds}
    if not seeds:
        return out
    out["teacher_accuracy"] = interval([by["teacher"][s]["accuracy"] for s in seeds if s in by["teacher"]])
    out["per_arm"] = {a: {"accuracy": over(a, lambda r: r["accuracy"]),
                          "teacher_tokens": over(a, lambda r: r["teacher_tokens"]),
                          "half_accuracy": over(a, half_acc), "half_teacher_tokens": over(a, half_tok),
                          "wall_s": over(a, lambda r: r["wall_s"]), "peak_mb": over(a, lambda r: r["peak_mb"])}
                      for a in ARMS}
    out["paired_accuracy_differences"] = {f"{a} - {b}": paired(a, b) for a, b in
                                          (("on_policy", "sft"), ("mixed", "sft"), ("on_policy", "trl_gkd"),
                                           ("mixed", "trl_gkd"))}
    # Aim 1: at half its steps, an on-policy arm has used about half SFT's teacher tokens; does it
    # already reach SFT's final accuracy?
    aims = {}
    for arm in ("on_policy", "mixed"):
        diff = paired(arm, "sft", half_acc)
        ratio = interval([half_tok(by[arm][s]) / by["sft"][s]["teacher_tokens"] for s in seeds])
        aims[f"{arm} at half its steps - sft final"] = {
            "accuracy": diff, "teacher_token_ratio": ratio,
            "met": diff["mean"] >= 0 and ratio["mean"] <= 0.5}
    # Aim 2: at equal steps, on-policy matches or beats TRL's GKD with lower peak memory.
    diff = paired("on_policy", "trl_gkd")
    memory = interval([by["on_policy"][s]["peak_mb"] / by["trl_gkd"][s]["peak_mb"] for s in seeds])
    matched = diff["mean"] >= 0 or (diff["ci95"] is not None and diff["ci95"][1] >= 0)
    aims["on_policy - trl_gkd at equal steps"] = {"accuracy": diff, "peak_memory_ratio": memory,
                                                  "met": matched and memory["mean"] < 1}
    out["aims"] = aims
    return out


def markdown(cfg: dict[str, Any], summary: dict[str, Any], wall_s: float, machine: str) -> str:
    lines = [f"# On-policy KD from a served teacher vs SFT and TRL's GKD ({MODEL}, sandbox world)", "",
             f"Command: `python benchmarks/on_policy.py{' --quick' if cfg['quick'] else ''}`  ",
             f"Machine: {machine}; wall time of this invocation {wall_s / 60:.1f} min  ",
             f"Settings: {len(summary['seeds_done'])} seed(s); teacher fine-tuned for {cfg['teacher_steps']} steps "
             f"of 8; every arm {cfg['steps']} steps of {cfg['batch']} on {cfg['train_prompts']} training prompts, "
             f"lr {cfg['lr']:g} constant, answers and samples of at most {cfg['max_new_tokens']} tokens; "
             f"{cfg['test_per_task']} held-out problems per task type and seed.", ""]
    if "per_arm" not in summary:
        return "\n".join(lines + ["No seed has finished every arm yet.", ""])
    lines += [f"Teacher's held-out accuracy: {fmt(summary['teacher_accuracy'])}.", "",
              "Mean over seeds [95% t-interval]. Teacher tokens: what the training used of the teacher, the "
              "answers it trained on (prompt + answer) and every scored sample (prompt + sample); for TRL, every "
              "sequence its in-process teacher read. Peak memory: from the start of the training, resident set "
              "on CPU, allocated memory on a GPU.",
              ""]
    head = ["arm", "accuracy", "teacher tokens", "accuracy at half the steps", "teacher tokens by then",
            "wall s", "peak MB"]
    keys = ("accuracy", "teacher_tokens", "half_accuracy", "half_teacher_tokens", "wall_s", "peak_mb")
    lines += md_table(head, [[arm, *(fmt(v[k]) if "accuracy" in k else f"{v[k]['mean']:,.0f}" for k in keys)]
                             for arm, v in summary["per_arm"].items()])
    lines += ["", "Paired differences of final accuracy, per seed:", ""]
    lines += md_table(["difference", "mean [95% interval]", "per seed"],
                      [[name, fmt(d, signed=True), " ".join(f"{v:+.3f}" for v in d["per_seed"])]
                       for name, d in summary["paired_accuracy_differences"].items()])
    lines += ["", "The aims:", ""]
    for name, aim in summary["aims"].items():
        other = ("teacher_token_ratio", "teacher tokens / SFT's") if "teacher_token_ratio" in aim \
            else ("peak_memory_ratio", "peak memory / TRL's")
        lines.append(f"- {name}: accuracy {fmt(aim['accuracy'], signed=True)}, {other[1]} "
                     f"{aim[other[0]]['mean']:.2f}: {'met' if aim['met'] else 'not met'}.")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run that proves the pipeline works")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/on_policy"),
                        help="where the teacher and the arms' rows live (a rerun reuses finished arms)")
    parser.add_argument("--arm", choices=("teacher", *ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url")
    parser.add_argument("--teacher")
    parser.add_argument("--results", type=Path, default=None, help="default: results/on_policy.json "
                        "(on_policy-quick.json for --quick: a reduced run never stands in for the full one)")
    args = parser.parse_args()
    cfg = settings(args.quick) | {"quick": args.quick}
    if args.arm:  # one arm, in its own process: its peak memory is its own
        print(json.dumps(run_arm(args.arm, args.seed, args.base_url, args.teacher, args.work, cfg)))
        return

    import torch

    from lionkd.llm.server import ServerThread, build_models, create_app

    started = time.perf_counter()
    work = args.work / hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    work.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(work, cfg)
    rows = []
    with ServerThread(create_app(build_models(str(teacher), name="teacher", dtype="float32"))) as server:
        for seed in range(cfg["seeds"]):
            for arm in ("teacher", *ARMS):
                done = work / "rows" / f"{arm}-{seed}.json"  # a finished arm is never run again
                if not done.is_file():
                    cmd = [sys.executable, __file__, "--arm", arm, "--seed", str(seed), "--base-url",
                           server.base_url, "--teacher", str(teacher), "--work", str(work)]
                    ran = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True,
                                         check=False)
                    if ran.returncode != 0:
                        sys.stderr.write(ran.stderr[-4000:])
                        raise SystemExit(f"arm {arm} (seed {seed}) failed")
                    done.parent.mkdir(exist_ok=True)
                    done.write_text(ran.stdout.strip().splitlines()[-1] + "\n")
                rows.append(json.loads(done.read_text()))
                print(f"seed {seed} {arm}: {rows[-1]}", flush=True)
    summary = summarise(rows)
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    md = markdown(cfg, summary, time.perf_counter() - started, machine)
    print(md)
    path = args.results or RESULTS / ("on_policy-quick.json" if args.quick else "on_policy.json")
    write_results("on_policy", {"settings": cfg, "runs": rows, **summary}, md, path=path)


if __name__ == "__main__":
    main()
