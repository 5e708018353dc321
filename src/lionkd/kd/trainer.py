"""The KD trainer: `transformers.Trainer` with distillation objectives, and `train_student`.

Objectives (weighted sum, e.g. {"logits": 0.5, "attention": 0.5}):
- "ce":        cross-entropy on the target tokens (plain fine-tuning)
- "logits":    word-level KD against the teacher (eval mode), divergence from `KDConfig`;
               uses cached teacher top-k when every example carries it (no teacher forward)
- "noisy":     the same with the teacher in train mode (dropout on) and the student's prompt tokens
               noised (`kd.noisy_input_rate`); a teacher without dropout is reported, not hidden
- "attention": MiniLM self-relation KD of Q, K and V of the last self-attention layer(s)

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
import json
import math
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..config import KDConfig, LoraConfig, TrainConfig
from ..errors import UserError
from ..llm.precision import DTYPES, training_precision
from .data import (
    Collator,
    EpochDataset,
    ExampleDataset,
    PromptTemplate,
    TrainExample,
    encode_example,
    is_encoder_decoder,
)
from .joint_teaching import JointTeaching, StudentSampler
from .launch import needs_launch, process_count, run_training_job, world_size
from .losses import (
    HeadTerm,
    LinearHead,
    ce_loss,
    ce_term,
    fused_head_loss,
    kd_loss,
    kd_term,
    relation_kl_loss,
    sparse_kd_loss,
    sparse_kd_term,
)

TrainSettings = TrainConfig  # the settings of one training run
OBJECTIVES = ("ce", "logits", "noisy", "attention")
MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
METRICS_FILE = "train_metrics.json"


# --------------------------------------------------------------------------- models


def load_model(spec: str | Path | PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
    if isinstance(spec, PreTrainedModel):
        return spec
    path = str(spec)
    if not Path(path).exists():
        from ..llm.models import model_not_found

        raise model_not_found(path)
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype) if dtype is not None else cls.from_pretrained(path)


def load_tokenizer(spec: str | Path | PreTrainedModel, tokenizer: Any = None) -> Any:
    if tokenizer is None:
        path = spec.name_or_path if isinstance(spec, PreTrainedModel) else str(spec)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"no tokenizer found for {path}: pass one") from exc
    if tokenizer.pad_token_id is None:
        # masks come from positions, so padding with EOS never hides a real EOS
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_vocab(student_tok: Any, teacher_tok: Any) -> None:
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise UserError(
            f"teacher and student tokenizers differ ({len(teacher_tok)} vs {len(student_tok)} tokens): "
            "logit KD needs one vocabulary; use sequence-level KD (objective 'ce' on teacher text)"
        )


def resolve_objective(objective: str | Mapping[str, float] | None, has_teacher: bool) -> dict[str, float]:
    if objective is None:
        objective = {"logits": 1.0} if has_teacher else {"ce": 1.0}
    if isinstance(objective, str):
        objective = {objective: 1.0}
    unknown = sorted(set(objective) - set(OBJECTIVES))
    if unknown:
        raise UserError(f"kd.objective: unknown objective '{unknown[0]}' (valid: {', '.join(OBJECTIVES)})")
    weights = {k: float(v) for k, v in objective.items() if v}
    if not weights:
        raise UserError("kd.objective: every weight is zero")
    return weights


# --------------------------------------------------------------------------- output layer

# Models whose logits are lm_head(input of lm_head) with nothing after it (no soft-capping, logit
# scale or final bias); T5 scales its decoder output before lm_head, which the captured input includes.
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "t5", "mt5", "phi3"})


def plain_linear_head(model: nn.Module) -> nn.Linear | None:
    """The output layer of `model` (or of the model a PEFT wrapper holds) when it is a plain linear head."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if type(head) is nn.Linear else None  # a LoRA-wrapped head is not plain


@contextlib.contextmanager
def head_inputs(head: nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """Record the hidden states `head` is called on and let it score no position at all.

    The forward still runs through the top-level module (so DDP and PEFT wrappers do their work);
    only the output layer's [batch, length, vocabulary] product is skipped.
    """
    seen: list[torch.Tensor] = []
    if head is None:
        yield seen
        return

    def skip(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        seen.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(skip)
    try:
        yield seen
    finally:
        handle.remove()


# --------------------------------------------------------------------------- attention relations

QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))


SELF_ATTENTION = ("self_attn", "SelfAttention")
CROSS_ATTENTION = ("encoder_attn", "EncDecAttention", "crossattention")


def last_self_attentions(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module, nn.Module]]:
    """The Q, K, V projections of the last attention layer of each stack: "encoder" and "decoder"
    self-attention, and the decoder's "cross" attention of encoder-decoder models."""
    found: dict[str, tuple[nn.Module, nn.Module, nn.Module]] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in SELF_ATTENTION + CROSS_ATTENTION:
            continue
        for names in QKV_NAMES:
            parts = [getattr(module, n, None) for n in names]
            if all(isinstance(p, nn.Module) for p in parts):
                stack = ("cross" if leaf in CROSS_ATTENTION else
                         "encoder" if "encoder" in name.split(".") else "decoder")
                found[stack] = tuple(parts)  # type: ignore[assignment]  # later layers overwrite
    return found


@contextlib.contextmanager
def capture_qkv(model: nn.Module) -> Iterator[dict[tuple[str, str], torch.Tensor]]:
    """Record the outputs of the last layer's Q, K, V projections during a forward pass."""
    states: dict[tuple[str, str], torch.Tensor] = {}
    layers = last_self_attentions(model)
    if not layers:
        raise UserError(f"attention objective: no q/k/v self-attention found in {type(model).__name__}")
    handles = []
    for stack, modules in layers.items():
        for kind, module in zip("qkv", modules, strict=True):

            def hook(_m: nn.Module, _i: Any, out: torch.Tensor, key: tuple[str, str] = (stack, kind)) -> None:
                states[key] = out

            handles.append(module.register_forward_hook(hook))
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def relation_heads(config: Any, stack: str) -> tuple[int, int]:
    """(heads for Q, heads for K and V) of the teacher: relation heads follow the teacher."""
    stack = "decoder" if stack == "cross" else stack
    q = (
        getattr(config, f"{stack}_attention_heads", None)
        or getattr(config, "num_attention_heads", None)
        or config.num_heads
    )
    return q, getattr(config, "num_key_value_heads", None) or q


# --------------------------------------------------------------------------- noisy KD

DROPOUT_SETTINGS = ("dropout", "attention_dropout", "hidden_dropout", "dropout_rate", "attention_probs_dropout_prob",
                    "hidden_dropout_prob", "activation_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def has_dropout(model: nn.Module) -> bool:
    """Does `model` drop anything in train mode? (Llama-family configs set every dropout to 0.)"""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return any(isinstance(getattr(config, k, None), float) and getattr(config, k) > 0 for k in DROPOUT_SETTINGS)


def noisy_input_ids(input_ids: torch.Tensor, where: torch.Tensor, rate: float, vocab: int,
                    special_ids: Sequence[int]) -> torch.Tensor:
    """`input_ids` with each position of `where` replaced, with probability `rate`, by a random ordinary
    token (the noisy student input of Noisy KD; special tokens such as a chat template's stay)."""
    special = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=input_ids.device)
    hit = where.bool() & (torch.rand(input_ids.shape, device=input_ids.device) < rate) & ~torch.isin(input_ids, special)
    random_ids = torch.randint(0, vocab, input_ids.shape, device=input_ids.device)
    bad = torch.isin(random_ids, special)
    return torch.where(hit & ~bad, random_ids, input_ids)


# --------------------------------------------------------------------------- trainer


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
        fuse_head: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
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
        kd_options = {"divergence": kd.divergence, "temperature": kd.temperature, "beta": kd.jsd_beta,
                      "alpha": kd.skew_alpha}
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
                    terms[name] = sparse_kd_term(*topk, **kd_options, tail=kd.topk_tail)
                else:
                    parts[name] = sparse_kd_loss(out.logits, *topk, mask, n, **kd_options, tail=kd.topk_tail)
                continue
            teacher_out, states = self._teacher_forward(
                model_inputs, noisy=noisy, capture="attention" in w and not t_states, fused=student is not None
            )
            t_states = t_states or states
            if name is None:
                continue
            if student is not None:
                terms[name] = kd_term(teacher_out, **kd_options, vocab_size=self.vocab_size)
            else:
                parts[name] = kd_loss(out.logits, teacher_out, mask, n, **kd_options, vocab_size=self.vocab_size)
        attention = None
        if "attention" in w:
            attention = self._attention_loss(s_states, t_states, inputs, num_items_in_batch is not None)
        loss = sum(w[k] * v for k, v in parts.items())
        if terms:
            assert student is not None
            total, fused_parts = fused_head_loss(student, mask, n, terms={k: (w[k], t) for k, t in terms.items()})
            loss = loss + total
            parts.update(fused_parts)
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
        if not self.fuse_head or self.params_sharded or not set(self.objective) & {"ce", "logits", "noisy"}:
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
        others = [k for k in parts if k != "attention"]
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


# --------------------------------------------------------------------------- the public entry point


def _apply_lora(model: PreTrainedModel, lora: LoraConfig) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    task = TaskType.SEQ_2_SEQ_LM if is_encoder_decoder(model) else TaskType.CAUSAL_LM
    config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type=task
    )
    return get_peft_model(model, config)


def _encode_all(
    examples: Sequence[TrainExample] | Sequence[Sequence[TrainExample]],
    tokenizer: Any,
    template: PromptTemplate,
    max_length: int,
    encoder_decoder: bool,
) -> torch.utils.data.Dataset:
    if not examples:
        raise UserError("no training examples")

    def encode(batch: Sequence[TrainExample]) -> list[dict[str, Any]]:
        return [
            encode_example(tokenizer, e, template=template, max_length=max_length, encoder_decoder=encoder_decoder)
            for e in batch
        ]

    if isinstance(examples[0], TrainExample):
        return ExampleDataset(encode(examples))  # type: ignore[arg-type]
    return EpochDataset([encode(epoch) for epoch in examples])  # type: ignore[arg-type]


def per_device_batch(settings: TrainConfig) -> int:
    """Examples per micro-batch on one process: `batch_size` is the global batch of one optimiser step."""
    split = world_size() * settings.grad_accum
    if settings.batch_size % split:
        raise UserError(f"student.train.batch_size: {settings.batch_size} is not divisible by processes x grad_accum "
                        f"= {world_size()} x {settings.grad_accum}")
    return settings.batch_size // split


class EpochSwitch(TrainerCallback):
    """Tells an `EpochDataset` which epoch begins, on every process.

    The Trainer's own `set_epoch` reaches the dataset only on one process: under a distributed
    sampler Accelerate's `DataLoaderShard.set_epoch` stops at the sampler, so every rank would read
    pseudo-target 0 in every epoch.
    """

    def __init__(self, dataset: EpochDataset) -> None:
        self.dataset = dataset
        self.read: list[list[int]] = []  # per epoch trained by this process, the lists it read

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.read.append(sorted(self.dataset.read))


def build_trainer(
    student: str | Path | PreTrainedModel,
    examples: Sequence[TrainExample] | Sequence[Sequence[TrainExample]],
    out_dir: str | Path,
    *,
    settings: TrainConfig | None = None,
    teacher: str | Path | PreTrainedModel | None = None,
    objective: str | Mapping[str, float] | None = None,
    kd: KDConfig | None = None,
    template: PromptTemplate = "chat",
    lora: LoraConfig | None = None,
    joint: JointTeaching | None = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> KDTrainer:
    """A ready `KDTrainer` (see `train_student` for the arguments); checkpoints go to out_dir/checkpoints."""
    settings = settings or TrainConfig()
    kd = kd or KDConfig()
    if objective is None and teacher is not None:
        objective = kd.objective
    weights = resolve_objective(objective, teacher is not None)

    model = load_model(student)
    # Saved as its base was stored (unless configured), trained on fp32 master weights whatever that is.
    stored = model.dtype if settings.save_dtype == "auto" else DTYPES[settings.save_dtype]
    model.float()
    precision = training_precision(settings.precision)
    tok = load_tokenizer(student, tokenizer)
    encdec = is_encoder_decoder(model)
    teacher_model = None
    if teacher is not None and set(weights) - {"ce"}:
        teacher_model = load_model(teacher)
        if not isinstance(teacher, PreTrainedModel):
            check_same_vocab(tok, load_tokenizer(teacher))
        if is_encoder_decoder(teacher_model) != encdec:
            raise UserError("teacher and student must both be decoder-only or both encoder-decoder")
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora is not None:
        model = _apply_lora(model, lora)

    per_device = per_device_batch(settings)
    dataset = _encode_all(examples, tok, template, settings.max_length, encdec)
    collator = Collator(
        pad_token_id=tok.pad_token_id,
        encoder_decoder=encdec,
        decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
    )
    args = TrainingArguments(
        output_dir=str(Path(out_dir) / "checkpoints"),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=settings.grad_accum,
        weight_decay=settings.weight_decay,
        seed=settings.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=settings.logging_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=1,
        report_to=list(settings.report_to) or "none",
        run_name=run_name(out_dir),
        remove_unused_columns=False,
        disable_tqdm=True,  # progress is drawn by TrainingProgress, in the style of every other stage
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    sampler = (
        StudentSampler(joint, tok, settings.max_length, encdec) if joint is not None and joint.alpha > 0 else None
    )
    trainer = KDTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tok,
        teacher=teacher_model,
        objective=weights,
        kd=kd,
        vocab_size=len(tok),
        sampler=sampler,
    )
    trainer.save_dtype = stored
    if lora is not None and trainer.params_sharded:  # the adapters could not be merged into a sharded model
        raise UserError("student.lora: LoRA under ZeRO-3 or FSDP is not supported; use DDP "
                        "(examples/accelerate/ddp.yaml) or ZeRO-2, or full fine-tuning")
    if isinstance(dataset, EpochDataset):
        trainer.epoch_switch = EpochSwitch(dataset)
        trainer.add_callback(trainer.epoch_switch)
    for callback in trainer.callback_handler.callbacks:  # its default folder is under checkpoints/, deleted at the end
        if type(callback).__name__ == "TensorBoardCallback" and getattr(callback, "logging_dir", "") is None:
            callback.logging_dir = str(Path(out_dir) / "tensorboard")
    for quiet in (PrinterCallback, ProgressCallback):  # they print raw dicts and tqdm bars
        trainer.remove_callback(quiet)
    if progress:
        trainer.add_callback(TrainingProgress())
    return trainer


def run_name(out_dir: str | Path) -> str:
    """What trackers (tensorboard, wandb, ...) call one training: run folder, iteration and stage.

    Read from the folder the pipelines train into: RUN/students/iter-K (Lion imitation) or
    RUN/teacher, RUN/student-kd, RUN/student (the distill stages, iteration 0 in the run store).
    """
    out = Path(out_dir).absolute()
    if out.name.startswith("iter-") and out.name[5:].isdigit():
        return f"{out.parent.parent.name}/iteration-{out.name[5:]}/imitation"
    stage = {"teacher": "teacher_finetune", "student-kd": "kd_train", "student": "final_ce"}.get(out.name, out.name)
    return f"{out.parent.name}/iteration-0/{stage}"


class TrainingProgress(TrainerCallback):
    """Optimiser steps as one rich progress bar, with the latest logged loss."""

    def __init__(self) -> None:
        self.bar: Progress | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.bar.start()
        self.task = self.bar.add_task("training", total=state.max_steps, completed=state.global_step, loss="")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.update(self.task, loss=f"loss {logs['loss']:.3f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def train_student(
    student: str | Path | PreTrainedModel,
    examples: Sequence[TrainExample] | Sequence[Sequence[TrainExample]],
    out_dir: str | Path,
    *,
    settings: TrainConfig | None = None,
    teacher: str | Path | PreTrainedModel | None = None,
    objective: str | Mapping[str, float] | None = None,
    kd: KDConfig | None = None,
    template: PromptTemplate = "chat",
    lora: LoraConfig | None = None,
    joint: JointTeaching | None = None,
    tokenizer: Any = None,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `student` on `examples`, save it (model + tokenizer) to `out_dir`, return metrics.

    `examples` is one list (the same every epoch) or a list of equally long lists (epoch e trains on
    list e mod n: the pseudo-target schedule). `objective` defaults to `kd.objective` with a teacher
    and to "ce" without. `tokenizer` is needed only when `student` is a model object without a
    saved tokenizer. With `resume`, a finished `out_dir` is returned as is and an interrupted run
    continues from its last checkpoint. LoRA adapters are merged into the saved model.
    Metrics: loss (mean training loss), steps, epochs, target_tokens, tokens_per_s (input tokens,
    prompt included, per second of training), runtime_s, objective, last_losses (per objective), and
    with several pseudo-targets, pseudo_targets_read (per process, per epoch: the lists it trained on).
    """
    out_dir = Path(out_dir)
    done = out_dir / METRICS_FILE
    if resume and done.exists():
        return json.loads(done.read_text())
    settings = settings or TrainConfig()
    if needs_launch(settings.processes, settings.accelerate_config):
        run_training_job(out_dir, process_count(settings.processes), settings.accelerate_config, student=student,
                         examples=examples, settings=settings, teacher=teacher, objective=objective, kd=kd,
                         template=template, lora=lora, joint=joint, tokenizer=tokenizer, resume=resume,
                         progress=progress)
        return json.loads(done.read_text())
    trainer = build_trainer(
        student, examples, out_dir, settings=settings, teacher=teacher, objective=objective, kd=kd,
        template=template, lora=lora, joint=joint, tokenizer=tokenizer, progress=progress,
    )
    ckpt_dir = Path(trainer.args.output_dir)
    last = get_last_checkpoint(str(ckpt_dir)) if resume and ckpt_dir.is_dir() else None
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    elapsed = time.perf_counter() - start
    if "wandb" in trainer.args.report_to:  # else the next training of this process logs into this run
        import wandb

        wandb.finish()

    final = trainer.accelerator.unwrap_model(trainer.model)
    if lora is not None and not trainer.params_sharded:
        final = final.merge_and_unload()
    processes = trainer.accelerator.num_processes
    metrics: dict[str, Any] = {
        "loss": float(result.training_loss),
        "steps": int(trainer.state.global_step),
        "epochs": float(trainer.state.epoch or 0.0),
        "target_tokens": trainer.target_tokens * processes,
        "tokens_per_s": trainer.input_tokens * processes / max(elapsed, 1e-9),
        "runtime_s": elapsed,
        "objective": trainer.objective,
        "last_losses": trainer.last_parts,
        "final_logged_loss": _last_logged_loss(trainer),
        # the loss curve the report draws: the checkpoints holding the Trainer's log are removed below
        "loss_history": [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e and "step" in e],
    }
    if trainer.noisy_teacher_dropout is not None:
        metrics["noisy_teacher_dropout"] = trainer.noisy_teacher_dropout
    if trainer.epoch_switch is not None:  # per process, per epoch (since a resume): the pseudo-target lists read
        metrics["pseudo_targets_read"] = gather_object([trainer.epoch_switch.read])
    if trainer.sampler is not None:
        metrics["student_samples"] = {"replaced": trainer.sampler.replaced, "generated": trainer.sampler.generated}
    if trainer.params_sharded:  # every process takes part: the shards are gathered into one checkpoint
        trainer.save_model(str(out_dir))
    if trainer.is_world_process_zero():
        if not trainer.params_sharded:
            final.to(trainer.save_dtype).save_pretrained(out_dir)
        trainer.processing_class.save_pretrained(out_dir)
        done.write_text(json.dumps(metrics, indent=2))
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()  # no rank returns before the saved student is whole
    return metrics


def _last_logged_loss(trainer: Trainer) -> float | None:
    for entry in reversed(trainer.state.log_history):
        if "loss" in entry and math.isfinite(entry["loss"]):
            return float(entry["loss"])
    return None
