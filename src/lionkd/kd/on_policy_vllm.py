"""The student's on-policy samples from a vLLM engine beside the training (`kd.on_policy.sampler: vllm`).

HF's `generate` writes a step's samples token by token through the training model; a vLLM engine on
the same GPU writes them several times faster. The engine holds its own copy of the student: before
it samples for a new step, the trained weights are copied into it, device to device (no checkpoint on
disk), so every sample comes from the student as it is at that step. Each row is sampled from its own
seed, so a resumed run samples the same completions (on the same vLLM version and GPU).

The engine runs inside this process (vLLM's "external launcher" executor, with a world of one): only
then can the training hand it tensors. vLLM is imported only when this sampler is chosen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..config import OnPolicyConfig, VLLMOptions
from ..errors import UserError
from .decoding import cut_at_eos
from .launch import free_port

KEY = "kd.on_policy.sampler"


@contextmanager
def _world_of_one() -> Iterator[None]:
    """The rendezvous variables vLLM's in-process executor reads, for its start only: left set, they
    would tell the Trainer, and every process this one starts, that they are part of a launched job."""
    values = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port())}
    before = {key: os.environ.get(key) for key in values}
    os.environ.update({key: value for key, value in values.items() if before[key] is None})
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)


def check_sampler(settings: OnPolicyConfig, lora: Any) -> None:
    """With `sampler: vllm`, what it cannot run with, refused in one line before the engine or any call."""
    import importlib.util

    import torch

    if settings.sampler != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"{KEY}: 'vllm' needs vLLM installed (pip install 'lionkd[vllm]'), or use 'hf'")
    if not torch.cuda.is_available():
        raise UserError(f"{KEY}: 'vllm' needs a GPU; on this machine use 'hf'")
    if lora is not None:  # the engine's copy would need the adapters merged at every step
        raise UserError(f"{KEY}: 'vllm' does not take a LoRA student (student.lora); use 'hf'")
    if settings.vllm.tensor_parallel_size != 1:
        raise UserError("kd.on_policy.vllm.tensor_parallel_size: the sampling engine shares the training's one "
                        "GPU; set 1")


class VLLMSampler:
    """`(model, prompts, seeds, step) -> token ids`: samples from an engine holding the model's weights."""

    def __init__(self, student_dir: Any, options: VLLMOptions, *, max_new_tokens: int, temperature: float,
                 stop_ids: set[int], dtype: str = "auto") -> None:
        import vllm

        if not isinstance(student_dir, str | os.PathLike):
            raise UserError(f"{KEY}: 'vllm' loads the student from its folder; this student is a model in memory")
        with _world_of_one():
            self.engine = vllm.LLM(model=str(student_dir), dtype=dtype, seed=0,
                                   distributed_executor_backend="external_launcher", **options.engine_args())
        self._params = vllm.SamplingParams
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.stop_ids = stop_ids
        self.synced_step: int | None = None

    def sync(self, model: Any, step: int) -> None:
        """The engine's copy of the student takes `model`'s weights, once per step."""
        if self.synced_step == step:
            return
        engine_model = self.engine.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights((name, param.data) for name, param in model.named_parameters())
        self.engine.reset_prefix_cache()  # cached prefixes hold the old weights' keys and values
        self.synced_step = step

    def __call__(self, model: Any, prompts: Sequence[Sequence[int]], seeds: Sequence[int], step: int) -> list[list[int]]:
        self.sync(model, step)
        params = [self._params(n=1, temperature=self.temperature, max_tokens=self.max_new_tokens, seed=seed,
                               stop_token_ids=sorted(self.stop_ids)) for seed in seeds]
        outputs = self.engine.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [cut_at_eos(list(out.outputs[0].token_ids), self.stop_ids) for out in outputs]
