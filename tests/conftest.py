import os
import socket
import subprocess
import sys

import pytest

# Tests share 2 cores with each other's subprocesses; one thread per process keeps them predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_cli(*args: str, env: dict | None = None, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m lionkd ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lionkd", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def one_line(text: str) -> str:
    """The only non-blank line of `text` (a user error is one line)."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def closed_port() -> int:
    """A port on 127.0.0.1 that nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cli():
    return run_cli


def sandbox_run_config(path, run_dir, *, train: dict, generation: dict, seeds: int, new: int):
    """A one-iteration Lion run config on the in-process sandbox world with the shipped base student."""
    import yaml

    world = {role: {"backend": "sandbox", "model": role, "api_key_env": None}
             for role in ("teacher", "referee", "generator")}
    cfg = {"run_dir": str(run_dir), "seed": 0, **world,
           "student": {"model": "sandbox:base-student", "train": train, "generation": generation},
           "lion": {"seed_pool_size": seeds, "iterations": 1, "new_per_iteration": new}}
    path.write_text(yaml.safe_dump(cfg))
    return path
