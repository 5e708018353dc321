"""The real student on this CPU: SmolLM2-135M-Instruct training and generation speed, side by side.

Training: lionkd's trainer on one fixed set of sandbox-world examples (batch 16, chat template, loss on
answers), for each of full fine-tuning and LoRA (r 16, all linear layers) in fp32 and with bf16
autocast (fp32 master weights either way). Tokens/s counts every input token (prompt included) of
the timed steps; the first step of each run is a warm-up and is not timed. The four runs are
interleaved twice and the faster of each pair counts, so load from elsewhere hits all alike.

Generation: lionkd's batched HFBackend (length-sorted, left-padded, batch 32) against one
`model.generate` call per request, greedy, the same sandbox prompts, at most 32 new tokens, stopping
at the end of turn. Both sides' answers are compared: batching must not change greedy answers.

    python -m benchmarks real_student          (or: python benchmarks/real_student.py)
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from _common import messages, write_results
from lionkd.config import LoraConfig, TrainConfig
from lionkd.kd.examples import TrainExample
from lionkd.kd.job import TrainJob
from lionkd.kd.train import build_trainer
from lionkd.llm.base import GenRequest
from lionkd.llm.hf import HFBackend
from lionkd.llm.models import resolve_model_path
from lionkd.sandbox import world

MODEL = "smollm2-135m-instruct"
BATCH = 16
STEPS = 5  # timed steps per run, after one warm-up step
ROUNDS = 2
GEN_PROMPTS = 32
NAIVE_PROMPTS = 8
NEW_TOKENS = 32


class StepTimer(TrainerCallback):
    """Wall time of every optimiser step but the first."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.times.append(time.perf_counter() - self.start)


def train_rate(path: str, examples: list[TrainExample], precision: str, lora: bool, out: Path) -> float:
    settings = TrainConfig(max_steps=STEPS + 1, batch_size=BATCH, learning_rate=2e-5, warmup_ratio=0,
                           max_length=96, precision=precision, save_steps=10_000, logging_steps=100)
    trainer = build_trainer(TrainJob(path, examples, out, settings=settings, lora=LoraConfig() if lora else None,
                                     progress=False))
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    tokens_per_step = trainer.input_tokens / (STEPS + 1)
    return tokens_per_step * STEPS / sum(timer.times[1:])


@torch.inference_mode()
def naive_generate(backend: HFBackend, instructions: list[str]) -> tuple[float, list[str], int]:
    """One `generate` per request, with the same prompt rendering and stop tokens as the backend."""
    model, tok = backend.net, backend.tokenizer
    texts, tokens = [], 0
    start = time.perf_counter()
    for q in instructions:
        ids = torch.tensor([backend.encode(GenRequest.chat(messages(q), temperature=0, max_tokens=NEW_TOKENS))])
        out = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=sorted(backend.eos_ids), pad_token_id=backend.pad_id)
        new = out[0, ids.shape[1]:].tolist()
        tokens += len(new)
        texts.append(tok.decode(new, skip_special_tokens=True))
    return time.perf_counter() - start, texts, tokens


def batched_generate(backend: HFBackend, instructions: list[str]) -> tuple[float, list[str], int]:
    requests = [GenRequest.chat(messages(q), temperature=0, max_tokens=NEW_TOKENS) for q in instructions]
    start = time.perf_counter()
    results = backend.generate(requests)
    return time.perf_counter() - start, [r.text for r in results], sum(r.completion_tokens for r in results)


def main() -> dict:
    load = os.getloadavg()[0]
    path = resolve_model_path(MODEL)
    rng = random.Random(0)
    items = [world.sample(rng) for _ in range(BATCH * (STEPS + 1))]
    examples = [TrainExample(messages=messages(x.instruction), target=x.answer) for x in items]
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "lionkd-bench-real-student"

    runs = [("full", "fp32"), ("full", "bf16"), ("lora", "fp32"), ("lora", "bf16")]
    train: dict[tuple[str, str], float] = {}
    for _ in range(ROUNDS):
        for kind, precision in runs:
            rate = train_rate(path, examples, precision, kind == "lora", scratch / f"{kind}-{precision}")
            train[(kind, precision)] = max(rate, train.get((kind, precision), 0.0))

    backend = HFBackend(path, batch_size=GEN_PROMPTS)
    prompts = [world.sample(rng).instruction for _ in range(GEN_PROMPTS)]
    backend.generate([GenRequest.chat(messages(prompts[0]), temperature=0, max_tokens=2)])  # warm-up
    best: dict[str, tuple] = {}
    for _ in range(ROUNDS):
        for name, run in (("naive", lambda: naive_generate(backend, prompts[:NAIVE_PROMPTS])),
                          ("batch", lambda: batched_generate(backend, prompts))):
            measured = run()
            if name not in best or measured[0] < best[name][0]:
                best[name] = measured
    naive_s, naive_texts, naive_tokens = best["naive"]
    batch_s, batch_texts, batch_tokens = best["batch"]
    same = sum(a.strip() == b.strip() for a, b in zip(naive_texts, batch_texts, strict=False))
    naive_rate, batch_rate = naive_tokens / naive_s, batch_tokens / batch_s

    base = train[("full", "fp32")]
    rows = [{"what": f"train, {kind}, {precision}", "tokens_per_s": round(rate, 1), "vs_full_fp32": round(rate / base, 2)}
            for (kind, precision), rate in train.items()]
    rows += [
        {"what": f"generate, one request per call ({NAIVE_PROMPTS} prompts)", "tokens_per_s": round(naive_rate, 1),
         "vs_naive": 1.0},
        {"what": f"generate, HFBackend batch {GEN_PROMPTS}", "tokens_per_s": round(batch_rate, 1),
         "vs_naive": round(batch_rate / naive_rate, 2)},
    ]
    print(f"\nSmolLM2-135M-Instruct on this CPU ({torch.get_num_threads()} torch threads, load average {load:.1f})\n")
    print(f"{'what':<48} {'tokens/s':>9} {'ratio':>7}")
    print("-" * 66)
    for r in rows:
        print(f"{r['what']:<48} {r['tokens_per_s']:>9.1f} {r.get('vs_full_fp32', r.get('vs_naive')):>6.2f}x")
    print(f"\ngreedy answers identical between the two generation paths: {same}/{NAIVE_PROMPTS}")
    result = {"model": MODEL, "threads": torch.get_num_threads(), "load_average": load, "batch": BATCH,
              "timed_steps": STEPS, "rows": rows, "identical_answers": same, "compared_answers": NAIVE_PROMPTS}
    write_results("real_student", result)
    return result


if __name__ == "__main__":
    main()
