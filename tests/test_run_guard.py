"""The run guard as a library: the run-directory lock across processes, and config drift by class."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lionkd.config import RunConfig, load_config
from lionkd.errors import UserError
from lionkd.run_guard import (
    LOCK_NAME,
    affects_results,
    bind_config,
    check_export_target,
    config_changes,
    hold_run,
)
from lionkd.store import Store

HOLDER = textwrap.dedent("""
    import sys
    from lionkd.run_guard import hold_run
    with hold_run(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # hold until told (stdin closes) or killed
""")


def start_holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_at_once_naming_the_lock_and_pid(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(UserError) as err, hold_run(tmp_path):
            pass
        message = str(err.value)
        assert str(tmp_path / LOCK_NAME) in message and f"pid {holder.pid}" in message and "\n" not in message
    finally:
        holder.communicate("")  # let it go
    with hold_run(tmp_path):  # released: free to take
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert (tmp_path / LOCK_NAME).read_text() == ""  # a free lock names nobody


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(holder.pid)  # the dead holder's pid is still there
    with hold_run(tmp_path):
        pass


def test_the_lock_nests_within_one_process(tmp_path: Path) -> None:
    with hold_run(tmp_path), hold_run(tmp_path):  # `demo` holds it around `run_lion`, which takes it again
        pass
    holder = start_holder(tmp_path)  # and it is really free afterwards
    holder.communicate("")


# --------------------------------------------------------------------------- config drift, by class


def test_keys_that_do_not_change_results_are_listed_and_anything_else_does() -> None:
    for key in ("teacher.concurrency", "referee.requests_per_minute", "generator.tokens_per_minute",
                "teacher.max_retries", "teacher.timeout_s", "teacher.base_url", "student.train.logging_steps",
                "run_dir"):
        assert not affects_results(key), key
    for key in ("lion.tau", "lion.seed_pool", "lion.new_per_iteration", "teacher.model", "teacher.temperature",
                "student.train.learning_rate", "seed", "some_future_key", "teacher.concurrency_new"):
        assert affects_results(key), key


def dump(**changes) -> dict:
    cfg = RunConfig()
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        target = cfg
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return cfg.model_dump(mode="json")


def test_config_changes_name_each_key_with_old_and_new_values() -> None:
    old, new = dump(), dump(lion__tau=2.5, teacher__concurrency=4)
    assert [str(c) for c in config_changes(old, new)] == ["teacher.concurrency: 16 -> 4", "lion.tau: 1.0 -> 2.5"]
    assert config_changes(old, dump()) == []


def test_an_option_added_by_a_newer_lionkd_is_no_change_at_its_default() -> None:
    old, new = dump(), dump(lion__tau=2.5)
    del old["lion"]["tau"]  # the run was made before `tau` existed
    assert [str(c) for c in config_changes(old, new)] == ["lion.tau: (absent) -> 2.5"]
    assert config_changes(old, dump()) == []
    del old["kd"]["temperature"], old["lion"]["iterations"]
    assert config_changes(old, dump()) == []
    gone = dump()
    del gone["kd"]["eval_holdout"]  # an option lionkd no longer has
    assert config_changes(dump(), gone) == []


def test_entries_of_user_mappings_and_whole_sections_count() -> None:
    old = dump(kd__objective={"logits": 1.0, "ce": 0.5})
    new = dump(kd__objective={"logits": 1.0})
    assert [str(c) for c in config_changes(old, new)] == ["kd.objective.ce: 0.5 -> (absent)"]
    with_eval = RunConfig.model_validate({"kd": {"eval": {"path": "dev.jsonl"}}}).model_dump(mode="json")
    changes = config_changes(with_eval, dump())
    assert [c.key for c in changes] == ["kd.eval"] and changes[0].new is None


def write_config(folder: Path, **lion) -> Path:
    cfg = {"run_dir": "run", "teacher": {"backend": "sandbox", "model": "teacher", "api_key_env": None},
           "lion": {"seed_pool_size": 20, **lion}}
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_bind_config_refuses_result_changes_allows_the_others_and_records_what_it_was_told(tmp_path: Path) -> None:
    first = load_config(write_config(tmp_path))
    with Store.open_run(first.run_dir) as store:
        assert bind_config(store, first) == []
        saved = (first.run_dir / "config.yaml").read_text()
        store.finish_stage(0, "setup")
        store.finish_stage(1, "imitation")  # from here on the run is fixed

        changed = load_config(write_config(tmp_path, tau=2.5))
        with pytest.raises(UserError, match=r"lion\.tau: 1\.0 -> 2\.5.*--allow-config-change"):
            bind_config(store, changed)
        assert (first.run_dir / "config.yaml").read_text() == saved

        faster = load_config(write_config(tmp_path))
        faster.teacher.concurrency, faster.teacher.timeout_s = 64, 5.0
        assert bind_config(store, faster) == []
        assert (first.run_dir / "config.yaml").read_text() == saved  # still what the run started with

        applied = bind_config(store, changed, allow_change=True)
        assert [str(c) for c in applied] == ["lion.tau: 1.0 -> 2.5"]
        assert [(c["key"], c["old"], c["new"], c["after"]) for c in store.config_changes()] == [
            ("lion.tau", 1.0, 2.5, "after iteration 1 imitation")]
        assert yaml.safe_load((first.run_dir / "config.yaml").read_text())["lion"]["tau"] == 2.5
        assert json.loads(store.get_meta("config"))["lion"]["tau"] == 2.5
        assert bind_config(store, changed) == []  # the run is now bound to the new value
        with pytest.raises(UserError, match=r"lion\.tau: 2\.5 -> 1\.0"):
            bind_config(store, first)


def test_a_run_that_finished_no_stage_takes_the_new_config(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))
    with Store.open_run(cfg.run_dir) as store:
        bind_config(store, cfg)
        fixed = load_config(write_config(tmp_path, tau=3.0))  # e.g. the first try failed on a bad seed file
        assert bind_config(store, fixed) == [] and store.config_changes() == []
        assert yaml.safe_load((cfg.run_dir / "config.yaml").read_text())["lion"]["tau"] == 3.0


def test_a_run_that_only_read_its_seeds_is_bound_to_the_seed_keys_alone(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))
    with Store.open_run(cfg.run_dir) as store:
        bind_config(store, cfg)
        store.finish_stage(0, "setup")  # then the teacher's calls or the student's training failed
        fixed = load_config(write_config(tmp_path, tau=3.0))
        fixed.student.train.learning_rate = 1e-4
        assert bind_config(store, fixed) == [] and store.config_changes() == []
        assert json.loads(store.get_meta("config"))["student"]["train"]["learning_rate"] == 1e-4
        other_seeds = load_config(write_config(tmp_path, tau=3.0))
        other_seeds.lion.seed_pool_size = 7
        with pytest.raises(UserError, match=r"lion\.seed_pool_size: \d+ -> 7"):
            bind_config(store, other_seeds)


def test_a_refusal_says_what_the_command_that_ran_can_do(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))
    with Store.open_run(cfg.run_dir) as store:
        bind_config(store, cfg)
        store.finish_stage(1, "imitation")
        changed = load_config(write_config(tmp_path, tau=2.5))
        hint = "run the demo with the options it started with, or give a new --run-dir"
        with pytest.raises(UserError, match=r"lion.tau: 1.0 -> 2.5\); run the demo with the options") as info:
            bind_config(store, changed, change_hint=hint)
        assert "--allow-config-change" not in str(info.value)  # `lionkd demo` has no such option


def test_a_run_from_before_the_guard_is_bound_to_its_config_yaml(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))
    with Store.open_run(cfg.run_dir) as store:
        store.finish_stage(1, "imitation")
        old = RunConfig.model_validate({**cfg.model_dump(mode="json"), "lion": {"tau": 1.5, "seed_pool_size": 20}})
        (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(old.model_dump(mode="json")))
        with pytest.raises(UserError, match=r"lion\.tau: 1\.5 -> 1\.0"):
            bind_config(store, cfg)


def test_export_never_overwrites_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for bad in (run / "run.sqlite", run / "config.yaml", run, tmp_path, run / "." / "run.sqlite-wal"):
        with pytest.raises(UserError, match="--out"):
            check_export_target(run, bad)
    check_export_target(run, run / "export.jsonl")
    check_export_target(run, tmp_path / "out.jsonl")
