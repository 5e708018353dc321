"""The GPU check: what CPU tests cannot show, run on a machine with one or more NVIDIA GPUs.

Checks (each must pass):
1. bf16 autocast over fp32 master weights: the student trains on the GPU and every weight moves.
2. fp16 with dynamic loss scaling: the gradient scaler is active, the loss stays finite, weights move.
3. a training stage under Accelerate on the visible GPUs: FSDP2 (and DeepSpeed ZeRO-3 when installed),
   launched as a child job exactly as `lionkd run` does, with Joint-Teaching sampling under sharding;
   the gathered checkpoint is read back and answers greedily.
4. vLLM generation gives the same greedy answers as the HF backend (when vLLM is installed).
5. On-policy KD with the student's samples from a vLLM engine beside the training: it trains, and the
   engine ends holding the trained weights (when vLLM is installed).

Figures (side by side in this run, as ratios): training tokens/s in fp32, bf16 and bf16 + LoRA; the
Cache Pool's answers/s through the HF backend (and vLLM when installed); the KD step against TRL's
GKD trainer (`benchmarks/kd_step.py --cuda`). Each section is timed and a failing one does not stop
the others; the exit code is 1 when any check failed.

    python scripts/gpu_check.py OUT_DIR [--model NAME_OR_PATH] [--fresh-weights]

`--fresh-weights` builds the model from the folder's config with new random weights (its tokenizer
and chat template kept): the figures depend on the architecture, not on the weights, so this is
how the check runs where only a model's config and tokenizer can be brought.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from lionkd.config import LoraConfig, TrainConfig
from lionkd.kd.examples import TrainExample
from lionkd.kd.job import TrainJob
from lionkd.kd.joint_teaching import JointTeaching
from lionkd.kd.train import build_trainer, train_student
from lionkd.llm.base import GenRequest
from lionkd.llm.hf import HFBackend
from lionkd.llm.models import resolve_model_path
from lionkd.sandbox import world

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "Answer with the result only."
results: dict = {"checks": {}, "figures": {}, "errors": {}}


@contextmanager
def section(name: str):
    """Run one part, time it, and record a failure without stopping the other parts."""
    started = time.time()
    print(f"--- {name}", flush=True)
    try:
        yield
        print(f"--- {name}: ok in {time.time() - started:.0f} s", flush=True)
    except Exception:
        results["errors"][name] = traceback.format_exc()[-4000:]
        print(f"--- {name}: FAILED in {time.time() - started:.0f} s\n{results['errors'][name]}", flush=True)
    finally:
        torch.cuda.empty_cache()


def messages(instruction: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": instruction}]


def moved(base: str, trained: Path) -> float:
    """Share of the trained checkpoint's weights that differ from the base's."""
    a, b = load_file(f"{base}/model.safetensors"), load_file(str(trained / "model.safetensors"))
    return sum(int((a[k].float() != b[k].float()).sum()) for k in b) / sum(v.numel() for v in b.values())


def base_model(name: str, fresh: bool, out: Path) -> str:
    path = resolve_model_path(name)
    if not fresh:
        return path
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    target = out / "base"
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(path).save_pretrained(target)
    if (Path(path) / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(path).save_pretrained(target)
    return str(target)


def train(path: str, examples: list, out: Path, steps: int, batch: int, precision: str, **kw) -> dict:
    settings = TrainConfig(max_steps=steps, batch_size=batch, learning_rate=2e-5, warmup_ratio=0, max_length=128,
                           precision=precision, processes=1, save_steps=10_000, logging_steps=5)
    return train_student(TrainJob(path, examples, out, settings=settings, progress=False, **kw))


def on_policy_vllm(path: str, examples: list, out: Path) -> dict:
    """On-policy KD whose samples come from a vLLM engine beside the training, against HF's `generate`:
    the same steps, the engine holding the trained weights at the end, and the time of each."""
    from lionkd.config import OnPolicyConfig
    from lionkd.kd.on_policy import OnPolicySetup
    from lionkd.llm.cache import CachedLLM
    from lionkd.llm.scoring import ScoringBackend, TeacherScorer
    from lionkd.llm.server import ServerThread, create_app
    from lionkd.llm.templates import render_prompt

    teacher = HFBackend(path, device="cuda", dtype="bfloat16", batch_size=32)
    tok = teacher.tokenizer
    prompts = {e.id: render_prompt(tok, e.prompt_messages(), "chat") for e in examples}
    report = {}
    with ServerThread(create_app({"teacher": teacher})) as server:
        for sampler in ("hf", "vllm"):
            scorer = TeacherScorer(CachedLLM(ScoringBackend("teacher", base_url=server.base_url), None,
                                             role="teacher"), 5)
            setup = OnPolicySetup(OnPolicyConfig(max_new_tokens=32, sampler=sampler), scorer, prompts)
            # a large rate, so that the weights the engine holds tell the trained ones from the initial ones
            settings = TrainConfig(max_steps=10, batch_size=16, learning_rate=1e-3, warmup_ratio=0, max_length=128,
                                   precision="bf16", processes=1, save_steps=10_000)
            trainer = build_trainer(TrainJob(path, examples, out / f"on-policy-{sampler}", settings=settings,
                                             objective={"on_policy": 1.0}, progress=False, on_policy=setup))
            started = time.time()
            trainer.train()
            stats = trainer.on_policy.stats
            report[sampler] = {"s": round(time.time() - started, 1), "samples": stats.samples,
                               "aligned": round(stats.aligned_fraction, 3),
                               "last_reverse_kl": round(stats.history[max(stats.history)][1], 4)}
            if sampler == "vllm":
                engine = trainer.on_policy.sampler.engine
                copy = dict(engine.llm_engine.model_executor.driver_worker.model_runner.model.named_parameters())
                trained = dict(trainer.model.named_parameters())
                name = "model.layers.0.mlp.down_proj.weight"  # vLLM fuses q/k/v and gate/up, not this one
                held = copy[name].float().cpu()
                # synced before the last step's update: far nearer the trained weights than the initial ones
                to_trained = (held - trained[name].detach().float().cpu()).abs().mean().item()
                to_initial = (held - load_file(Path(path) / "model.safetensors")[name].float()).abs().mean().item()
                report[sampler].update(engine_to_trained=to_trained, engine_to_initial=to_initial,
                                       synced_step=trainer.on_policy.sampler.synced_step)
                report[sampler]["engine_weights_are_the_trained_ones"] = to_trained < to_initial / 3
            del trainer
            torch.cuda.empty_cache()
    report["vllm_vs_hf_time"] = round(report["vllm"]["s"] / report["hf"]["s"], 2)
    assert report["vllm"]["samples"] == report["hf"]["samples"] > 0, report
    assert report["vllm"]["engine_weights_are_the_trained_ones"], report
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--fresh-weights", action="store_true")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        raise SystemExit("gpu check: no CUDA GPU visible (it checks what CPU tests cannot)")
    gpus = torch.cuda.device_count()
    import transformers

    results["machine"] = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
                          "cuda": torch.version.cuda, "transformers": transformers.__version__,
                          "bf16": torch.cuda.is_bf16_supported()}
    print(json.dumps(results["machine"]), flush=True)
    path = base_model(args.model, args.fresh_weights, out)
    results["machine"]["model"] = args.model + (" (config and tokenizer, fresh weights)" if args.fresh_weights else "")
    rng = random.Random(0)
    examples = [TrainExample(messages=messages(x.instruction), target=x.answer) for x in
                (world.sample(rng) for _ in range(2048))]

    with section("bf16"):
        m = train(path, examples, out / "bf16", 20, 16, "bf16")
        share = moved(path, out / "bf16")
        results["checks"]["bf16"] = {"steps": m["steps"], "loss": m["loss"], "weights_moved": round(share, 3)}
        assert m["steps"] == 20 and share > 0.5, results["checks"]["bf16"]

    with section("fp16"):
        settings = TrainConfig(max_steps=20, batch_size=16, learning_rate=2e-5, warmup_ratio=0, max_length=128,
                               precision="fp16", processes=1, save_steps=10_000, logging_steps=5)
        trainer = build_trainer(TrainJob(path, examples, out / "fp16", settings=settings, progress=False))
        before = {k: v.detach().cpu().clone() for k, v in trainer.model.named_parameters()}
        result = trainer.train()
        scaler = trainer.accelerator.scaler
        after = {k: v.detach().cpu() for k, v in trainer.model.named_parameters()}
        share = sum(int((before[k] != after[k]).sum()) for k in before) / sum(v.numel() for v in before.values())
        results["checks"]["fp16"] = {"loss": result.training_loss, "loss_scale": scaler.get_scale() if scaler else None,
                                     "weights_moved": round(share, 3), "master_dtype": str(next(iter(after.values())).dtype)}
        assert scaler is not None and torch.isfinite(torch.tensor(result.training_loss)) and share > 0.5, \
            results["checks"]["fp16"]
        del trainer, before, after

    with section("training speed"):
        # same data, steps and batch; only the number format (and LoRA) differ
        speed = {}
        for name, precision, extra in [("fp32", "fp32", {}), ("bf16", "bf16", {}),
                                       ("bf16_lora", "bf16", {"lora": LoraConfig()})]:
            m = train(path, examples, out / f"speed-{name}", 40, 64, precision, **extra)
            speed[name] = round(m["tokens_per_s"])
        speed["bf16_vs_fp32"] = round(speed["bf16"] / speed["fp32"], 2)
        speed["lora_vs_full_bf16"] = round(speed["bf16_lora"] / speed["bf16"], 2)
        results["figures"]["training_tokens_per_s"] = speed
        print(speed, flush=True)

    stages = [("fsdp2", "examples/accelerate/fsdp2.yaml")]
    if importlib.util.find_spec("deepspeed") is not None:
        stages.append(("zero3", "examples/accelerate/zero3.yaml"))
    else:
        results["checks"]["zero3"] = "skipped: deepspeed is not installed"
    for name, config in stages:
        with section(name):
            settings = TrainConfig(max_steps=10, batch_size=16 * gpus, learning_rate=2e-5, warmup_ratio=0,
                                   max_length=128, precision="bf16", processes="auto",
                                   accelerate_config=ROOT / config, save_steps=10_000)
            m = train_student(TrainJob(path, examples[:512], out / name, settings=settings, progress=False,
                                       joint=JointTeaching(alpha=0.25, max_new_tokens=16), teacher=path,
                                       objective={"logits": 1.0}))
            share = moved(path, out / name)
            # the gathered checkpoint reads back as an ordinary model folder and answers
            backend = HFBackend(str(out / name), device="cuda", dtype="bfloat16", batch_size=8)
            answers = backend.generate([GenRequest.chat(messages(x.instruction), temperature=0, max_tokens=16)
                                        for x in world.test_set(per_task=1, seed=1)[:8]])
            backend.release()
            results["checks"][name] = {"steps": m["steps"], "weights_moved": round(share, 3),
                                       "student_samples": m.get("student_samples"),
                                       "read_back_answers": sum(a.ok for a in answers), "of": len(answers)}
            assert m["steps"] == 10 and share > 0.5 and all(a.ok for a in answers), results["checks"][name]
            assert (m.get("student_samples") or {}).get("generated", 0) > 0, "Joint-Teaching sampled nothing"

    pool = [GenRequest.chat(messages(x.instruction), temperature=0, max_tokens=64)
            for x in world.test_set(per_task=40, seed=2)][:512]
    with section("cache pool answers/s"):
        figures = {"requests": len(pool), "max_tokens": 64}
        backend = HFBackend(path, device="cuda", dtype="bfloat16", batch_size=128)
        backend.generate(pool[:128])  # warm-up
        started = time.time()
        hf_answers = backend.generate(pool)
        figures["hf_answers_per_s"] = round(len(pool) / (time.time() - started), 1)
        figures["hf_completion_tokens"] = sum(a.completion_tokens or 0 for a in hf_answers)
        backend.release()
        if importlib.util.find_spec("vllm") is not None:
            from lionkd.llm.vllm_backend import VLLMBackend

            backend = VLLMBackend(path, gpu_memory_utilization=0.5)
            backend.generate(pool[:128])
            started = time.time()
            vllm_answers = backend.generate(pool)
            figures["vllm_answers_per_s"] = round(len(pool) / (time.time() - started), 1)
            figures["vllm_vs_hf"] = round(figures["vllm_answers_per_s"] / figures["hf_answers_per_s"], 1)
            same = sum(a.text == b.text for a, b in zip(hf_answers, vllm_answers, strict=True))
            backend.release()
            results["checks"]["vllm_greedy_equals_hf"] = {"same": same, "of": len(pool)}
            assert same >= 0.9 * len(pool), results["checks"]["vllm_greedy_equals_hf"]
        else:
            results["checks"]["vllm_greedy_equals_hf"] = "skipped: vllm is not installed"
        results["figures"]["cache_pool"] = figures
        print(figures, flush=True)

    if importlib.util.find_spec("vllm") is not None:
        with section("on-policy samples from vLLM"):
            results["checks"]["on_policy_vllm"] = on_policy_vllm(path, examples[:256], out)
    else:
        results["checks"]["on_policy_vllm"] = "skipped: vllm is not installed"

    with section("kd step vs TRL GKD"):
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kd_step.py"), "--cuda", "--steps", "12",
                              "--results", str(out / "kd_step_gpu.json")], capture_output=True, text=True)
        print(run.stdout[-3000:], flush=True)
        assert run.returncode == 0, run.stderr[-3000:]
        results["figures"]["kd_step"] = json.loads((out / "kd_step_gpu.json").read_text())

    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    failed = sorted(results["errors"])
    print(f"gpu check {'FAILED: ' + ', '.join(failed) if failed else 'passed'}: {out / 'gpu_check.json'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
