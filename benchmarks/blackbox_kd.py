"""Black-box KD in the sandbox world: PTs alone vs PTs + the teacher's top-k log-probabilities.

A teacher that returns log-probabilities is needed, and the sandbox oracle gives none, so the teacher
here is the shipped base student trained further on world problems (`--teacher-steps`), served over
real HTTP by `lionkd serve`'s app. For each seed the same API calls (K sampled PTs with top-k
logprobs per unlabeled instruction, through the call cache) feed two students that start from the
base student:
- pt_ce:     sequence-level KD, cross-entropy on the PT text
- pt_topk:   sparse top-k KD on the aligned teacher targets + cross-entropy
Both train the same steps; accuracy is greedy exact match on held-out world problems. Teacher and
student share a tokenizer here (the alignment is then exact); the cross-tokenizer path is tested in
tests/test_kd_blackbox.py. Prints a table and writes benchmarks/results/blackbox_kd.json.

    python benchmarks/blackbox_kd.py [--seeds 0 1 --inputs 96 --k 2 --steps 60 --teacher-steps 150]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lionkd.config import KDConfig, TrainConfig
from lionkd.kd.blackbox import APIPTSettings, aligned_schedule, generate_api_pseudo_targets
from lionkd.kd.data import TrainExample
from lionkd.kd.pseudo_targets import pt_schedule
from lionkd.kd.trainer import train_student
from lionkd.llm.cache import CachedLLM
from lionkd.llm.hf import HFBackend
from lionkd.llm.openai_backend import OpenAIBackend
from lionkd.llm.server import ServerThread, create_app
from lionkd.sandbox import world
from lionkd.sandbox.student import base_student_dir, evaluate_student, train_on_world
from lionkd.store import Store

RESULTS = Path(__file__).parent / "results" / "blackbox_kd.json"


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--inputs", type=int, default=96, help="unlabeled instructions per seed")
    ap.add_argument("--k", type=int, default=2, help="PTs per instruction")
    ap.add_argument("--top", type=int, default=5, help="top_logprobs asked of the teacher")
    ap.add_argument("--teacher-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=60, help="student training steps")
    ap.add_argument("--test-per-task", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a model this small gains nothing from a second thread on a busy machine
    started = time.time()

    base = base_student_dir()
    teacher, tok = load(base)
    train_on_world(teacher, tok, steps=args.teacher_steps, seed=99, batch_size=32, lr=1e-3)
    tests = world.test_set(per_task=args.test_per_task)
    base_acc = evaluate_student(load(base)[0], tok, tests)["overall"]
    teacher_acc = evaluate_student(teacher, tok, tests)["overall"]
    print(f"base student {base_acc:.3f}, teacher {teacher_acc:.3f} ({time.time() - started:.0f}s)", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp, ServerThread(create_app({"teacher": HFBackend(teacher, tokenizer=tok,
                                                                                            batch_size=32)})) as srv:
        for seed in args.seeds:
            inputs = [TrainExample(target="", messages=[{"role": "user", "content": r["instruction"]}])
                      for r in world.seed_pool(args.inputs, seed=seed)]
            settings = APIPTSettings(k=args.k, top_logprobs=args.top, instruction="", max_tokens=32, seed=seed,
                                     temperature=1.0, top_p=0.95)
            with Store.open_run(Path(tmp) / f"run{seed}") as store:
                llm = CachedLLM(OpenAIBackend("teacher", base_url=srv.base_url, api_key="unused"), store)
                pts = generate_api_pseudo_targets(llm, inputs, [], settings, store=store)
            records = [{"input_id": p.input_id, "k": p.index, "target": p.text, "prompt": None,
                        "messages": next(x.messages for x in inputs if x.id == p.input_id)} for p in pts]
            sparse, stats = aligned_schedule([], pts, tok, inputs, args.top)
            arms = {"pt_ce": (pt_schedule([], records), {"ce": 1.0}), "pt_topk": (sparse, {"logits": 1.0, "ce": 1.0})}
            for arm, (schedule, objective) in arms.items():
                t0 = time.time()
                train = TrainConfig(max_steps=args.steps, batch_size=16, learning_rate=5e-4, warmup_ratio=0.0,
                                    lr_scheduler="constant", save_steps=10_000, seed=seed, logging_steps=20)
                out = Path(tmp) / f"{arm}-{seed}"
                train_student(str(base), schedule, out, settings=train, objective=objective, kd=KDConfig(),
                              template="chat", progress=False)
                acc = evaluate_student(load(out)[0], tok, tests)["overall"]
                rows.append({"seed": seed, "arm": arm, "accuracy": acc, "teacher_requests": len(inputs),
                             "pseudo_targets": len(pts), "aligned_fraction": stats.aligned_fraction,
                             "mass_kept": stats.mass_kept, "train_s": round(time.time() - t0, 1)})
                print(f"seed {seed} {arm:8s} accuracy {acc:.3f} ({time.time() - t0:.0f}s)", flush=True)

    print(f"\n{'arm':10s} {'mean acc':>9s} {'per seed':>20s}")
    summary = {}
    for arm in ("pt_ce", "pt_topk"):
        accs = [r["accuracy"] for r in rows if r["arm"] == arm]
        summary[arm] = sum(accs) / len(accs)
        print(f"{arm:10s} {summary[arm]:9.3f} {' '.join(f'{a:.3f}' for a in accs):>20s}")
    elapsed = time.time() - started
    print(f"base {base_acc:.3f} | teacher {teacher_acc:.3f} | {elapsed:.0f}s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "base_accuracy": base_acc, "teacher_accuracy": teacher_acc,
                                   "mean_accuracy": summary, "rows": rows, "seconds": round(elapsed, 1)}, indent=1))


if __name__ == "__main__":
    main()
