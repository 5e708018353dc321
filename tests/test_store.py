import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from lionkd.data import ReadReport, alpaca_record, chat_record, read_instructions, to_hf_dataset, write_jsonl
from lionkd.errors import UserError
from lionkd.records import Instruction, Judgement, Response, instruction_id
from lionkd.store import Store


def alpaca_rows(n):
    return [{"instruction": f"Write item number {i} of the list.", "input": "" if i % 3 else f"context {i}",
             "output": f"Answer {i}", "domain": "lists" if i % 2 else None} for i in range(n)]


def test_ids_are_content_hashes():
    a = Instruction("Sort  the list [3, 1].")
    b = Instruction("sort the list [3, 1].")
    assert a.id == b.id == instruction_id("Sort the list [3, 1].")
    assert Instruction("Sort the list [3, 1].", input="x").id != a.id


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_alpaca_round_trip_1000(tmp_path, suffix):
    rows = alpaca_rows(1000)
    src = tmp_path / f"seed{suffix}"
    if suffix == ".json":
        src.write_text(json.dumps(rows, indent=2))
    else:
        write_jsonl(src, rows)
    with Store.open_run(tmp_path / "run") as store:
        assert store.add_instructions(read_instructions(src)) == 1000
        exported = [alpaca_record(ins) for ins in store.instructions()]
    expected = [{k: v for k, v in r.items() if v is not None} for r in rows]
    assert exported == expected
    # and back again: the same ids
    out = tmp_path / "out.jsonl"
    write_jsonl(out, exported)
    assert [i.id for i in read_instructions(out)] == [i.id for i in read_instructions(src)]


def test_chat_jsonl_and_hf_dataset(tmp_path):
    src = tmp_path / "chat.jsonl"
    write_jsonl(src, [{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}])
    [ins] = read_instructions(src)
    assert ins.text == "Say hi." and ins.reference == "hi"
    assert chat_record(ins)["messages"][1] == {"role": "assistant", "content": "hi"}
    ds = to_hf_dataset([alpaca_record(ins)])
    assert ds[0]["instruction"] == "Say hi."


def test_broken_line_37_is_rejected_and_nothing_written(tmp_path):
    lines = [json.dumps(r) for r in alpaca_rows(100)]
    lines[36] = '{"instruction": "cut off'
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with Store.open_run(tmp_path / "run") as store:
        store.add_instructions([Instruction("Already here.")])
        with pytest.raises(UserError, match=r"bad.jsonl: line 37"):
            store.add_instructions(read_instructions(src))
        assert store.count_instructions() == 1
        report = ReadReport()
        kept = read_instructions(src, skip_bad=True, report=report)
        assert len(kept) == 99 and [line for line, _ in report.skipped] == [37]


def test_missing_instruction_key_names_line(tmp_path):
    src = tmp_path / "x.jsonl"
    write_jsonl(src, [{"instruction": "ok one"}, {"prompt": "wrong key"}])
    with pytest.raises(UserError, match="x.jsonl: line 2: missing key 'instruction'"):
        read_instructions(src)


def test_pools_responses_judgements_stages(tmp_path):
    with Store.open_run(tmp_path) as store:
        items = [Instruction(f"task {i} please do it") for i in range(5)]
        store.add_instructions(items)
        store.set_pool(1, "train", [i.id for i in items[:2]])
        store.set_pool(1, "cache", [i.id for i in items])
        assert store.pool(1, "train") == [items[0].id, items[1].id]
        store.add_response(Response(items[0].id, "teacher", "m", 1, "yes", "stop", 3, 1))
        assert store.responses("teacher", 1)[items[0].id].text == "yes"
        store.add_judgement(Judgement(items[0].id, 1, "A", "B", (9.0, 8.0), (4.0, 5.0)))
        j = store.judgements(1)[items[0].id]
        assert j.gap == 4.0 and j.orders_agree
        store.add_judgement(Judgement(items[1].id, 1, "?", "?", None, None, parse_failures=6, error="unparseable"))
        assert not store.judgements(1)[items[1].id].ok
        assert not store.stage_done(1, "imitation")
        store.finish_stage(1, "imitation", {"steps": 10})
        assert store.stage_done(1, "imitation")
        store.put_metrics(1, {"hard_ratio": 0.5})
        assert store.metrics() == {1: {"hard_ratio": 0.5}}


WRITER = textwrap.dedent("""
    import sys
    from lionkd.records import Instruction, Response
    from lionkd.store import Store
    store = Store.open_run(sys.argv[1])
    for i in range(100000):
        ins = Instruction(f"instruction number {i} with some words")
        store.add_instructions([ins])
        store.add_response(Response(ins.id, "teacher", "m", 0, "answer " * 20))
        print(ins.id, flush=True)
""")


def test_sigkill_mid_writes_loses_nothing_that_returned(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    returned = []
    assert proc.stdout is not None
    for line in proc.stdout:
        returned.append(line.strip())
        if len(returned) >= 150:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    returned += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
    with Store.open_run(tmp_path) as store:
        assert store.integrity_ok()
        stored = {i.id for i in store.instructions()}
        answered = store.responses("teacher", 0)
    assert set(returned) <= stored
    assert set(returned) <= set(answered)


def test_an_alpaca_size_seed_file_reads_in_linear_time(tmp_path):
    """52K rows like alpaca_data.json: reading them costs a small multiple of parsing the JSON alone (item
    line numbers counted from the file start for every item made this quadratic: minutes)."""
    import time

    rows = [{"instruction": f"Give three tips for staying healthy, number {i}.", "input": "" if i % 3 else f"ctx {i}",
             "output": "1. Eat a balanced diet. 2. Exercise. 3. Sleep well. " * 3} for i in range(52_000)]
    src = tmp_path / "alpaca_data.json"
    src.write_text(json.dumps(rows, indent=4))
    text = src.read_text()
    start = time.perf_counter()
    json.loads(text)
    parse = time.perf_counter() - start
    start = time.perf_counter()
    items = read_instructions(src)
    read = time.perf_counter() - start
    assert len(items) == 52_000 and items[-1].text == "Give three tips for staying healthy, number 51999."
    assert read < 100 * parse, (read, parse)
    rows[40_000]["instruction"] = 7  # the error still names the item's line
    src.write_text(json.dumps(rows, indent=4))
    with pytest.raises(UserError, match=rf"alpaca_data.json: line {2 + 40_000 * 5}: missing key 'instruction'"):
        read_instructions(src)


def test_a_bom_is_accepted_and_a_single_object_is_not_a_list(tmp_path):
    src = tmp_path / "seeds.json"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(alpaca_rows(3)).encode())
    assert len(read_instructions(src)) == 3
    src.write_text(json.dumps(alpaca_rows(1)[0], indent=2))
    with pytest.raises(UserError, match=r"seeds.json: expected a list of records .*got a single JSON object"):
        read_instructions(src)
    src.write_text(json.dumps(alpaca_rows(1)[0]) + "\n")  # one line of JSONL is a list of one
    assert len(read_instructions(src)) == 1
