"""Where the student answers the Cache Pool: in process (transformers), or a server started for the stage."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import run_cli, sandbox_run_config
from lionkd.errors import UserError
from lionkd.llm.server_command import ServedModel
from lionkd.store import Store


def config(path: Path, run_dir: Path, generation: dict) -> Path:
    return sandbox_run_config(path, run_dir, seeds=40, new=10,
                              train={"epochs": 1, "batch_size": 16, "learning_rate": 1e-4, "max_length": 64},
                              generation={"temperature": 0, "max_new_tokens": 16, "batch_size": 32, **generation})


def student_answers(run_dir: Path) -> dict[str, str]:
    with Store.open_existing(run_dir) as store:
        return {i: r.text for i, r in store.responses("student", 1).items()}


def test_a_served_student_answers_as_the_in_process_one(tmp_path):
    answers = {}
    for backend in ("hf", "server"):
        run_dir = tmp_path / backend
        result = run_cli("run", str(config(tmp_path / f"{backend}.yaml", run_dir, {"backend": backend})),
                         "--no-progress", "--no-report", timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        answers[backend] = student_answers(run_dir)
    assert len(answers["hf"]) == 40 and answers["server"] == answers["hf"]  # greedy: the same answers


def test_a_server_that_dies_is_one_line():
    command = f"{sys.executable} -c 'import sys; print(\"no GPU here\"); sys.exit(3)' {{model}} {{port}}"
    with pytest.raises(UserError, match=r"exited with code 3 before serving: no GPU here"), ServedModel(command, "m"):
        pass
    with pytest.raises(UserError, match=r"placeholders are"):
        ServedModel("serve {modle}", "m")
