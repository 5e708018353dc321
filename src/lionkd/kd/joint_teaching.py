"""Joint-Teaching: the student also learns from the teacher on its own samples.

Each example of a batch is, with probability `alpha`, replaced by a target the CURRENT student
samples from the same prompt (eval mode, no gradient). The teacher's word-level KD then applies to
teacher pseudo-targets and student samples alike, so the student learns what the teacher would do
after the student's own prefixes (exposure bias). Samples may be reused for `refresh_every`
optimiser steps to save generation time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .decoding import generate_token_ids
from .examples import fit_length


@dataclass
class JointTeaching:
    alpha: float = 0.5  # share of examples replaced by student samples
    refresh_every: int = 1  # optimiser steps a cached student sample stays valid
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("joint teaching alpha must be in [0, 1]")
        if self.refresh_every < 1:
            raise ValueError("joint teaching refresh_every must be >= 1")


class StudentSampler:
    """Swaps examples of a batch for the student's own samples, with a per-example sample cache."""

    def __init__(self, settings: JointTeaching, tokenizer: Any, max_length: int, encoder_decoder: bool) -> None:
        self.settings = settings
        self.encoder_decoder = encoder_decoder
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.rng = random.Random(settings.seed)
        self.cache: dict[str, tuple[int, list[int]]] = {}  # example id -> (step sampled, target ids)
        self.replaced = 0
        self.generated = 0

    def mix(self, model: Any, features: Sequence[dict[str, Any]], step: int, synced: bool = False
            ) -> list[dict[str, Any]]:
        """The batch's features with about alpha of them carrying a student sample as target.

        `synced`: parameters are sharded over processes, so sampling runs in step with the others.
        """
        chosen = [i for i in range(len(features)) if self.rng.random() < self.settings.alpha]
        if not chosen and not synced:
            return list(features)
        stale = [
            i for i in chosen
            if features[i]["id"] not in self.cache
            or step - self.cache[features[i]["id"]][0] >= self.settings.refresh_every
        ]
        if synced:  # every process must make the same generate calls: sample the whole (equal-sized) batch
            stale = list(range(len(features)))
        if stale:
            samples = generate_token_ids(
                model,
                self.tokenizer,
                [features[i]["prompt"] for i in stale],
                max_new_tokens=self.settings.max_new_tokens,
                do_sample=True,
                temperature=self.settings.temperature,
                top_p=self.settings.top_p,
                synced_gpus=synced,
            )
            for i, sample in zip(stale, samples, strict=True):
                self.cache[features[i]["id"]] = (step, sample[0])
            self.generated += len(stale)
        self.replaced += len(chosen)
        out = []
        for i, f in enumerate(features):
            # cached teacher top-k belongs to the gold/PT tokens: the batch needs the live teacher
            f = {k: v for k, v in f.items() if k not in ("topk_ids", "topk_logprobs")}
            if i in chosen:
                sample = self.cache[f["id"]][1]
                if self.encoder_decoder:
                    prompt, target = f["prompt"], sample[: self.max_length]
                else:
                    prompt, target = fit_length(f["prompt"], sample, self.max_length)
                f.update(prompt=prompt, target=target, source="student")
            out.append(f)
        return out
