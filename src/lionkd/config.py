"""The validated configuration of a run: pydantic v2 models loaded from YAML, strict.

Every option has a default that works, so a short file is enough. Unknown keys are errors that name
the key, where it is, and the closest valid key. Secrets never live here: an endpoint names the
environment variable that holds its key (`api_key_env`).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data import read_utf8
from .errors import UserError


class Strict(BaseModel):
    # No option means anything at infinity or NaN: `learning_rate: .inf` would train a NaN student.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# The transformers schedules that need no options beyond the warm-up (a test keeps them transformers' own).
LRScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                      "inverse_sqrt"]
# The objectives a KD training can weigh (`kd.objective`); the trainer implements exactly these.
KD_OBJECTIVES = ("ce", "logits", "noisy", "attention", "on_policy")
# An environment variable's name; a pasted key (`sk-...`, with dashes, or far longer) is not one.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


# --------------------------------------------------------------------------- model endpoints


class Price(Strict):
    """US dollars per 1M tokens."""

    input: float = Field(0.0, ge=0)
    output: float = Field(0.0, ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


class BudgetConfig(Strict):
    """The most a run, or one role, may spend on model calls (null: no limit). A call that could pass a
    limit is never started: the run stops with exit code 3, and a rerun with a larger budget goes on."""

    max_calls: int | None = Field(
        None, ge=0, description="calls sent to teacher, referee and generator: one per answer (a request for n "
        "samples counts n), a call that failed counts too")
    max_cost: float | None = Field(None, ge=0, allow_inf_nan=False, description="US dollars, at the roles' prices")


class SandboxOptions(Strict):
    """Knobs of the offline task world when it plays a role (`backend: sandbox`)."""

    error_rate: float = Field(0.0, ge=0, le=1)
    position_bias: float = 0.0
    malformed_rate: float = Field(0.0, ge=0, le=1)


class VLLMOptions(Strict):
    """Engine settings of a vLLM backend (`backend: vllm`)."""

    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)

    def engine_args(self) -> dict[str, Any]:
        args = self.model_dump()
        return {k: v for k, v in args.items() if v is not None}


class EndpointConfig(Strict):
    """A model reached through one backend. A role is an endpoint plus a prompt."""

    backend: Literal["openai", "hf", "vllm", "sandbox"] = "openai"
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(1024, ge=1)
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20, description="top_logprobs to ask for (API-teacher KD)")
    scoring: Literal["auto", "vllm", "sglang", "echo"] = Field(
        "auto", description="on-policy KD: how the server scores a student's sample: vllm (prompt_logprobs), "
        "sglang (its native /generate), echo (echo + logprobs: legacy completions APIs) or auto (tried in turn)")
    tokenizer: str | None = Field(
        None, description="on-policy KD: a local copy of the served model's tokenizer, whose chat template "
        "writes the prompts it scores (null: the student's)")
    concurrency: int = Field(16, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    max_retries: int = Field(6, ge=0)
    timeout_s: float = Field(120.0, gt=0)
    price: Price | None = None
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="this role's own limits, within the run's")
    # local backends (hf, vllm)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | map (spread over the visible GPUs)")
    batch_size: int = Field(16, ge=1)
    batch_tokens: int | None = Field(None, ge=1, description="hf: also cap a batch at this many padded tokens")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)
    sandbox: SandboxOptions = Field(default_factory=SandboxOptions)

    @field_validator("api_key_env")
    @classmethod
    def _names_a_variable(cls, value: str | None) -> str | None:
        # The message never repeats the value: it may be the key itself.
        if value is not None and (not _ENV_NAME.fullmatch(value) or value.lower().startswith(("sk_", "sk-"))):
            raise ValueError("must name an environment variable that holds the key (e.g. OPENAI_API_KEY), "
                             "not the key itself; put the key in that variable")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL like http://127.0.0.1:8000/v1, got {value!r}")
        try:
            parts.port  # noqa: B018 - raises for a port outside 0-65535
        except ValueError:
            raise ValueError(f"the port of {value!r} is not a port number (1-65535)") from None
        if parts.port == 0:
            raise ValueError(f"the port of {value!r} is not a port number (1-65535)")
        return value

    def api_key(self) -> str | None:
        """The key, read from the environment at the moment of use; never stored.

        A variable that is set but empty (`export KEY=`) is a mistake, not "no key": it is refused here
        rather than sent as an anonymous request that fails later and less clearly.
        """
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if key is not None and not key.strip():
            raise UserError(f"api_key_env: the environment variable ${self.api_key_env} is set but empty")
        return key


def _endpoint(**defaults: Any) -> Any:
    return Field(default_factory=lambda: EndpointConfig(**defaults))


# --------------------------------------------------------------------------- student and training


class LoraConfig(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainConfig(Strict):
    """One training run of the student (the Lion imitation stage, or KD training)."""

    epochs: float = Field(3.0, gt=0, le=10_000)
    max_steps: int = Field(-1, le=100_000_000, description="overrides epochs when > 0")
    learning_rate: float = Field(2e-5, gt=0, le=1.0)
    lr_scheduler: LRScheduler = Field("cosine", description="transformers' learning-rate schedule")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    batch_size: int = Field(8, ge=1, description="examples per optimiser step, over all processes and micro-batches")
    grad_accum: int = Field(1, ge=1, description="micro-batches per process in one optimiser step")
    processes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="training processes: auto = the visible GPUs (1 on CPU); > 1 runs the stage as a "
        "child job under torchrun, or under accelerate launch with accelerate_config")
    accelerate_config: Path | None = Field(
        None, description="an Accelerate config file (DDP, DeepSpeed ZeRO, FSDP2) the training stage is launched with")
    max_length: int = Field(1024, ge=8)
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast over fp32 master weights; auto (decided once per run): bf16 on GPUs "
        "with it (else fp16), bf16 on CPUs with AMX, else fp32")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the saved student; auto: the dtype its base was stored in")
    gradient_checkpointing: bool = False
    replay_fraction: float = Field(0.0, ge=0, le=1, description="share of earlier training data replayed")
    seed: int = 0
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1, description="checkpoint every N optimiser steps (resume after a crash)")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "neptune", "dvclive",
                            "trackio", "swanlab"]] = Field(
        default_factory=list, description="trackers that also get the training logs (each run named for its "
        "iteration and stage); tensorboard writes into each trained model's folder, under tensorboard/")

    def training_arguments(self, output_dir: Path, *, per_device_batch: int, precision: str, run_name: str) -> Any:
        """These settings as `transformers.TrainingArguments` of one training: `per_device_batch` examples per
        micro-batch on each process, autocast `precision` ("bf16", "fp16", "fp32"), checkpoints in
        `output_dir`, and the trackers' `run_name`."""
        import torch
        from transformers import TrainingArguments

        return TrainingArguments(
            output_dir=str(output_dir),
            num_train_epochs=self.epochs,
            max_steps=self.max_steps,
            learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler,
            warmup_steps=self.warmup_ratio,
            per_device_train_batch_size=per_device_batch,
            gradient_accumulation_steps=self.grad_accum,
            weight_decay=self.weight_decay,
            seed=self.seed,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            logging_steps=self.logging_steps,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=1,
            report_to=list(self.report_to) or "none",
            run_name=run_name,
            remove_unused_columns=False,
            disable_tqdm=True,  # the KD trainer draws its own progress, in the style of every other stage
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            logging_nan_inf_filter=False,  # a NaN loss must show, not be replaced by the running mean
        )

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value: list[str]) -> list[str]:
        # found here, as one line naming the key, rather than as a traceback once training starts
        import importlib.util

        package = {"tensorboard": "tensorboard", "comet_ml": "comet_ml", "dvclive": "dvclive"}
        for name in value:
            if importlib.util.find_spec(package.get(name, name)) is None:
                raise ValueError(f"{name} is not installed (pip install {name.replace('_', '-')})")
        return value


class AnsweringConfig(Strict):
    """`student.generation`: how the student answers the Cache Pool (its decoding settings and backend)."""

    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int | None = Field(
        None, ge=1, description="null: the teacher's max_tokens, so that the student is not judged on answers "
        "cut shorter than the teacher's")
    batch_size: int = Field(16, ge=1)
    batch_tokens: int | None = Field(None, ge=1, description="hf: also cap a batch at this many padded tokens")
    device: str = Field("auto", description="hf: auto | cpu | cuda | cuda:N | map (spread over the visible GPUs)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights while generating; auto: fp32 on CPU, bf16 (or fp16) on a GPU")
    backend: Literal["hf", "vllm", "server"] = Field(
        "hf", description="how the student answers the Cache Pool: transformers in process, vLLM in process "
        "(shut down before training), or a server started for the stage with server_command")
    server_command: str = Field(
        "{python} -m lionkd serve {model} --name {model} --port {port}",
        description="backend server: a command serving {model} (the checkpoint folder) under that name at "
        "{port} over an OpenAI-compatible API, e.g. 'vllm serve {model} --port {port} --tensor-parallel-size 8'")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)


class StudentConfig(Strict):
    model: str = "sandbox:base-student"
    template: Literal["chat", "alpaca"] = "chat"
    system_prompt: str | None = Field(
        None, description="system message of every student prompt, in training and generation (null: none; "
        "a chat template may then insert its own default, as SmolLM2's does)")
    lora: LoraConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: AnsweringConfig = Field(default_factory=AnsweringConfig)


# --------------------------------------------------------------------------- Lion


class PromptOverrides(Strict):
    """Replace any of the built-in prompts (see `lionkd.lion.prompts`)."""

    teacher_system: str | None = None
    referee: str | None = None
    generator_hard: str | None = None
    generator_easy: str | None = None


class LionConfig(Strict):
    seed_pool: Path | None = None
    seed_pool_size: int = Field(1000, ge=2, le=10_000_000,
                                description="instructions drawn from the sandbox world when seed_pool is null")
    iterations: int = Field(3, ge=1, le=1000)
    new_per_iteration: int = Field(6000, ge=1, le=10_000_000)
    hard_easy_ratio: str = Field(
        "1:1", description="'hard:easy' seeds per iteration (the paper's 1:1), or 'adaptive': a bandit over "
        "(group, prompt) moves the split and the seeds toward where the last iteration's new data closed the most gap")
    # The referee scores 0-10, so a gap is at most 10: a larger tau makes nothing hard, tau <= 0 makes a
    # tie hard, and NaN compares false with everything.
    tau: float = Field(1.0, gt=0, le=10, allow_inf_nan=False,
                       description="hard when teacher score - student score >= tau (scores 0-10)")
    rouge_l_max: float = Field(0.7, gt=0, le=1)
    novelty_tokenizer: Literal["rouge", "unicode"] = "rouge"
    seed_weighting: Literal["uniform", "learnable", "progress"] = Field(
        "uniform", description="how seeds are drawn within the hard and the easy set: uniform (the paper); learnable "
        "(groups the student has partly learned, acc x (1 - acc)); progress (hard seeds in proportion to how much "
        "the referee's gap on their group shrank since the last iteration: the learnable hard band)")
    novelty_scope: Literal["pool", "group"] = Field(
        "pool", description="pool: ROUGE-L <= rouge_l_max against every known instruction (the paper); group: the "
        "threshold of a new instruction's group is how close its own members are to each other (their median "
        "nearest-neighbour ROUGE-L), at least rouge_l_max and at most near_copy_rouge_l")
    near_copy_rouge_l: float = Field(0.9, gt=0, le=1, allow_inf_nan=False,
                                     description="novelty_scope group: closer than this is a near-copy, always rejected")
    grouping: Literal["auto", "task", "text"] = Field(
        "auto", description="what a group of instructions is, for the options above: task (the seeds' task labels; "
        "a generated instruction joins the closest label by its words), text (clusters of the instructions' "
        "words: real data has no labels), auto (task when every seed has a label, else text)")
    clusters: int = Field(0, ge=0, le=10000, description="grouping text: number of clusters (0: sqrt of the Cache Pool)")
    selection: Literal["referee", "uniform"] = Field(
        "referee", description="how generation seeds are chosen: referee (Lion: teacher and student answer the "
        "Cache Pool, the referee splits it into hard and easy) or uniform (self-instruct, as Alpaca: no "
        "discrimination, seeds drawn uniformly from the whole Cache Pool for both generator prompts)")
    referee_retries: int = Field(2, ge=0, le=100)
    referee_order: Literal["explanation_first", "scores_first"] = Field(
        "explanation_first", description="what the referee writes first: its explanation (the paper's order), "
        "then the two score lines; or the score lines first")
    generation_rounds: int = Field(4, ge=1, le=1000, description="rounds of generation to fill N after filters")
    min_instruction_words: int = Field(4, ge=1)
    # Floors below which a role is not doing its job: the run stops in one line (0 disables a check).
    min_readable_verdicts: float = Field(
        0.5, ge=0, le=1, description="the share of referee verdicts that must be readable, checked after the "
        "first batch of a discrimination stage and at its end; below it the run stops (0: never; the report warns)")
    min_kept_generations: float = Field(
        0.1, ge=0, le=1, description="the share of generator replies that must pass the filters, checked after "
        "the first round and at the end of a generation stage; below it the run stops (0: never)")
    min_teacher_answers: float = Field(
        0.5, ge=0, le=1, description="the share of teacher answers that must be non-empty; below it the run "
        "stops (0: never; empty answers are left out of training either way)")
    prompts: PromptOverrides = Field(default_factory=PromptOverrides)
    imitation: Literal["sft", "on_policy"] = Field(
        "sft", description="sft: the student learns the teacher's answers (the paper); on_policy: it also "
        "samples its own answers to the Train Pool and the served teacher scores them (kd.on_policy)")

    @field_validator("hard_easy_ratio")
    @classmethod
    def _ratio(cls, v: str) -> str:
        if v == "adaptive":
            return v
        parts = v.split(":")
        try:
            hard, easy = (float(p) for p in parts)
        except ValueError:
            raise ValueError("must look like 'hard:easy', e.g. '1:1', or be 'adaptive'") from None
        if not (math.isfinite(hard) and math.isfinite(easy)):
            raise ValueError(f"both sides must be finite numbers, got {v!r}")
        if hard < 0 or easy < 0 or hard + easy == 0:
            raise ValueError("both sides must be >= 0 and not both 0")
        return v

    @model_validator(mode="after")
    def _near_copy_above_threshold(self) -> LionConfig:
        if self.near_copy_rouge_l < self.rouge_l_max:
            raise ValueError(f"near_copy_rouge_l ({self.near_copy_rouge_l:g}) must be at least rouge_l_max "
                             f"({self.rouge_l_max:g})")
        return self

    @property
    def hard_fraction(self) -> float:
        """The configured share of hard seeds ('adaptive' starts at 1:1)."""
        if self.hard_easy_ratio == "adaptive":
            return 0.5
        hard, easy = (float(p) for p in self.hard_easy_ratio.split(":"))
        return hard / (hard + easy)


# --------------------------------------------------------------------------- task-specific KD


class DataConfig(Strict):
    """A table of examples: a local JSON/JSONL/CSV/Parquet file or a Hugging Face dataset name."""

    path: str | None = None
    split: str = "train"
    input_column: str = "input"
    target_column: str = "target"
    limit: int | None = Field(None, ge=1, description="use only the first N rows")


class OnPolicyConfig(Strict):
    """On-policy KD (objective 'on_policy'): the student samples, the served teacher scores every token."""

    lmbda: float = Field(1.0, ge=0, le=1, description="share of each batch's examples whose target is the "
                         "student's own sample (as GKD's lmbda); the rest keep their off-policy target")
    estimator: Literal["k1", "topk"] = Field(
        "topk", description="reverse KL on the sampled token (k1) or on the teacher's top-k with a tail bucket")
    top_k: int = Field(5, ge=1, le=20, description="alternatives per token the teacher returns")
    refresh_every: int = Field(1, ge=1, description="optimiser steps a student sample is reused")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    min_aligned: float = Field(0.5, ge=0, le=1, description="least share of the student's sampled positions "
                               "with a teacher counterpart (tokenizers that differ); below it the run stops")
    sampler: Literal["hf", "vllm"] = Field(
        "hf", description="what makes the student's samples: hf (the training model's generate) or vllm (a vLLM "
        "engine on the same GPU, given the trained weights before each new step's samples)")
    vllm: VLLMOptions = Field(default_factory=lambda: VLLMOptions(gpu_memory_utilization=0.3),
                              description="the sampling engine's settings (sampler: vllm); it shares the GPU with "
                              "the training, hence its smaller memory share")


class KDConfig(Strict):
    """The task-specific KD pipeline (`lionkd distill`)."""

    labeled: DataConfig = Field(default_factory=DataConfig)
    unlabeled: DataConfig | None = None
    eval: DataConfig | None = None
    teacher_finetune: bool = False
    student_init: Literal["pretrained", "pruned", "config"] = "pretrained"
    objective: dict[str, float] = Field(default_factory=lambda: {"logits": 1.0})

    @field_validator("objective")
    @classmethod
    def _known_objectives(cls, value: dict[str, float]) -> dict[str, float]:
        for name, weight in value.items():
            if name not in KD_OBJECTIVES:
                close = difflib.get_close_matches(name, KD_OBJECTIVES, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(KD_OBJECTIVES)}"
                raise ValueError(f"unknown objective {name!r} ({hint})")
            if weight < 0:
                raise ValueError(f"the weight of {name!r} must be >= 0")
        if value and not any(value.values()):
            raise ValueError("every weight is zero")
        return value
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"] = (
        "forward_kl"
    )
    temperature: float = Field(1.0, gt=0)
    jsd_beta: float = Field(0.5, ge=0, le=1)
    skew_alpha: float = Field(0.1, ge=0, le=1)
    attention_scale: Literal["balanced", "raw"] = Field(
        "balanced", description="'attention' objective: balanced rescales it to the running size of the other "
        "objectives, so that the weights are shares of the loss; raw adds the relation KL as it is")
    noisy_input_rate: float = Field(
        0.1, ge=0, lt=1, description="'noisy' objective: share of the student's prompt tokens replaced by random "
        "tokens (the paper's noisy student input); the teacher sees the clean input")
    final_ce_epochs: float = Field(1.0, ge=0)
    topk_tail: Literal["rest", "renorm"] = Field(
        "rest", description="teacher mass outside a sparse top-k: a 'rest' bucket, or renormalise the top-k"
    )
    teacher_topk: int = Field(0, ge=0, description="> 0: cache the teacher's top-k per target token once")
    pt_method: Literal["none", "beam", "sample", "high_temp"] = "sample"
    pt_count: int = Field(4, ge=1, description="pseudo-targets per input (K); epoch e uses number e mod K")
    pt_temperature: float | None = Field(None, gt=0, description="default: 1.0 for sample, 1.5 for high_temp")
    pt_top_p: float = Field(0.95, gt=0, le=1)
    pt_num_beams: int = Field(4, ge=1)
    pt_max_new_tokens: int = Field(128, ge=1)
    fewshot: int = Field(0, ge=0, description="API teacher: labeled demonstrations in each PT prompt")
    teacher_instruction: str | None = Field(None, description="API teacher: the task instruction (system message)")
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    joint_alpha: float = Field(0.0, ge=0, le=1, description="Joint-Teaching share of student samples (paper 0.5)")
    joint_refresh_every: int = Field(1, ge=1, description="optimiser steps a student sample is reused")
    prune_keep: str = Field("first_last", description="'first_last', 'even:N' or a list like '0,2,-1'")
    prune_encoder_keep: str | None = Field(None, description="encoder-decoder: encoder layers to keep (null: all)")
    teacher_train: TrainConfig | None = Field(None, description="teacher fine-tuning settings (null: student.train)")
    eval_holdout: float = Field(0.1, ge=0, lt=1, description="share of labeled rows held out when eval is null")
    eval_num_beams: int = Field(4, ge=1)
    eval_max_new_tokens: int = Field(128, ge=1)
    eval_teacher: bool = Field(True, description="evaluate the teacher too (the gap the student closes)")


# --------------------------------------------------------------------------- the whole run


class RunConfig(Strict):
    run_dir: Path = Path("runs/lion")
    seed: int = 0
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="limits of the whole run, all roles together")
    teacher: EndpointConfig = _endpoint(temperature=0.7, max_tokens=1024)
    referee: EndpointConfig = _endpoint(temperature=0.2, max_tokens=512)
    generator: EndpointConfig = _endpoint(temperature=1.0, top_p=1.0, max_tokens=256)
    student: StudentConfig = Field(default_factory=StudentConfig)
    lion: LionConfig = Field(default_factory=LionConfig)
    kd: KDConfig = Field(default_factory=KDConfig)


# --------------------------------------------------------------------------- loading


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at `loc` (for suggesting a close key)."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _nested_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _nested_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line number (1-based) of every mapping key in a YAML document, by its dotted path."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                p = (*path, str(key.value))
                lines[p] = key.start_mark.line + 1
                walk(value, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, str(i)))

    with contextlib.suppress(yaml.YAMLError):
        walk(yaml.compose(text), ())
    return lines


def _type_name(err: dict[str, Any]) -> str:
    kind = err["type"]
    names = {
        "int_parsing": "an integer",
        "int_type": "an integer",
        "float_parsing": "a number",
        "float_type": "a number",
        "bool_parsing": "true or false",
        "bool_type": "true or false",
        "string_type": "a string",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "list_type": "a list",
    }
    return names.get(kind, "")


def describe_error(exc: ValidationError, source: str, text: str = "") -> str:
    """One line naming the place of the first error, with a suggestion where one helps."""
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc) or "(top level)"
    line = _key_lines(text).get(loc) if text else None
    where = f"{source}:{line}" if line else source
    if err["type"] == "extra_forbidden":
        owner = _model_at(RunConfig, err["loc"])
        valid = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"
        return f"{where}: unknown key '{dotted}'{hint}"
    expected = _type_name(err)
    got = err.get("input")
    if expected:
        return f"{where}: key '{dotted}' must be {expected}, got {got!r}"
    return f"{where}: key '{dotted}': {err['msg'].removeprefix('Value error, ')}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, check_paths: bool = True) -> RunConfig:
    """Read and validate a run config; relative paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    text = read_utf8(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{at}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(describe_error(exc, str(path), text)) from None
    return resolve_paths(cfg, path.parent, check_paths=check_paths)


def resolve_paths(cfg: RunConfig, base: Path, check_paths: bool = True) -> RunConfig:
    if not cfg.run_dir.is_absolute():
        cfg.run_dir = base / cfg.run_dir
    if cfg.lion.seed_pool is not None:
        if not cfg.lion.seed_pool.is_absolute():
            cfg.lion.seed_pool = base / cfg.lion.seed_pool
        if check_paths and not cfg.lion.seed_pool.exists():
            raise UserError(f"lion.seed_pool: file not found: {cfg.lion.seed_pool}")
    for key, train in (("student.train", cfg.student.train), ("kd.teacher_train", cfg.kd.teacher_train)):
        if train is not None and train.accelerate_config is not None:
            if not train.accelerate_config.is_absolute():
                train.accelerate_config = base / train.accelerate_config
            if check_paths and not train.accelerate_config.is_file():
                raise UserError(f"{key}.accelerate_config: file not found: {train.accelerate_config}")
    for data in (cfg.kd.labeled, cfg.kd.unlabeled, cfg.kd.eval):
        if data is not None and data.path and not Path(data.path).is_absolute():
            local = base / data.path
            if local.exists():
                data.path = str(local)
    return cfg


SECRET_MASK = "***"


def masked_dump(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data, safe to print or store: no secret value appears."""
    data = cfg.model_dump(mode="json")
    secrets = {v for v in (os.environ.get(e.api_key_env or "") for e in (cfg.teacher, cfg.referee, cfg.generator)) if v}

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        if isinstance(node, str):
            for s in secrets:
                node = node.replace(s, SECRET_MASK)
        return node

    return scrub(data)
