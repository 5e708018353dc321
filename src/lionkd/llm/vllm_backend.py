"""vLLM in process: the same interface over `vllm.LLM` and `SamplingParams`, for generation at scale.

vLLM is an optional dependency (`pip install lionkd[vllm]`) and is imported only when this backend is
built. Chat messages are rendered with `render_prompt`, like the HF backend, so a student answers in
the form it was trained on. Beam search is left to the HF backend (vLLM has it outside `generate`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .base import Backend, Choice, GenRequest, GenResult, TokenLogprob
from .templates import Template, render_prompt

if TYPE_CHECKING:
    from ..config import EndpointConfig


class VLLMBackend(Backend):
    kind = "vllm"

    def __init__(
        self, model_path: str, *, template: Template = "chat", dtype: str = "auto", chunk_size: int = 256,
        **engine_args: Any,
    ) -> None:
        try:
            import vllm
        except ImportError:
            raise UserError("backend 'vllm': vLLM is not installed (pip install 'lionkd[vllm]')") from None
        super().__init__(model_path)
        self._vllm = vllm
        self.engine = vllm.LLM(model=model_path, dtype=dtype, **engine_args)
        self.tokenizer = self.engine.get_tokenizer()
        self.template = template
        self.chunk_size = chunk_size  # requests per engine call: results are handed back chunk by chunk

    @classmethod
    def from_endpoint(cls, endpoint: EndpointConfig, **overrides: Any) -> VLLMBackend:
        """The endpoint's model in a vLLM engine of this process, with the endpoint's engine settings."""
        from .models import resolve_model_path

        options: dict[str, Any] = {"dtype": endpoint.dtype, **endpoint.vllm.engine_args()}
        return cls(resolve_model_path(endpoint.model), **(options | overrides))

    def release(self) -> None:
        """Shut the engine down so that its GPU memory is free for training."""
        import gc

        import torch

        self.engine = None
        try:  # the engine's process group and workers outlive `del` otherwise
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except ImportError:
            pass
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        for start in range(0, len(requests), self.chunk_size):
            chunk = list(requests[start : start + self.chunk_size])
            for i, result in enumerate(await asyncio.to_thread(self._run, chunk)):
                yield start + i, result

    def prompt_text(self, req: GenRequest) -> str:
        if req.prompt is not None:
            return req.prompt
        return render_prompt(self.tokenizer, req.message_dicts(), self.template)

    def sampling_params(self, req: GenRequest) -> Any:
        return self._vllm.SamplingParams(
            n=req.n, temperature=req.temperature, top_p=req.top_p, max_tokens=req.max_tokens,
            stop=list(req.stop) or None, seed=req.seed, logprobs=req.logprobs,
        )

    def _run(self, reqs: list[GenRequest]) -> list[GenResult]:
        beams = [r.num_beams > 1 for r in reqs]
        todo = [r for r, b in zip(reqs, beams, strict=True) if not b]
        outputs = iter(self.engine.generate(
            [self.prompt_text(r) for r in todo], [self.sampling_params(r) for r in todo], use_tqdm=False,
        ) if todo else [])
        results = []
        for req, beam in zip(reqs, beams, strict=True):
            if beam:
                results.append(GenResult(error="beam search (num_beams > 1) is not supported by the vllm backend"))
                continue
            out = next(outputs)
            choices = [Choice(c.text, c.finish_reason or "stop", to_logprobs(c, req.logprobs) if req.logprobs is not None else None)
                       for c in out.outputs]
            results.append(GenResult(choices=choices, prompt_tokens=len(out.prompt_token_ids or []),
                                     completion_tokens=sum(len(c.token_ids) for c in out.outputs)))
        return results


def to_logprobs(completion: Any, top_k: int) -> list[TokenLogprob] | None:
    """vLLM's per-position {token_id: Logprob} dicts (top-k plus the sampled token) as TokenLogprobs."""
    if completion.logprobs is None:
        return None
    out = []
    for token_id, options in zip(completion.token_ids, completion.logprobs, strict=False):
        chosen = options[token_id]
        ranked = sorted(options.values(), key=lambda lp: -lp.logprob)
        top = [(lp.decoded_token or "", lp.logprob) for lp in ranked[:top_k]]
        out.append(TokenLogprob(chosen.decoded_token or "", chosen.logprob, top))
    return out
