"""One word-level KD training step: lionkd's KDTrainer vs TRL's GKD trainer (off-policy, forward KL).

Same student and teacher (Llama, hidden 256, 2 layers, 32,000-token vocabulary), same batch (4
sequences of 64 prompt + 192 target tokens), same optimiser. TRL's GKD runs with lmbda = 0 (no
student generations) and beta = 0, which in TRL's `generalized_jsd_loss` is KL(teacher || student),
i.e. forward KL, temperature 1. lionkd runs twice: with its fused output layer + loss (the default:
no [batch, length, vocabulary] logits of student or teacher) and with the logits path
(`fuse_head=False`). Each trainer runs in its own subprocess. Throughput counts all tokens of a
batch over the step's time, after the first step (warm-up): "best" is the fastest step (the machine
is shared, so the best step is the least disturbed one, as `timeit` takes the minimum), "mean" the
whole run. Peak memory is the growth of peak RSS over the RSS once the models exist. Prints a table with the ratios to TRL and writes benchmarks/results/kd_step.json.

With `--cuda` both trainers run on the GPU in bf16 with SmolLM2-135M's shape (vocabulary 49,152,
hidden 576, 30 layers, tied embeddings; batch 8 x (128 + 384) tokens), and peak memory is the
GPU's peak allocation during training.

    python benchmarks/kd_step.py [--steps 5] [--cuda] [--results PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, write_results
from lionkd.eval.speed import resident_mb

VOCAB, HIDDEN, LAYERS, BATCH, PROMPT, TARGET = 32000, 256, 2, 4, 64, 192
CUDA = False  # set by --cuda, with SmolLM2-135M's shape below


def use_cuda() -> None:
    global CUDA, VOCAB, HIDDEN, LAYERS, BATCH, PROMPT, TARGET
    CUDA, VOCAB, HIDDEN, LAYERS, BATCH, PROMPT, TARGET = True, 49152, 576, 30, 8, 128, 384


def setup(tmp: Path):  # noqa: ANN201
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")

    def llama(seed: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        heads = (9, 3, 1536) if CUDA else (4, 4, 4 * HIDDEN)  # SmolLM2-135M's attention and MLP on the GPU
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=heads[2], num_hidden_layers=LAYERS,
                          num_attention_heads=heads[0], num_key_value_heads=heads[1], max_position_embeddings=1024,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=CUDA)
        return LlamaForCausalLM(cfg)

    rng = random.Random(0)
    texts = [(" ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(PROMPT - 1)),
              " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(TARGET - 1))) for _ in range(BATCH * 8)]
    return tok, llama(0), llama(1), texts


class StepTimer:
    def __init__(self) -> None:
        self.times: list[float] = []

    def callback(self):  # noqa: ANN201
        from transformers import TrainerCallback

        timer = self

        class _Cb(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                timer.times.append(time.perf_counter())

        return _Cb()


def run_lionkd(steps: int, tmp: Path, fuse_head: bool = True) -> dict:
    from lionkd.config import TrainConfig
    from lionkd.kd.examples import TrainExample
    from lionkd.kd.job import TrainJob
    from lionkd.kd.train import build_trainer

    tok, student, teacher, texts = setup(tmp)
    examples = [TrainExample(prompt=p, target=t) for p, t in texts]
    settings = TrainConfig(max_steps=steps, batch_size=BATCH, learning_rate=1e-4, max_length=PROMPT + TARGET,
                           warmup_ratio=0.0, save_steps=10_000, logging_steps=10_000,
                           **({"precision": "bf16"} if CUDA else {}))
    trainer = build_trainer(TrainJob(student, examples, tmp / "lionkd", settings=settings, teacher=teacher,
                                     objective="logits", tokenizer=tok, template="raw", progress=False))
    trainer.fuse_head = fuse_head
    trainer.args.save_strategy = "no"  # as for TRL: time training, not the final checkpoint
    return measure(trainer)


def run_trl(steps: int, tmp: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok, student, teacher, texts = setup(tmp)
    rows = []
    for p, t in texts:
        prompt = tok(p)["input_ids"]
        target = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})

    def collate(batch: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = GKDConfig(output_dir=str(tmp / "trl"), max_steps=steps, per_device_train_batch_size=BATCH,
                     learning_rate=1e-4, lmbda=0.0, beta=0.0, temperature=1.0, max_length=PROMPT + TARGET,
                     report_to="none", save_strategy="no", logging_steps=10_000, use_cpu=not CUDA,
                     disable_tqdm=True, bf16=CUDA)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows), data_collator=collate,
                         processing_class=tok)
    return measure(trainer)


def measure(trainer) -> dict:  # noqa: ANN001
    timer = StepTimer()
    trainer.add_callback(timer.callback())
    base = resident_mb()
    if CUDA:
        import torch

        torch.cuda.reset_peak_memory_stats()
        base = 0.0  # the GPU holds nothing before training: its peak is all the training's
    trainer.train()
    if CUDA:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = [b - a for a, b in itertools.pairwise(timer.times)]
    tokens = BATCH * (PROMPT + TARGET)
    mean = sum(steps) / len(steps)
    return {"tokens_per_s": tokens / min(steps), "tokens_per_s_mean": tokens / mean, "seconds_per_step": mean,
            "step_seconds": steps, "peak_extra_mb": peak - base}


WORKERS = {
    "trl": run_trl,
    "lionkd-logits": lambda steps, tmp: run_lionkd(steps, tmp, fuse_head=False),
    "lionkd": run_lionkd,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--worker", choices=list(WORKERS))
    parser.add_argument("--tmp", default="/tmp/lionkd-bench-kd-step")
    parser.add_argument("--cuda", action="store_true", help="on the GPU, bf16, SmolLM2-135M's shape")
    parser.add_argument("--results", type=Path, default=RESULTS / "kd_step.json")
    args = parser.parse_args()
    if args.cuda:
        use_cuda()
    if args.worker:
        print(json.dumps({"trainer": args.worker, **WORKERS[args.worker](args.steps, Path(args.tmp))}))
        return
    rows = []
    for name in WORKERS:
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--tmp", args.tmp,
               *(["--cuda"] if args.cuda else [])]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    trl = rows[0]
    for r in rows:
        r["throughput_vs_trl"] = r["tokens_per_s"] / trl["tokens_per_s"]
        r["mean_throughput_vs_trl"] = r["tokens_per_s_mean"] / trl["tokens_per_s_mean"]
        r["memory_vs_trl"] = r["peak_extra_mb"] / trl["peak_extra_mb"]
    load = os.getloadavg()
    where = torch_device_name() if CUDA else f"load average {load[0]:.2f} on {os.cpu_count()} CPUs"
    print(f"KD training step: Llama h{HIDDEN} x{LAYERS}, vocab {VOCAB}, batch {BATCH} x {PROMPT + TARGET} tokens; "
          f"{where}")
    print(f"{'trainer':<15}{'tokens/s':>10}{'(mean)':>8}{'peak extra MiB':>16}{'speed/TRL':>11}{'(mean)':>8}"
          f"{'memory/TRL':>12}")
    for r in rows:
        print(f"{r['trainer']:<15}{r['tokens_per_s']:>10.0f}{r['tokens_per_s_mean']:>8.0f}{r['peak_extra_mb']:>16.0f}"
              f"{r['throughput_vs_trl']:>11.2f}{r['mean_throughput_vs_trl']:>8.2f}{r['memory_vs_trl']:>12.2f}")
    write_results("kd_step", {"steps": args.steps, "rows": rows, "load_average": load,
                              "device": torch_device_name() if CUDA else "cpu", "batch": BATCH,
                              "tokens_per_sequence": PROMPT + TARGET, "vocab": VOCAB, "hidden": HIDDEN,
                              "layers": LAYERS}, path=args.results)


def torch_device_name() -> str:
    import torch

    return f"{torch.cuda.get_device_name(0)}, bf16"


if __name__ == "__main__":
    main()
