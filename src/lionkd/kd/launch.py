"""A training stage on several processes: the orchestrator writes the job, a launcher runs it.

The orchestrator (`lionkd run`, `lionkd distill`) stays one process that alone calls APIs and writes
the run store. A training stage that needs more than one process is written to `OUT/train_job.pkl`
(its `TrainJob`: examples, settings, model paths) and run by `python -m lionkd.kd.job` on every process, started by
Accelerate's launcher when an Accelerate config is given (DDP, DeepSpeed ZeRO, FSDP2), otherwise by
torchrun (gloo on CPU, NCCL on GPUs). Rank 0 saves the student and `train_metrics.json`; the
orchestrator waits for the launcher and reads them. The child checkpoints like any training stage,
so a rerun after a crash resumes it. GPU memory held by the child is freed when it exits.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from .job import TrainJob

JOB_FILE = "train_job.pkl"
LAUNCHED_ENV = ("LOCAL_RANK", "WORLD_SIZE")  # set by torchrun and accelerate launch in every process


def launched() -> bool:
    """True inside a process that a distributed launcher started."""
    return any(k in os.environ for k in LAUNCHED_ENV)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_count(setting: int | str) -> int:
    """`processes` as a number: "auto" is the visible GPUs, one on a machine without any."""
    if setting != "auto":
        return int(setting)
    import torch

    return max(1, torch.cuda.device_count())


def needs_launch(processes: int | str, accelerate_config: Path | None) -> bool:
    return not launched() and (process_count(processes) > 1 or accelerate_config is not None)


def launcher_command(processes: int, accelerate_config: Path | None) -> list[str]:
    if accelerate_config is not None:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                "--num_processes", str(processes), "-m", "lionkd.kd.job"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "lionkd.kd.job"]


def free_port() -> int:
    """A free local port for a rendezvous, so that runs side by side do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_training_job(job: TrainJob, processes: int, accelerate_config: Path | None) -> None:
    """Write the job next to where the student will be saved and run it; returns when it has finished."""
    for key in ("student", "teacher", "tokenizer"):
        value = getattr(job, key)
        if value is not None and not isinstance(value, (str, Path)):
            raise ValueError(f"a training stage on several processes takes a model path for '{key}'")
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / JOB_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(job))
    tmp.replace(path)
    env = os.environ.copy()
    if "OMP_NUM_THREADS" not in env:  # share the cores: torchrun would otherwise leave each process one thread
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    code = subprocess.call([*launcher_command(processes, accelerate_config), str(path)], env=env)
    if code != 0:
        raise UserError(f"training stage in {out_dir} failed on {processes} process(es) (exit {code}; its output "
                        "is above); finished steps are checkpointed, run the same command again to resume")
