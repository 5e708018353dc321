"""The KD trainer: `transformers.Trainer` with distillation objectives (entry points: `train.py`).

Objectives (weighted sum, e.g. {"logits": 0.5, "attention": 0.5}):
- "ce":        cross-entropy on the target tokens (plain fine-tuning)
- "logits":    word-level KD against the teacher (eval mode), divergence from `KDConfig`;
               uses cached teacher top-k when every example carries it (no teacher forward)
- "noisy":     the same with the teacher in train mode (dropout on) and the student's prompt tokens
               noised (`kd.noisy_input_rate`); a teacher without dropout is reported, not hidden
- "attention": MiniLM self-relation KD of Q, K and V of the last self-attention layer(s)
- "on_policy": reverse KL on the student's own samples, scored by a served teacher (`on_policy.py`)

Every loss is a sum over target tokens divided by the number of target tokens of the whole
optimiser step, counted over all micro-batches and all processes before the first forward, so the
update does not depend on how a step is split into micro-batches or processes.

When a model's logits are exactly `lm_head(last hidden states)` (a plain linear output layer), the
trainer never builds its [batch, length, vocabulary] logits: the output layer sees no position, and
the fused losses of `losses.py` project the target positions chunk by chunk. Student and teacher
both; other models fall back to the logits-based losses with the same values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from rich.console import Console
from torch import nn
from transformers import PreTrainedModel, Trainer

from ..config import KDConfig
from ..errors import UserError
from .attention import capture_qkv, relation_heads
from .callbacks import EpochSwitch
from .heads import head_inputs, plain_linear_head
from .joint_teaching import StudentSampler
from .losses import (
    DivergenceSpec,
    HeadTerm,
    LinearHead,
    ce_loss,
    ce_term,
    fused_head_loss,
    kd_loss,
    kd_term,
    on_policy_k1_term,
    on_policy_loss,
    on_policy_topk_term,
    relation_kl_loss,
    sparse_kd_loss,
    sparse_kd_term,
)
from .objectives import has_dropout, noisy_input_ids
from .on_policy import OnPolicyTeacher, collate_on_policy

MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")


class KDTrainer(Trainer):
    """`Trainer` whose loss is a weighted sum of distillation objectives."""

    loss_is_scaled_for_ga = True  # losses are divided by the step's token count, not per micro-batch

    def __init__(
        self,
        *args: Any,
        teacher: PreTrainedModel | None = None,
        objective: Mapping[str, float],
        kd: KDConfig | None = None,
        vocab_size: int | None = None,
        sampler: StudentSampler | None = None,
        on_policy: OnPolicyTeacher | None = None,
        fuse_head: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.on_policy = on_policy
        self.on_policy_items: torch.Tensor | None = None  # the step's on-policy positions (all micro-batches)
        self.fuse_head = fuse_head  # fused output layer + loss where the models allow it
        self.objective = dict(objective)
        self.kd = kd or KDConfig()
        self.vocab_size = vocab_size
        self.sampler = sampler
        self.epoch_switch: EpochSwitch | None = None  # set by build_trainer for several pseudo-targets
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            if self.args.bf16 or self.args.fp16:  # the teacher only infers: no master weights needed
                teacher.to(torch.bfloat16 if self.args.bf16 else torch.float16)
            teacher.to(self.args.device)
        # Noisy KD needs a teacher that drops something: without dropout its "noisy" forward is the
        # clean one, and only the student's input noise (kd.noisy_input_rate) is left of the method.
        self.noisy_teacher_dropout = has_dropout(teacher) if teacher is not None and "noisy" in self.objective else None
        if self.noisy_teacher_dropout is False:
            Console(stderr=True).print(
                "noisy objective: the teacher has no dropout (all its dropout settings are 0), so its noisy pass "
                f"equals the clean one; only the student's input noise (kd.noisy_input_rate={self.kd.noisy_input_rate}) "
                "makes it differ from logits KD", markup=False, highlight=False, soft_wrap=True)
        # Our losses are already divided by the step's token count; transformers releases without
        # `loss_is_scaled_for_ga` read this flag instead before dividing by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self.ce_items: torch.Tensor | None = None  # Joint-Teaching: the step's target tokens not sampled by the student
        self.target_tokens = 0  # target tokens this process trained on
        self.input_tokens = 0
        self.last_parts: dict[str, float] = {}

    # Count the step's target tokens over every micro-batch (and process) before any forward.
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.sampler is not None:
            batches = [self._with_student_samples(b, device) for b in batches]
        if self.on_policy is not None:
            batches = [self._with_on_policy(b, device) for b in batches]
            op = torch.as_tensor(sum(float(b["op_mask"].sum()) for b in batches), device=device)
            self.on_policy_items = op.clamp_min(1)
        count = sum(b["target_mask"].ne(0).sum() for b in batches) if batches else torch.tensor(0)
        count = torch.as_tensor(count, device=device)
        self.target_tokens += int(count)
        self.input_tokens += sum(int(b["attention_mask"].sum()) for b in batches)
        if "attention" in self.objective:
            self.relation_rows = self._step_rows(batches, device)
        if self.sampler is not None:
            ce = torch.as_tensor(sum(int(b["ce_mask"].ne(0).sum()) for b in batches), device=device)
            if self.accelerator.num_processes > 1:
                ce = self.accelerator.gather(ce.reshape(1)).sum()
            self.ce_items = ce.clamp_min(1)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batches, count.clamp_min(1)

    @property
    def params_sharded(self) -> bool:
        """Whether parameters are split over processes (ZeRO-3, FSDP): a weight is whole only inside a forward."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return bool(self.is_fsdp_enabled or (self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3))

    def _step_rows(self, batches: list[dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
        """Relation rows of the whole step (every micro-batch and process): each relation KL is a mean per
        row, as MiniLM's, whatever the number of target tokens."""
        source = torch.as_tensor(sum(int(b["attention_mask"].sum()) for b in batches), device=device)
        target = torch.as_tensor(sum(int(b["token_mask"].ne(0).sum()) for b in batches), device=device)
        rows = torch.stack([source, target]).float()
        if self.accelerator.num_processes > 1:
            rows = self.accelerator.gather(rows.reshape(1, 2)).sum(0)
        return {"source": rows[0].clamp_min(1), "target": rows[1].clamp_min(1)}

    def _with_student_samples(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        assert self.sampler is not None
        # Sharded parameters are gathered by the model's own hooks at each forward; every process must
        # then run as many forwards as the longest sample takes (`synced`), or the gathers deadlock.
        model = self.accelerator.unwrap_model(self.model)
        features = self.sampler.mix(model, batch["features"], self.state.global_step, synced=self.params_sharded)
        new = self.data_collator(features)
        # Joint-Teaching teaches the teacher's word-level view of the student's samples; cross-entropy
        # on them would be self-training, so "ce" sees only gold and teacher pseudo-targets.
        teacher_rows = torch.tensor([f.get("source") != "student" for f in features], dtype=new["target_mask"].dtype)
        new["ce_mask"] = new["target_mask"] * teacher_rows[:, None]
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in new.items()}

    def _with_on_policy(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        assert self.on_policy is not None
        features = self.on_policy.mix(self.accelerator.unwrap_model(self.model), batch["features"],
                                      self.state.global_step)
        batch = self.data_collator(features)
        new = batch | collate_on_policy(features, batch)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in new.items()}

    def _on_policy_parts(self, out: Any, student: LinearHead | None, inputs: dict[str, Any]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted on-policy loss, and the loss and k1 reverse KL alone (logged per step)."""
        assert self.on_policy is not None
        mask, n = inputs["op_mask"], self.on_policy_items
        estimator = self.on_policy.settings.estimator
        k1 = {"token_ids": inputs["target_ids"], "teacher_token_logprobs": inputs["op_token_logprob"]}
        topk = {"teacher_ids": inputs["op_ids"], "teacher_logprobs": inputs["op_logprobs"]}
        if student is not None:
            main = (on_policy_k1_term(*k1.values()) if estimator == "k1" else on_policy_topk_term(*topk.values()))
            total, parts = fused_head_loss(student, mask, n, terms={
                "on_policy": (self.objective["on_policy"], main),
                "reverse_kl": (0.0, on_policy_k1_term(*k1.values()))})
        else:
            loss = on_policy_loss(out.logits, mask, n, estimator=estimator, **k1, **topk)
            with torch.no_grad():
                rkl = on_policy_loss(out.logits.detach(), mask, n, estimator="k1", **k1)
            total, parts = self.objective["on_policy"] * loss, {"on_policy": loss.detach(), "reverse_kl": rkl}
        if self.model.training:
            self.on_policy.record(self.state.global_step, float(parts["on_policy"]), float(parts["reverse_kl"]))
        return total, parts

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        n = num_items_in_batch if num_items_in_batch is not None else inputs["target_mask"].ne(0).sum()
        model_inputs = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
        w = self.objective
        kd = self.kd
        mask = inputs["target_mask"]
        head = self._fusable_head(self.accelerator.unwrap_model(model)) if not return_outputs else None
        with (
            capture_qkv(model) if "attention" in w else contextlib.nullcontext({}) as s_states,
            head_inputs(head) as s_hidden,
        ):
            out = model(**self._student_inputs(model_inputs, inputs, model), use_cache=False)
        # with a fused head, every logits-based loss becomes a term of one fused pass over the student's head
        student = LinearHead(s_hidden[-1], head.weight, head.bias) if head is not None else None
        terms: dict[str, HeadTerm] = {}
        parts: dict[str, torch.Tensor] = {}
        spec = DivergenceSpec.from_config(kd)
        if "ce" in w:
            ce_mask, ce_n = self._ce_mask(inputs, num_items_in_batch)
            if student is not None:
                row_scale = None if ce_mask is mask else ce_mask.ne(0).float() * (n / ce_n)
                terms["ce"] = ce_term(inputs["target_ids"], row_scale)
            else:
                parts["ce"] = ce_loss(out.logits, inputs["target_ids"], ce_mask, ce_n)
        t_states: dict[tuple[str, str], torch.Tensor] = {}
        teacher_runs: list[tuple[str | None, bool]] = [(k, k == "noisy") for k in ("logits", "noisy") if k in w]
        if "attention" in w and not teacher_runs:
            teacher_runs = [(None, False)]  # a teacher forward for its Q/K/V states only
        for name, noisy in teacher_runs:
            if name == "logits" and "topk_ids" in inputs and "attention" not in w:
                topk = inputs["topk_ids"], inputs["topk_logprobs"]
                if student is not None:
                    terms[name] = sparse_kd_term(*topk, spec=spec, tail=kd.topk_tail)
                else:
                    parts[name] = sparse_kd_loss(out.logits, *topk, mask, n, spec=spec, tail=kd.topk_tail)
                continue
            teacher_out, states = self._teacher_forward(
                model_inputs, noisy=noisy, capture="attention" in w and not t_states, fused=student is not None
            )
            t_states = t_states or states
            if name is None:
                continue
            if student is not None:
                terms[name] = kd_term(teacher_out, spec=spec, vocab_size=self.vocab_size)
            else:
                parts[name] = kd_loss(out.logits, teacher_out, mask, n, spec=spec, vocab_size=self.vocab_size)
        attention = None
        if "attention" in w:
            attention = self._attention_loss(s_states, t_states, inputs, num_items_in_batch is not None)
        loss = sum(w[k] * v for k, v in parts.items())
        if terms:
            assert student is not None
            total, fused_parts = fused_head_loss(student, mask, n, terms={k: (w[k], t) for k, t in terms.items()})
            loss = loss + total
            parts.update(fused_parts)
        if "on_policy" in w:
            op_loss, op_parts = self._on_policy_parts(out, student, inputs)
            loss = loss + op_loss
            parts.update(op_parts)
        if attention is not None:
            loss = loss + w["attention"] * attention * self._attention_scale(attention, parts)
            parts["attention"] = attention
        self.last_parts = {k: float(v.detach()) for k, v in parts.items()}
        # DDP averages gradients over processes; the token count already spans all of them.
        loss = loss * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss

    def _student_inputs(self, model_inputs: dict[str, torch.Tensor], inputs: dict[str, Any],
                        model: nn.Module) -> dict[str, torch.Tensor]:
        """Noisy KD (paper): the student reads a noised input, the teacher the clean one. Only the input
        text (the prompt) is noised; the targets stay, since they are what is being scored."""
        rate = self.kd.noisy_input_rate
        if "noisy" not in self.objective or rate <= 0 or not model.training:
            return model_inputs
        prompt = inputs["attention_mask"].bool()
        if "decoder_input_ids" not in model_inputs:
            prompt = prompt & inputs["token_mask"].eq(0)
        tok = self.processing_class
        noised = noisy_input_ids(model_inputs["input_ids"], prompt, rate, len(tok), tok.all_special_ids)
        return {**model_inputs, "input_ids": noised}

    def _ce_mask(self, inputs: dict[str, Any], num_items: torch.Tensor | int | None
                 ) -> tuple[torch.Tensor, torch.Tensor | int]:
        """The positions cross-entropy trains on, and their count for the step (Joint-Teaching: not the
        student's own samples); without student samples, every target position."""
        mask = inputs["target_mask"]
        if "ce_mask" not in inputs:
            return mask, num_items if num_items is not None else mask.ne(0).sum()
        ce_mask = inputs["ce_mask"]
        count = self.ce_items if num_items is not None and self.ce_items is not None else ce_mask.ne(0).sum()
        return ce_mask, count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1)

    def _fusable_head(self, model: nn.Module) -> nn.Linear | None:
        # The fused loss reads the output layer's weight outside the forward, where a sharded one is
        # only this process's slice: sharded models compute the logits-based losses instead.
        if not self.fuse_head or self.params_sharded or not set(self.objective) & {"ce", "logits", "noisy", "on_policy"}:
            return None
        return plain_linear_head(model)

    def _teacher_forward(
        self, model_inputs: dict[str, torch.Tensor], *, noisy: bool, capture: bool, fused: bool = False
    ) -> tuple[torch.Tensor | LinearHead, dict[tuple[str, str], torch.Tensor]]:
        """The teacher's logits, or (`fused` and a plain head) its hidden states and head."""
        if self.teacher is None:
            raise UserError("this objective needs a teacher model (or cached teacher top-k for 'logits')")
        head = plain_linear_head(self.teacher) if fused else None
        self.teacher.train(noisy)
        try:
            with (
                torch.no_grad(),
                capture_qkv(self.teacher) if capture else contextlib.nullcontext({}) as states,
                head_inputs(head) as hidden,
            ):
                t_out = self.teacher(**model_inputs, use_cache=False)
        finally:
            self.teacher.eval()
        if head is not None:
            return LinearHead(hidden[-1], head.weight, head.bias), dict(states)
        return t_out.logits, dict(states)

    def _attention_loss(
        self,
        s_states: dict[tuple[str, str], torch.Tensor],
        t_states: dict[tuple[str, str], torch.Tensor],
        inputs: dict[str, Any],
        step_counts: bool,
    ) -> torch.Tensor:
        """The mean over every relation (stack x Q/K/V) of its KL, each a mean per relation row."""
        assert self.teacher is not None
        total = torch.zeros((), device=inputs["input_ids"].device)
        stacks = sorted({stack for stack, _ in t_states} & {stack for stack, _ in s_states})
        if not stacks:
            raise UserError("attention objective: teacher and student share no self-attention stack")
        encdec = "decoder_input_ids" in inputs
        source = (inputs["attention_mask"], inputs["attention_mask"], False, "source")
        target = (inputs["decoder_attention_mask"] if encdec else inputs["attention_mask"], inputs["token_mask"],
                  True, "target")
        rows = getattr(self, "relation_rows", None) if step_counts else None
        count = 0
        for stack in stacks:
            q_heads, kv_heads = relation_heads(self.teacher.config, stack)
            for kind in "qkv":
                heads = q_heads if kind == "q" else kv_heads
                # cross-attention: Q lives on the decoder's positions, K and V on the encoder's
                on_source = stack == "encoder" or (stack == "cross" and kind != "q")
                key_mask, row_mask, causal, side = source if on_source else target
                total = total + relation_kl_loss(
                    s_states[(stack, kind)], t_states[(stack, kind)], heads, key_mask, row_mask,
                    rows[side] if rows is not None else None, causal=causal,
                )
                count += 1
        return total / count

    def _attention_scale(self, attention: torch.Tensor, parts: dict[str, torch.Tensor]) -> float:
        """How much the attention term is multiplied by so that its weight is its share of the loss.

        Relation KLs and token KLs live on different scales (a 0.5/0.5 mix would otherwise be mostly
        one of them); as the authors normalise each loss's scale, the attention term is rescaled to the
        running size of the other terms (a mean over earlier steps, fixed within a step so that splitting
        a step into micro-batches changes nothing after the first step). 1 with `kd.attention_scale: raw`
        or when attention is the only objective.
        """
        others = [k for k in parts if k != "attention" and k in self.objective]
        if self.kd.attention_scale == "raw" or not others:
            return 1.0
        weight = sum(self.objective[k] for k in others)
        reference = sum(self.objective[k] * float(parts[k]) for k in others) / weight
        value = float(attention.detach())
        step = self.state.global_step
        if getattr(self, "_scale_step", None) != step:
            sums = getattr(self, "_scale_sums", None)
            if sums is not None and sums[1] > 0:  # the finished step joins the running sizes
                ema = getattr(self, "_scale_ema", None)
                self._scale_ema = sums if ema is None else (0.9 * ema[0] + 0.1 * sums[0], 0.9 * ema[1] + 0.1 * sums[1])
            ema = getattr(self, "_scale_ema", None)
            self._scale_factor = ema[0] / ema[1] if ema is not None and ema[1] > 0 else (
                reference / value if value > 0 else 1.0)
            self._scale_step, self._scale_sums = step, (0.0, 0.0)
        self._scale_sums = (self._scale_sums[0] + reference, self._scale_sums[1] + value)
        return self._scale_factor
