"""An API key reaches the server and nothing else: not the run store, the saved config, the report,
the students' folders or the error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lionkd.config import load_config
from lionkd.errors import UserError
from lionkd.lion.loop import run_lion
from lionkd.llm.sandbox_backend import SandboxBackend
from lionkd.llm.server import ServerThread, create_app
from lionkd.report.build import build_report
from test_lion_loop import student_dir, write_config  # noqa: F401 - student_dir is a fixture

SECRET = "sk-test-SECRET-7f3a9c"


@pytest.fixture
def guarded_world():
    """The sandbox world behind a server that demands the bearer key."""
    models = {name: SandboxBackend(name) for name in ("teacher", "referee", "generator")}
    with ServerThread(create_app(models, api_key=SECRET)) as server:
        yield server.base_url


def keyed_config(folder: Path, base_url: str, student: Path) -> Path:
    path = write_config(folder, base_url, student, iterations=1)
    cfg = yaml.safe_load(path.read_text())
    for role in ("teacher", "referee", "generator"):
        cfg[role]["api_key_env"] = "LIONKD_TEST_KEY"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_key_is_used_and_never_written(tmp_path, student_dir, guarded_world, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LIONKD_TEST_KEY", SECRET)
    cfg = load_config(keyed_config(tmp_path, guarded_world, student_dir))
    summary = run_lion(cfg, progress=False)
    report_path, _ = build_report(summary.run_dir)
    assert report_path is not None and report_path.is_file()
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "run.sqlite" for p in files) and any(p.suffix == ".html" for p in files)
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data and b"SECRET-7f3a9c" not in data, path


def test_a_wrong_key_fails_fast_without_showing_it(tmp_path, student_dir, guarded_world, monkeypatch):  # noqa: F811
    wrong = "sk-wrong-KEY-1234"
    monkeypatch.setenv("LIONKD_TEST_KEY", wrong)
    cfg = load_config(keyed_config(tmp_path, guarded_world, student_dir))
    with pytest.raises(UserError) as err:
        run_lion(cfg, progress=False)
    message = str(err.value)
    assert "401" in message and "\n" not in message
    assert wrong not in message and "KEY-1234" not in message
