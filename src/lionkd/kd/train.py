"""Training a student: `train_student(job)` (train, save, return metrics; resumable, launched on several
processes when configured) and `build_trainer(job)` (a ready `KDTrainer`), the KD engine's entry points."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from ..config import LoraConfig, TrainConfig
from ..errors import UserError
from ..llm.precision import DTYPES, training_precision
from .callbacks import EpochSwitch, StopOnNonFinite, TrainingProgress
from .examples import (
    Collator,
    EpochDataset,
    ExampleDataset,
    PromptTemplate,
    TrainExample,
    encode_example,
    is_encoder_decoder,
)
from .job import TrainJob
from .joint_teaching import StudentSampler
from .launch import needs_launch, process_count, run_training_job, world_size
from .loading import check_same_vocab, load_model, load_tokenizer
from .on_policy import check_student_samples, student_sampler
from .on_policy_vllm import check_sampler
from .trainer import KDTrainer

METRICS_FILE = "train_metrics.json"


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



def build_trainer(job: TrainJob) -> KDTrainer:
    """A ready `KDTrainer` for `job`; checkpoints go to out_dir/checkpoints."""
    settings, student, teacher, lora, joint = job.settings, job.student, job.teacher, job.lora, job.joint
    weights = job.objective_weights()
    on_policy = job.on_policy
    if ("on_policy" in weights) != (on_policy is not None):
        raise UserError("kd.objective: 'on_policy' needs a served teacher that scores the student's samples"
                        if on_policy is None else "kd.objective: on-policy settings given without 'on_policy'")

    if on_policy is not None:
        check_sampler(on_policy.settings, lora)
    model = load_model(student)
    # Saved as its base was stored (unless configured), trained on fp32 master weights whatever that is.
    stored = model.dtype if settings.save_dtype == "auto" else DTYPES[settings.save_dtype]
    model.float()
    precision = training_precision(settings.precision)
    tok = load_tokenizer(student, job.tokenizer)
    encdec = is_encoder_decoder(model)
    if on_policy is not None:
        check_student_samples(model, tok)
    teacher_model = None
    if teacher is not None and set(weights) - {"ce", "on_policy"}:
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
    dataset = _encode_all(job.examples, tok, job.template, settings.max_length, encdec)
    collator = Collator(
        pad_token_id=tok.pad_token_id,
        encoder_decoder=encdec,
        decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
    )
    args = settings.training_arguments(job.out_dir / "checkpoints", per_device_batch=per_device,
                                       precision=precision, run_name=run_name(job.out_dir))
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
        kd=job.kd,
        vocab_size=len(tok),
        sampler=sampler,
        on_policy=on_policy.teacher(tok, settings.max_length, job.template,
                                    student_sampler(on_policy.settings, model, tok, student))
        if on_policy is not None else None,
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
            callback.logging_dir = str(job.out_dir / "tensorboard")
    for quiet in (PrinterCallback, ProgressCallback):  # they print raw dicts and tqdm bars
        trainer.remove_callback(quiet)
    if job.progress:
        trainer.add_callback(TrainingProgress())
    trainer.non_finite = StopOnNonFinite()
    trainer.add_callback(trainer.non_finite)
    for callback in job.callbacks:
        trainer.add_callback(callback)
    return trainer


class NonFiniteTraining(UserError):
    """A training produced a loss or weights that are not finite; nothing was saved."""


def _non_finite_step(trainer: KDTrainer, training_loss: float, model: Any) -> int | None:
    """The step at which training went non-finite (loss or weights), or None when it did not."""
    if trainer.non_finite.step is not None:
        return trainer.non_finite.step
    finite = math.isfinite(training_loss) and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return None if finite else int(trainer.state.global_step)


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



def train_student(job: TrainJob) -> dict[str, Any]:
    """Run `job` (see `TrainJob`): train, save the student to its `out_dir`, return metrics.

    Metrics: loss (mean training loss), steps, epochs, target_tokens, tokens_per_s (input tokens,
    prompt included, per second of training), runtime_s, objective, last_losses (per objective), and
    with several pseudo-targets, pseudo_targets_read (per process, per epoch: the lists it trained on).
    """
    out_dir = Path(job.out_dir)
    done = out_dir / METRICS_FILE
    if job.resume and done.exists():
        return json.loads(done.read_text())
    settings = job.settings
    if needs_launch(settings.processes, settings.accelerate_config):
        if job.on_policy is not None:  # the teacher is called, and the store written, by this process alone
            raise UserError("student.train.processes: the 'on_policy' objective trains in one process; set 1")
        if job.callbacks:
            raise UserError("student.train.processes: a training with its own callbacks runs in one process; set 1")
        run_training_job(job, process_count(settings.processes), settings.accelerate_config)
        return json.loads(done.read_text())
    trainer = build_trainer(job)
    if job.on_policy is not None:
        job.on_policy.scorer.check()  # the first call: a server that cannot score prompts stops before training
    ckpt_dir = Path(trainer.args.output_dir)
    last = get_last_checkpoint(str(ckpt_dir)) if job.resume and ckpt_dir.is_dir() else None
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    elapsed = time.perf_counter() - start
    if "wandb" in trainer.args.report_to:  # else the next training of this process logs into this run
        import wandb

        wandb.finish()

    final = trainer.accelerator.unwrap_model(trainer.model)
    bad_step = _non_finite_step(trainer, float(result.training_loss), final)
    if bad_step is not None:
        if trainer.is_world_process_zero():  # a rerun must not resume from a NaN checkpoint
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        raise NonFiniteTraining(
            f"training {run_name(job.out_dir)}: the loss or the weights became NaN or infinite by step {bad_step}; "
            f"the student was not saved (lower the learning rate or weight decay, or use precision: fp32)")
    if job.lora is not None and not trainer.params_sharded:
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
    if trainer.on_policy is not None:
        metrics["on_policy"] = trainer.on_policy.stats.as_dict() | {"scoring": dict(trainer.on_policy.scorer.stats),
                                                                    "sampler": trainer.on_policy.settings.sampler}
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
