"""One training of a student as one object, `TrainJob`, and `python -m lionkd.kd.job JOB_FILE`: one process
of a training stage started by a launcher.

`train_student(job)` trains in its own process, or, when the job's settings ask for several processes,
pickles this very job (see `launch.py`); every launched process reads it back here and calls
`train_student`, which under a launcher trains with Accelerate's distributed setup; rank 0 saves.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import KDConfig, LoraConfig, TrainConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .examples import PromptTemplate, TrainExample
    from .joint_teaching import JointTeaching
    from .on_policy import OnPolicySetup


@dataclass
class TrainJob:
    """Train `student` on `examples` and save it (model + tokenizer) to `out_dir`.

    `examples` is one list (the same every epoch) or a list of equally long lists (epoch e trains on
    list e mod n: the pseudo-target schedule). `objective` defaults to `kd.objective` with a teacher
    and to "ce" without. `tokenizer` is needed only when `student` is a model object without a
    saved tokenizer. With `resume`, a finished `out_dir` is returned as is and an interrupted run
    continues from its last checkpoint. LoRA adapters are merged into the saved model.
    """

    student: str | Path | PreTrainedModel
    examples: Sequence[TrainExample] | Sequence[Sequence[TrainExample]]
    out_dir: str | Path
    settings: TrainConfig = field(default_factory=TrainConfig)
    teacher: str | Path | PreTrainedModel | None = None
    objective: str | Mapping[str, float] | None = None
    kd: KDConfig = field(default_factory=KDConfig)
    template: PromptTemplate = "chat"
    lora: LoraConfig | None = None
    joint: JointTeaching | None = None
    tokenizer: Any = None
    resume: bool = True
    progress: bool = True
    on_policy: OnPolicySetup | None = None  # the 'on_policy' objective's served teacher (`on_policy.py`)
    # Extra `transformers.TrainerCallback`s (an evaluation at some step, a tracker of one's own): they
    # run in the training process, so a job that launches several processes refuses them.
    callbacks: Sequence[Any] = ()

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    def objective_weights(self) -> dict[str, float]:
        """The objective as weights: `kd.objective` with a teacher and cross-entropy without, by default."""
        from .objectives import resolve_objective

        objective = self.kd.objective if self.objective is None and self.teacher is not None else self.objective
        return resolve_objective(objective, self.teacher is not None or self.on_policy is not None)


def main(argv: list[str] | None = None) -> None:
    from ..errors import UserError
    from .train import train_student

    path = Path((argv or sys.argv[1:])[0])
    job: TrainJob = pickle.loads(path.read_bytes())  # written by this run's own orchestrator
    try:
        train_student(job)
    except UserError as exc:  # one line (the orchestrator names the stage), not a traceback per process
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
