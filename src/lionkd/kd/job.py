"""`python -m lionkd.kd.job JOB_FILE`: one process of a training stage started by a launcher.

Every process reads the same job (see `launch.py`) and calls `train_student`, which under a launcher
trains in this process with Accelerate's distributed setup; rank 0 saves.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from .train import train_student

    path = Path((argv or sys.argv[1:])[0])
    job = pickle.loads(path.read_bytes())  # written by this run's own orchestrator
    train_student(**job)


if __name__ == "__main__":
    main()
