#!/usr/bin/env bash
# The GPU check: what CPU tests cannot show, on a machine with one or more NVIDIA GPUs (under 8 minutes on
# one GPU). Run from the repository root after `make install` (or `pip install -e '.[vllm]'`, plus
# `pip install deepspeed` for the ZeRO-3 stage):
#
#     bash scripts/gpu_check.sh
#
# 1. bf16 autocast over fp32 master weights: SmolLM2 trains on the GPU and every weight moves.
# 2. a training stage under Accelerate on the visible GPUs: FSDP2 (and DeepSpeed ZeRO-3 when installed),
#    launched as a child job exactly as `lionkd run` does, with Joint-Teaching sampling under sharding.
# 3. vLLM generation of the student's answers, the engine shut down afterwards (GPU memory back).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
OUT=${OUT:-$(mktemp -d)}
echo "gpu check: writing to $OUT"
"$PY" - "$OUT" <<'PYCODE'
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lionkd.config import TrainConfig
from lionkd.kd.data import TrainExample
from lionkd.kd.joint_teaching import JointTeaching
from lionkd.kd.trainer import train_student
from lionkd.llm.base import GenRequest
from lionkd.llm.models import resolve_model_path
from lionkd.sandbox import world

out = Path(sys.argv[1])
assert torch.cuda.is_available(), "no CUDA GPU visible"
gpus = torch.cuda.device_count()
print(f"{gpus} GPU(s): {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
path = resolve_model_path("smollm2-135m-instruct")
rng = random.Random(0)
system = "Answer with the result only."
examples = [TrainExample(messages=[{"role": "system", "content": system}, {"role": "user", "content": x.instruction}],
                         target=x.answer) for x in (world.sample(rng) for _ in range(256))]
results = {}

def moved(base: str, trained: Path) -> float:
    a, b = load_file(f"{base}/model.safetensors"), load_file(str(trained / "model.safetensors"))
    return sum(int((a[k].float() != b[k].float()).sum()) for k in b) / sum(v.numel() for v in b.values())

started = time.time()
settings = TrainConfig(max_steps=20, batch_size=16, learning_rate=2e-5, warmup_ratio=0, max_length=96,
                       precision="auto", processes=1, save_steps=10_000)
m = train_student(path, examples, out / "bf16", settings=settings, progress=False)
results["bf16"] = {"tokens_per_s": round(m["tokens_per_s"]), "weights_moved": round(moved(path, out / "bf16"), 3),
                   "seconds": round(time.time() - started)}
assert results["bf16"]["weights_moved"] > 0.5, results
print("1. bf16:", results["bf16"])

stages = [("fsdp2", "examples/accelerate/fsdp2.yaml")]
if importlib.util.find_spec("deepspeed") is not None:
    stages.append(("zero3", "examples/accelerate/zero3.yaml"))
for name, config in stages:
    started = time.time()
    settings = TrainConfig(max_steps=10, batch_size=16 * gpus, learning_rate=2e-5, warmup_ratio=0, max_length=96,
                           precision="bf16", processes="auto", accelerate_config=Path(config), save_steps=10_000)
    m = train_student(path, examples, out / name, settings=settings, progress=False,
                      joint=JointTeaching(alpha=0.25, max_new_tokens=16), teacher=path, objective={"logits": 1.0})
    results[name] = {"steps": m["steps"], "tokens_per_s": round(m["tokens_per_s"]),
                     "weights_moved": round(moved(path, out / name), 3), "seconds": round(time.time() - started)}
    assert m["steps"] == 10 and results[name]["weights_moved"] > 0.5, results
    print(f"2. {name}:", results[name])

if importlib.util.find_spec("vllm") is not None:
    from lionkd.llm.vllm_backend import VLLMBackend

    started = time.time()
    backend = VLLMBackend(str(out / "bf16"), gpu_memory_utilization=0.5)
    requests = [GenRequest.chat([{"role": "system", "content": system}, {"role": "user", "content": x.instruction}],
                                temperature=0, max_tokens=32) for x in world.test_set(per_task=10, seed=1)]
    answers = backend.generate(requests)
    backend.release()
    free, total = torch.cuda.mem_get_info()
    results["vllm"] = {"answers": sum(a.ok for a in answers), "of": len(requests),
                       "gpu_memory_free_after": round(free / total, 2), "seconds": round(time.time() - started)}
    assert results["vllm"]["answers"] == len(requests), results
    print("3. vllm:", results["vllm"])
else:
    print("3. vllm: not installed (pip install 'lionkd[vllm]'), skipped")
(out / "gpu_check.json").write_text(json.dumps(results, indent=2))
print(f"gpu check passed: {out / 'gpu_check.json'}")
PYCODE
