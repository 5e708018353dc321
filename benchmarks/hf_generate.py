"""Local generation speed: HFBackend's batched generation against one `model.generate` per request.

The model is a Llama built from a config (hidden 256, 4 layers, vocabulary 8,000, random weights) with
a word-level tokenizer over the same vocabulary. 64 prompts of 8-40 words are answered greedily with
exactly 32 new tokens each (end-of-sequence and padding are suppressed, so no answer stops early and
both sides produce the same number of tokens). HFBackend sorts by length and runs batches of 16 with
left padding and the KV cache; the naive loop calls `generate` once per prompt, on the first 16
prompts (its rate does not depend on how many it runs; this keeps the benchmark short), and so does
HFBackend with batch size 1, to separate the gain of batching from per-call overhead. torch uses one
CPU thread (`--threads N` to change): on a shared machine several threads spin-wait on each other and
the timings scatter by several times between runs, and between the main and worker threads. The answers are
compared: batching must not change greedy answers. Each side runs twice, interleaved; the faster run
counts.

    python -m benchmarks.hf_generate          (or: python benchmarks/hf_generate.py)
"""

from __future__ import annotations

import os
import random
import sys
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from _common import write_results
from lionkd.llm.base import GenRequest
from lionkd.llm.hf import HFBackend

VOCAB = 8000
PROMPTS = 64
BATCH = 16
NEW_TOKENS = 32
NAIVE_PROMPTS = 16
ROUNDS = 2


def build(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, list[str]]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(VOCAB - 3)]
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.suppress_tokens = [0, 2]  # never pad or stop: every answer has NEW_TOKENS tokens
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) for _ in range(PROMPTS)]
    return model, tokenizer, prompts


@torch.inference_mode()
def naive(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> tuple[float, list[list[int]]]:
    outputs = []
    start = time.perf_counter()
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        outputs.append(out[0, ids["input_ids"].shape[1]:].tolist())
    return time.perf_counter() - start, outputs


def through_backend(backend: HFBackend, prompts: list[str]) -> tuple[float, list[str], int]:
    requests = [GenRequest(prompt=p, temperature=0, max_tokens=NEW_TOKENS) for p in prompts]
    start = time.perf_counter()
    results = backend.generate(requests)
    elapsed = time.perf_counter() - start
    return elapsed, [r.text for r in results], sum(r.completion_tokens for r in results)


def main(threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    model, tokenizer, prompts = build()
    backend = HFBackend(model, tokenizer=tokenizer, batch_size=BATCH)
    backend.generate([GenRequest(prompt=prompts[0], temperature=0, max_tokens=2)])  # warm-up, both sides share it
    single = HFBackend(model, tokenizer=tokenizer, batch_size=1)
    best: dict[str, tuple] = {}
    for _ in range(ROUNDS):  # interleaved rounds, best of each: other load on the machine hits all sides alike
        for name, run in (("naive", lambda: naive(model, tokenizer, prompts[:NAIVE_PROMPTS])),
                          ("single", lambda: through_backend(single, prompts[:NAIVE_PROMPTS])),
                          ("batch", lambda: through_backend(backend, prompts))):
            measured = run()
            if name not in best or measured[0] < best[name][0]:
                best[name] = measured
    naive_s, naive_ids = best["naive"]
    single_s, _, single_tokens = best["single"]
    batch_s, texts, batch_tokens = best["batch"]
    tokens = NAIVE_PROMPTS * NEW_TOKENS
    same = sum(t == tokenizer.decode(ids, skip_special_tokens=True) for t, ids in zip(texts, naive_ids, strict=False))
    rows = [
        {"method": f"naive loop (1 request per generate, {NAIVE_PROMPTS} prompts)", "seconds": round(naive_s, 2),
         "tokens_per_s": round(tokens / naive_s, 1)},
        {"method": f"HFBackend, batch 1 ({NAIVE_PROMPTS} prompts)", "seconds": round(single_s, 2),
         "tokens_per_s": round(single_tokens / single_s, 1)},
        {"method": f"HFBackend (batch {BATCH}, sorted, left-padded)", "seconds": round(batch_s, 2),
         "tokens_per_s": round(batch_tokens / batch_s, 1)},
    ]
    speedup = (batch_tokens / batch_s) / (tokens / naive_s)
    from_batching = (batch_tokens / batch_s) / (single_tokens / single_s)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\nGreedy generation, Llama {params:.1f}M params (random weights), {PROMPTS} prompts x {NEW_TOKENS} "
          f"new tokens, {torch.get_num_threads()} torch threads, fp32 CPU, load average {load:.1f}\n")
    print(f"{'method':<52} {'seconds':>8} {'tokens/s':>9}")
    print("-" * 71)
    for r in rows:
        print(f"{r['method']:<52} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f}")
    print(f"\nspeed-up over the naive loop: {speedup:.1f}x (from batching alone: {from_batching:.1f}x); "
          f"identical greedy answers: {same}/{NAIVE_PROMPTS}")
    result = {"prompts": PROMPTS, "batch_size": BATCH, "new_tokens": NEW_TOKENS, "params_m": round(params, 2),
              "load_average": load, "rows": rows, "speedup": round(speedup, 2),
              "speedup_from_batching": round(from_batching, 2), "identical_answers": same}
    write_results("hf_generate", result)
    return result


if __name__ == "__main__":
    main(int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1)
