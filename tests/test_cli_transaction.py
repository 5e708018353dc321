"""A run is a transaction, tried through the `lionkd` command as a user (or a hostile tester) would:
Ctrl-C, two writers, config drift, a dead endpoint, and bad inputs that must end as one line and exit 2
with nothing damaged.

The runs are the sandbox world with the shipped tiny student and a few seeds: seconds each.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import closed_port, one_line, run_cli
from lionkd.llm.base import GenRequest, GenResult
from lionkd.llm.sandbox_backend import SandboxBackend
from lionkd.llm.server import ServerThread, create_app
from lionkd.run_guard import LOCK_NAME, hold_run
from lionkd.store import STORE_NAME, Store

ROLES = ("teacher", "referee", "generator")


def sandbox_roles() -> dict[str, Any]:
    return {role: {"backend": "sandbox", "model": role, "api_key_env": None} for role in ROLES}


def write_config(folder: Path, *, roles: dict[str, Any] | None = None, name: str = "c.yaml", **lion: Any) -> Path:
    cfg = {
        "run_dir": "run", "seed": 0, **(roles or sandbox_roles()),
        "student": {
            "model": "sandbox:base-student",
            "train": {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-3, "max_length": 64, "warmup_ratio": 0.0,
                      "lr_scheduler": "constant", "save_steps": 1000},
            "generation": {"temperature": 0.0, "max_new_tokens": 8, "batch_size": 64},
        },
        "lion": {"seed_pool_size": 20, "iterations": 1, "new_per_iteration": 8, "generation_rounds": 2} | lion,
    }
    if cfg["teacher"]["backend"] != "sandbox" and "seed_pool" not in lion:  # only the sandbox draws its own
        from lionkd.sandbox import world

        (folder / "seeds.jsonl").write_text("\n".join(json.dumps(r) for r in world.seed_pool(20, seed=0)))
        cfg["lion"]["seed_pool"] = "seeds.jsonl"
    path = folder / name
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def lionkd(*args: str, **popen: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lionkd", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def stored_calls(run_dir: Path) -> int:
    """Model calls the run has stored, read from outside while it runs (0 before the schema exists)."""
    path = run_dir / STORE_NAME
    if not path.is_file():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {what}: {proc.communicate()}"
        assert time.monotonic() < end, f"no {what} within {timeout} s"
        time.sleep(0.02)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- 1. Ctrl-C


def test_ctrl_c_exits_130_saying_what_was_saved_and_the_run_resumes(tmp_path: Path) -> None:
    config = write_config(tmp_path, iterations=3, new_per_iteration=200)
    run = tmp_path / "run"
    # As from a terminal: the run leads its own process group, and Ctrl-C signals the whole group.
    proc = lionkd("run", str(config), "--no-progress", "--no-report", start_new_session=True)
    wait_for(lambda: stored_calls(run) > 0, proc, "a stored model call")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    line = one_line(err)
    assert line.startswith("interrupted: ") and f"saved in {run / STORE_NAME}" in line
    assert f"run `lionkd run {config}` again to resume" in line and "model call" in line
    with Store.open_existing(run) as store:
        assert store.integrity_ok()
        calls = store._query("SELECT COUNT(*) FROM calls")[0][0]
    assert calls > 0
    with hold_run(run):  # the lock went with the process
        pass


# --------------------------------------------------------------------------- 2. one writer per run


class CountingSandbox(SandboxBackend):
    def __init__(self, model: str, log: list[str]) -> None:
        super().__init__(model)
        self.log = log

    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        self.log.extend(self.model for _ in requests)
        async for item in super().stream(requests):
            yield item


@pytest.fixture
def world() -> Iterator[tuple[dict[str, Any], list[str]]]:
    """The sandbox world over HTTP, counting every request that reaches it."""
    log: list[str] = []
    with ServerThread(create_app({role: CountingSandbox(role, log) for role in ROLES})) as server:
        roles = {role: {"backend": "openai", "model": role, "base_url": server.base_url, "api_key_env": None,
                        "max_tokens": 64} for role in ROLES}
        yield roles, log


def test_two_concurrent_runs_send_one_runs_requests_and_the_second_exits_2(tmp_path: Path, world) -> None:
    roles, log = world
    alone = tmp_path / "alone"
    alone.mkdir()
    result = run_cli("run", str(write_config(alone, roles=roles)), "--no-progress", "--no-report")
    assert result.returncode == 0, result.stderr
    one_run = len(log)
    log.clear()

    config = write_config(tmp_path, roles=roles)
    first = lionkd("run", str(config), "--no-progress", "--no-report")
    lock = tmp_path / "run" / LOCK_NAME
    wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), first, "the lock taken")
    second = run_cli("run", str(config), "--no-progress", "--no-report")
    assert second.returncode == 2  # refused at once: a second run that waited would have taken the lock and run
    line = one_line(second.stderr)
    assert str(lock) in line and f"pid {first.pid}" in line
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert len(log) == one_run  # nobody sent anything twice


# --------------------------------------------------------------------------- 3. config drift


def test_config_changes_by_class_through_the_command(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert run_cli("run", str(config), "--no-progress", "--no-report").returncode == 0
    saved = tmp_path / "run" / "config.yaml"
    before = saved.read_bytes()

    changed = write_config(tmp_path, name="tau.yaml", tau=2.5)
    refused = run_cli("run", str(changed), "--no-progress", "--no-report")
    assert refused.returncode == 2
    line = one_line(refused.stderr)
    assert "lion.tau: 1.0 -> 2.5" in line and "--allow-config-change" in line
    assert saved.read_bytes() == before  # a finished run keeps the config it was made with

    roles = sandbox_roles()
    for role in ROLES:
        roles[role] |= {"concurrency": 3, "max_retries": 1, "timeout_s": 9.0, "requests_per_minute": 6000}
    operational = write_config(tmp_path, name="ops.yaml", roles=roles)
    result = run_cli("run", str(operational), "--no-progress", "--no-report")
    assert result.returncode == 0 and "already finished" in result.stdout, result.stderr
    assert saved.read_bytes() == before

    allowed = run_cli("run", str(changed), "--no-progress", "--no-report", "--allow-config-change")
    assert allowed.returncode == 0, allowed.stderr
    assert "lion.tau: 1.0 -> 2.5" in allowed.stderr
    assert yaml.safe_load(saved.read_text())["lion"]["tau"] == 2.5
    with Store.open_existing(tmp_path / "run") as store:
        assert [(c["key"], c["old"], c["new"]) for c in store.config_changes()] == [("lion.tau", 1.0, 2.5)]
    report = run_cli("report", str(tmp_path / "run"))
    assert report.returncode == 0, report.stderr
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "Config changes applied to this run" in markdown and "lion.tau" in markdown


# --------------------------------------------------------------------------- 5. a dead endpoint


def test_a_dead_endpoint_fails_within_seconds_with_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    roles = {role: {"backend": "openai", "model": role, "base_url": url, "api_key_env": None} for role in ROLES}
    config = write_config(tmp_path, roles=roles)
    result = run_cli("run", str(config), "--no-progress", "--no-report")
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)  # the probe's line: requests retried for minutes would end in "calls failed"
    assert line.startswith("error: teacher: ") and "cannot reach" in line and "refused" in line


def test_an_empty_api_key_is_one_line(tmp_path: Path) -> None:
    roles = {role: {"backend": "openai", "model": role, "api_key_env": "LIONKD_TEST_EMPTY_KEY"} for role in ROLES}
    result = run_cli("run", str(write_config(tmp_path, roles=roles)), "--no-progress",
                     env={"LIONKD_TEST_EMPTY_KEY": ""})
    assert result.returncode == 2
    assert "teacher.api_key_env: the environment variable $LIONKD_TEST_EMPTY_KEY is set but empty" in one_line(
        result.stderr)
    checked = run_cli("config", "check", str(tmp_path / "c.yaml"), env={"LIONKD_TEST_EMPTY_KEY": ""})
    assert checked.returncode == 2 and "teacher.api_key_env" in one_line(checked.stderr)


# --------------------------------------------------------------------------- 7. bad input


@pytest.mark.parametrize("tau", [".nan", "11", "0", "-1", ".inf"])
def test_tau_out_of_range_or_nan_is_refused(tmp_path: Path, tau: str) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("seed_pool_size: 20", f"seed_pool_size: 20\n  tau: {tau}"))
    result = run_cli("config", "check", str(config))
    assert result.returncode == 2 and "lion.tau" in one_line(result.stderr)


def test_latin1_files_are_one_line_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "latin.yaml"
    config.write_bytes(b"run_dir: caf\xe9\n")
    result = run_cli("run", str(config))
    assert result.returncode == 2 and f"{config}: line 1: not UTF-8" in one_line(result.stderr)

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes(b'{"instruction": "Add 2 and 3."}\n{"instruction": "Caf\xe9 au lait, please."}\n')
    config = write_config(tmp_path, seed_pool=str(seeds))
    result = run_cli("run", str(config), "--no-progress")
    assert result.returncode == 2 and f"{seeds}: line 2: not UTF-8" in one_line(result.stderr)


def test_a_seed_pool_of_one_instruction_is_refused(tmp_path: Path) -> None:
    seeds = tmp_path / "one.jsonl"
    seeds.write_text(json.dumps({"instruction": "Add 2 and 3."}) + "\n" + json.dumps({"instruction": "Add 2 and 3."}))
    result = run_cli("run", str(write_config(tmp_path, seed_pool=str(seeds))), "--no-progress")
    assert result.returncode == 2 and "1 distinct instruction" in one_line(result.stderr)
    # the corrected file is then simply used: a run that finished no stage is not bound to its config
    seeds.write_text(json.dumps({"instruction": "Add 2 and 3."}) + "\n" + json.dumps({"instruction": "Add 4 and 5."}))
    result = run_cli("run", str(write_config(tmp_path, seed_pool=str(seeds))), "--dry-run")
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("exported") / "run"
    with Store.open_run(run) as store:
        from lionkd.records import Instruction, Response

        items = [Instruction("Add 2 and 3."), Instruction("Reverse the word cat.")]
        store.add_instructions(items)
        store.add_response(Response(items[0].id, "teacher", "t", 1, "5"))
    return run


def test_export_onto_the_run_store_is_refused_and_the_store_kept(small_run: Path) -> None:
    store = small_run / STORE_NAME
    before = digest(store)
    for out in (store, small_run / "config.yaml", small_run):
        result = run_cli("export", str(small_run), "-o", str(out))
        assert result.returncode == 2 and "--out" in one_line(result.stderr)
    assert digest(store) == before
    with Store.open_existing(small_run) as s:
        assert s.count_instructions() == 2


def test_export_never_overwrites_and_writes_only_what_the_role_answered(tmp_path: Path) -> None:
    from lionkd.records import Instruction, Response

    run = tmp_path / "run"
    with Store.open_run(run) as store:
        items = [Instruction("Add 2 and 3.", reference="seed answer"), Instruction("Reverse cat.", reference="tac"),
                 Instruction("Name a colour.")]
        store.add_instructions(items)
        store.add_response(Response(items[0].id, "teacher", "t", 1, "5"))
        store.add_response(Response(items[2].id, "teacher", "t", 1, ""))  # an empty answer is no answer
        store.add_response(Response(items[1].id, "student", "s", 1, "tac"))
    model = run / "students" / "iter-3"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (run / "summary.json").write_text("{}")
    for target in (model / "config.json", run / "summary.json", model / "export.jsonl", model / "hf"):
        before = sorted(p.name for p in model.iterdir())
        result = run_cli("export", str(run), "-o", str(target), *(["--format", "hf"] if target.name == "hf" else []))
        assert result.returncode == 2 and "--out" in one_line(result.stderr), result.stderr
        assert sorted(p.name for p in model.iterdir()) == before
    assert (model / "config.json").read_text() == "{}" and (run / "summary.json").read_text() == "{}"

    out = tmp_path / "teacher.jsonl"
    result = run_cli("export", str(run), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    assert "1 empty answer(s) by teacher left out" in result.stderr
    student = tmp_path / "student.jsonl"
    assert run_cli("export", str(run), "-o", str(student), "--role", "student").returncode == 0
    assert [json.loads(line)["output"] for line in student.read_text().splitlines()] == ["tac"]


def test_export_of_a_role_without_answers_is_refused(small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bogus.jsonl"
    result = run_cli("export", str(small_run), "-o", str(out), "--role", "bogus")
    assert result.returncode == 2 and not out.exists()
    assert "no answers by 'bogus'" in one_line(result.stderr) and "teacher" in result.stderr


def test_status_on_an_empty_or_foreign_file_leaves_it_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    store = run / STORE_NAME
    for content in (b"", b"not a database at all\n"):
        store.write_bytes(content)
        result = run_cli("status", str(run))
        assert result.returncode == 2 and "not a lionkd run store" in one_line(result.stderr)
        assert store.read_bytes() == content


@pytest.mark.parametrize("option", [["--iterations", "0"], ["--new", "0"], ["--epochs", "0"]])
def test_demo_options_out_of_range_are_one_line(tmp_path: Path, option: list[str]) -> None:
    result = run_cli("demo", "--run-dir", str(tmp_path / "demo"), *option)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "pydantic" not in result.stderr.lower()
    assert not (tmp_path / "demo" / STORE_NAME).exists()


# --------------------------------------------------------------------------- the same guards in `distill`


def write_distill_config(folder: Path, url: str, **kd: Any) -> Path:
    with (folder / "task.jsonl").open("w") as f:
        for i in range(12):
            f.write(json.dumps({"input": f"add {i} and {i + 1}", "target": str(2 * i + 1)}) + "\n")
    cfg = {"run_dir": "run", "teacher": {"backend": "openai", "model": "t", "base_url": url, "api_key_env": None},
           "student": {"model": "sandbox:base-student", "train": {"max_steps": 1, "batch_size": 4, "max_length": 32}},
           "kd": {"labeled": {"path": "task.jsonl"}, "pt_count": 1, "student_init": "pretrained"} | kd}
    path = folder / "distill.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_distill_is_locked_bound_to_its_config_and_fails_fast_on_a_dead_teacher(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    config = write_distill_config(tmp_path, url)
    dead = run_cli("distill", str(config), "--no-progress")
    # The reachability probe's line ("cannot reach"), not six retries with backoff of every request.
    assert dead.returncode == 2
    assert "teacher: " in one_line(dead.stderr) and "cannot reach" in dead.stderr

    changed = run_cli("distill", str(write_distill_config(tmp_path, url, temperature=2.0)), "--no-progress")
    assert changed.returncode == 2 and "kd.temperature: 1.0 -> 2.0" in one_line(changed.stderr)

    moved = write_distill_config(tmp_path, f"http://127.0.0.1:{closed_port()}/v1")  # an address is no result
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from lionkd.run_guard import hold_run\n"
                               "with hold_run(sys.argv[1]):\n print('locked', flush=True); sys.stdin.read()",
                               str(tmp_path / "run")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        locked = run_cli("distill", str(moved), "--no-progress")
        assert locked.returncode == 2 and f"pid {holder.pid}" in one_line(locked.stderr)
    finally:
        holder.communicate("")
    again = run_cli("distill", str(moved), "--no-progress")
    assert again.returncode == 2 and "cannot reach" in one_line(again.stderr)


# --------------------------------------------------------------------------- read-only and full disks


def in_own_mounts(script: str) -> subprocess.CompletedProcess:
    """Run `script` (sh) in a user and mount namespace, where it may mount read-only binds and small tmpfs."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here (unshare -rm) to mount a read-only or a full disk")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ})


def test_a_finished_run_on_a_read_only_disk_is_read_and_a_run_there_is_one_line(tmp_path: Path) -> None:
    from lionkd.records import Instruction, Response

    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    with Store.open_run(run) as store:
        items = [Instruction("Add 2 and 3."), Instruction("Reverse the word cat.")]
        store.add_instructions(items)
        store.set_pool(1, "train", [i.id for i in items])
        store.add_response(Response(items[0].id, "teacher", "t", 1, "5"))
        store.put_metrics(1, {"hard_ratio": 0.25})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run), **sandbox_roles(), "lion": {"seed_pool_size": 10}}))
    before = digest(run / STORE_NAME)
    py = f"{sys.executable} -m lionkd"
    result = in_own_mounts(
        f"mount --bind -o ro {run} {run} || exit 99; "
        f"{py} status {run} > {out}/status.txt; echo status=$?; "
        f"{py} export {run} -o {out}/x.jsonl; echo export=$?; "
        f"{py} report {run} -o {out}; echo report=$?; "
        f"{py} run {config} --no-progress; echo run=$?")
    assert result.returncode == 0, result.stderr
    codes = dict(line.split("=") for line in result.stdout.split() if "=" in line)
    assert codes == {"status": "0", "export": "0", "report": "0", "run": "2"}, result.stderr
    assert "0.25" in (out / "status.txt").read_text() and (out / "x.jsonl").is_file() and (out / "report.html").is_file()
    assert "read-only file system" in one_line(result.stderr) and "run the same command again" in result.stderr
    assert digest(run / STORE_NAME) == before


def test_a_full_disk_stops_a_run_in_one_line(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    config = write_config(tmp_path)
    config.write_text(yaml.safe_dump(yaml.safe_load(config.read_text()) | {"run_dir": str(small / "run")}))
    result = in_own_mounts(f"mount -t tmpfs -o size=300k tmpfs {small} || exit 99; "
                           f"{sys.executable} -m lionkd run {config} --no-progress --no-report")
    assert result.returncode == 2, result.stderr
    assert "no space left on the disk" in one_line(result.stderr)
