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
