"""A tiny student trained from scratch on the sandbox world.

`train_tokenizer` and `build_student` make a fresh Llama-style student small enough to train on a
laptop CPU; `prepare_base_student` gives it a short base training on freshly drawn problems (the
way Lion starts from a pretrained base model), and `base_student_dir` points at the one shipped with
the package, made by

    python -m lionkd.sandbox.student --out src/lionkd/sandbox/assets/base-student

`evaluate_student` measures exact-match accuracy per task and domain with greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from . import world
from .world import Instance

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# One turn per block; an assistant turn ends with EOS, which is where generation stops.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SIZES: dict[str, dict[str, int]] = {
    "micro": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "tiny": {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4},
    "small": {"hidden_size": 160, "intermediate_size": 432, "num_hidden_layers": 6, "num_attention_heads": 5},
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 800) -> PreTrainedTokenizerFast:
    """Byte-level BPE with every digit its own token, special tokens and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


def build_student(tokenizer: Any, size: str = "tiny", seed: int = 0) -> LlamaForCausalLM:
    """A fresh Llama-style causal LM: "tiny" ~0.5M parameters, "micro" for tests, "small" ~2M."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, not {size!r}")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SIZES[size],
    )
    return LlamaForCausalLM(config)


def save_student(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write a normal Hugging Face directory (safetensors, config, tokenizer with its chat template)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def base_student_dir() -> Path:
    """The base student shipped with the package."""
    return Path(__file__).parent / "assets" / "base-student"


# ---- base training ---------------------------------------------------------------------------


def prompt_text(tokenizer: Any, instruction: str, system_prompt: str | None = None) -> str:
    """The chat prompt the student answers (what `lionkd.llm.templates.render_prompt` renders too)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return tokenizer.apply_chat_template(
        [*system, {"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )


def encode_examples(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded (instruction, answer) batch; labels only on the answer and its EOS."""
    prompts = tokenizer([prompt_text(tokenizer, q) for q, _ in pairs], add_special_tokens=False)["input_ids"]
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    rows = [(p + a + [tokenizer.eos_token_id], len(p)) for p, a in zip(prompts, answers, strict=True)]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_on_world(
    model: Any,
    tokenizer: Any,
    steps: int,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: float = 0.03,
    log_every: int = 0,
) -> list[float]:
    """Causal-LM training on fresh training-split problems, uniform over tasks and levels."""
    rng = random.Random(f"base-train:{seed}")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    n_warm = max(1, int(warmup * steps))

    def lr_at(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    for step in range(steps):
        batch = [world.sample(rng) for _ in range(batch_size)]
        loss = model(**encode_examples(tokenizer, [(x.instruction, x.answer) for x in batch])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
    model.eval()
    return losses


# ---- evaluation ------------------------------------------------------------------------------


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the generation config's (end of turn included) and EOS."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, instructions: Sequence[str], batch_size: int = 256, max_new_tokens: int = 32,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy answers, batched with left padding and the KV cache, in order of prompt length."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    # similar lengths share a batch, so little of it is padding
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))
    out: list[str] = []
    try:
        for start in range(0, len(order), batch_size):
            chunk = [prompt_text(tokenizer, instructions[i], system_prompt) for i in order[start : start + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids(model, tokenizer),
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    answers = [""] * len(order)
    for i, text in zip(order, out, strict=True):
        answers[i] = text.strip()
    return answers


def evaluate_student(
    model: Any, tokenizer: Any, items: Sequence[Instance | dict[str, Any]], batch_size: int = 256,
    max_new_tokens: int = 32, system_prompt: str | None = None,
) -> dict[str, Any]:
    """Greedy exact-match accuracy: {"overall", "by_task", "by_domain", "by_level", "n"}.

    `items` are world instances or records with an "instruction" that `world.parse` can read.
    """
    instances = [x if isinstance(x, Instance) else world.parse(x["instruction"]) for x in items]
    if any(x is None for x in instances):
        raise ValueError("evaluate_student: an item's instruction is not a sandbox task")
    answers = generate_answers(model, tokenizer, [x.instruction for x in instances], batch_size, max_new_tokens,
                               system_prompt)
    groups: dict[str, dict[Any, list[bool]]] = {
        "by_task": defaultdict(list),
        "by_domain": defaultdict(list),
        "by_level": defaultdict(list),
    }
    hits = []
    for inst, text in zip(instances, answers, strict=True):
        ok = world.is_correct(inst, text)
        hits.append(ok)
        groups["by_task"][inst.task].append(ok)
        groups["by_domain"][inst.domain].append(ok)
        groups["by_level"][inst.level].append(ok)
    result: dict[str, Any] = {"overall": sum(hits) / max(1, len(hits)), "n": len(hits)}
    for name, g in groups.items():
        result[name] = {k: sum(v) / len(v) for k, v in sorted(g.items())}
    return result


# ---- the base student ------------------------------------------------------------------------


def prepare_base_student(
    out_dir: str | Path,
    steps: int = 3000,
    seed: int = 0,
    size: str = "tiny",
    threads: int = 1,
    log_every: int = 0,
) -> dict[str, Any]:
    """Train a fresh tokenizer and student on the world and save them; returns a summary.

    One thread by default: a model this small gains little from a second one, and on a busy machine
    two threads that wait on each other run many times slower.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.time()
    tokenizer = train_tokenizer(world.corpus(seed=seed))
    model = build_student(tokenizer, size=size, seed=seed)
    losses = train_on_world(model, tokenizer, steps=steps, seed=seed, log_every=log_every)
    train_s = time.time() - started
    save_student(model, tokenizer, out_dir)
    summary = {
        "steps": steps,
        "seed": seed,
        "size": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_seconds": round(train_s, 1),
    }
    (Path(out_dir) / "lionkd_base.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare the sandbox base student.")
    parser.add_argument("--out", required=True, help="output directory (a Hugging Face model dir)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-per-task", type=int, default=100, help="test items per task (0: skip)")
    args = parser.parse_args(argv)
    summary = prepare_base_student(
        args.out, steps=args.steps, seed=args.seed, size=args.size, threads=args.threads, log_every=200
    )
    print(json.dumps(summary, indent=2))
    if args.eval_per_task:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.out)
        tokenizer = AutoTokenizer.from_pretrained(args.out)
        started = time.time()
        report = evaluate_student(model, tokenizer, world.test_set(args.eval_per_task, seed=0))
        report["eval_seconds"] = round(time.time() - started, 1)
        summary["test_accuracy"] = report
        (Path(args.out) / "lionkd_base.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
