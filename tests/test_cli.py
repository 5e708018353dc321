import json
import re

from conftest import run_cli
from lionkd import __version__
from lionkd.records import Instruction, Response
from lionkd.store import Store


def test_version_and_module_entry():
    result = run_cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_status_and_export(tmp_path):
    run = tmp_path / "run"
    with Store.open_run(run) as store:
        items = [Instruction("Add 2 and 3.", domain="arithmetic"), Instruction("Reverse the word cat.")]
        store.add_instructions(items)
        store.set_pool(1, "train", [i.id for i in items])
        store.set_pool(1, "cache", [i.id for i in items])
        store.add_response(Response(items[0].id, "teacher", "t", 1, "5"))
        store.put_call("k1", backend="openai", model="t", request={}, result={}, prompt_tokens=1000,
                       completion_tokens=500, role="teacher", iteration=1)
        store.put_metrics(1, {"hard_ratio": 0.25})
    (run / "config.yaml").write_text("teacher: {price: {input: 1.0, output: 2.0}}\n")
    status = run_cli("status", str(run))
    assert status.returncode == 0, status.stderr
    assert re.search(r"hard_ratio\s*│\s*0.25", status.stdout), status.stdout
    assert "0.0020" in status.stdout  # 1000 * $1/1M + 500 * $2/1M

    out = tmp_path / "out.jsonl"
    result = run_cli("export", str(run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["output"] == "5" and rows[0]["domain"] == "arithmetic"
    chat = run_cli("export", str(run), "--out", str(tmp_path / "c.jsonl"), "--format", "chat")
    assert chat.returncode == 0


def test_status_of_missing_run_is_user_error(tmp_path):
    result = run_cli("status", str(tmp_path / "nope"))
    assert result.returncode == 2 and "not a run directory" in result.stderr


def test_usage_error_exits_2():
    result = run_cli("status", "a", "b")
    assert result.returncode == 2 and "unexpected extra argument" in result.stderr


def test_status_tables_are_readable_at_80_columns(tmp_path):
    """Nine iterations, long model names, big numbers: nothing wider than the terminal, nothing cut off."""
    run = tmp_path / "run"
    student = str(tmp_path / "runs" / "lion" / "students" / "iter-9")
    with Store.open_run(run) as store:
        items = [Instruction(f"Task {i}.") for i in range(3)]
        store.add_instructions(items)
        for k in range(1, 10):
            store.set_pool(k, "train", [i.id for i in items])
            store.set_pool(k, "cache", [i.id for i in items])
            store.finish_stage(k, "imitation")
            store.finish_stage(k, "discrimination")
            store.finish_stage(k, "generation")
            store.put_metrics(k, {"hard_with_truncated_student": 123456, "student_truncated_ratio": 0.123456})
            for role, model in (("teacher", "gpt-4o-mini-2024-07-18"), ("generator", "gpt-4o-mini-2024-07-18"),
                                ("student", student)):
                store.put_call(f"{k}{role}", backend="openai", model=model, request={}, result={},
                               prompt_tokens=12_345_678, completion_tokens=9_876_543, role=role, iteration=k)
            store.put_failure(f"f{k}", backend="openai", model="referee-model", error="x", role="referee", iteration=k)
    (run / "config.yaml").write_text("teacher: {price: {input: 1.0, output: 2.0}}\n")
    status = run_cli("status", str(run), env={"COLUMNS": "80"})
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    # a path is never broken (it is copied from the terminal), so only the title naming the run may be longer
    assert max(len(line) for line in lines if str(run) not in line) <= 80, status.stdout
    assert "…" not in status.stdout  # no cell cut short
    for text in ("12345678", "9876543", "123456", "0.123", "students/iter-9", "32.0988", "generator"):
        assert any(text in line for line in lines), (text, status.stdout)
    assert any(re.match(r"\W*metric\W+7\W+8\W+9\W*$", line) for line in lines), status.stdout  # iterations 7-9 below


def test_no_progress_silences_the_gguf_dequantisation_bar():
    """transformers draws that bar with plain tqdm, which reads TQDM_DISABLE when first imported."""
    import os
    import subprocess
    import sys

    script = ("import sys; from lionkd.cli import library_bars; library_bars(sys.argv[1] == 'on')\n"
              "from transformers import modeling_gguf_pytorch_utils as gguf\n"
              "for _ in gguf.tqdm(range(3), desc='dequantising'): pass")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    shown = {flag: subprocess.run([sys.executable, "-c", script, flag], capture_output=True, text=True, env=env,
                                  check=True).stderr for flag in ("on", "off")}
    assert "dequantising" in shown["on"] and "dequantising" not in shown["off"]
