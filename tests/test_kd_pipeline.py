"""`lionkd distill` end to end on tiny models, its resumption after SIGKILL, config errors, `lionkd prune`,
and logit KD from a local teacher in the Lion imitation stage."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
)

import llm_fakes as fakes
from conftest import run_cli
from lionkd.config import load_config
from lionkd.distill.pipeline import distill
from lionkd.errors import UserError
from lionkd.kd.prune import prune_layers
from lionkd.kd.train import run_name
from lionkd.report.build import build_report
from lionkd.store import Store
from report_checks import check_report, parse

WORDS = ["cat", "dog", "bird", "fish", "red", "blue", "green", "big", "small", "one", "two", "three", "runs", "sits",
         "eats", "sleeps", "park", "house", "tree", "car"]
ANSWER = "answer"  # ends every rendered prompt of the decoder-only model


# a short chat template keeps decoder-only prompts to a few tokens; a reply ends with EOS
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                 "{{ eos_token }}{% endif %} {% endfor %}" + ANSWER)
tiny_tokenizer = partial(fakes.tiny_tokenizer, CHAT_TEMPLATE, words=[*WORDS, ANSWER])


def build_teacher(family: str, out: Path) -> Path:
    tok = tiny_tokenizer()
    ids = {"pad_token_id": 0, "eos_token_id": 2}
    if family == "t5":
        model = fakes.tiny_t5(len(tok), layers=4, decoder_start_token_id=0, dropout_rate=0.0, **ids)
    else:
        model = fakes.tiny_llama(len(tok), layers=4, kv_heads=4, max_positions=64, bos_token_id=1, **ids)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {family: build_teacher(family, root / family) for family in ("t5", "llama")}


def task_row(i: int) -> tuple[str, str]:
    """A toy task: three words in, the same words reversed out."""
    words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3)]
    return " ".join(words), " ".join(reversed(words))


def write_data(folder: Path, labeled: int = 12, unlabeled: int = 8, evaluation: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [task_row(i) for i in range(labeled + unlabeled + evaluation)]
    with (folder / "labeled.jsonl").open("w") as f:
        for source, target in rows[:labeled]:
            f.write(json.dumps({"source": source, "summary": target}) + "\n")
    with (folder / "unlabeled.jsonl").open("w") as f:
        for source, _ in rows[labeled : labeled + unlabeled]:
            f.write(json.dumps({"text": source}) + "\n")
    with (folder / "eval.csv").open("w") as f:
        f.write("source,summary\n")
        for source, target in rows[labeled + unlabeled :]:
            f.write(f"{source},{target}\n")


def write_config(folder: Path, teacher: Path, **kd: object) -> Path:
    write_data(folder)
    config = {
        "run_dir": "run",
        "seed": 0,
        "teacher": {"backend": "hf", "model": str(teacher), "api_key_env": None, "batch_size": 4, "device": "cpu"},
        "student": {
            "model": str(teacher),
            "train": {"epochs": 2, "learning_rate": 3e-3, "batch_size": 8, "max_length": 32, "warmup_ratio": 0.0,
                      "logging_steps": 1, "save_steps": 2},
            "generation": {"batch_size": 8},
        },
        "kd": {
            "labeled": {"path": "labeled.jsonl", "input_column": "source", "target_column": "summary"},
            "unlabeled": {"path": "unlabeled.jsonl", "input_column": "text"},
            "eval": {"path": "eval.csv", "input_column": "source", "target_column": "summary"},
            "student_init": "pruned",
            "pt_max_new_tokens": 6,
            "eval_num_beams": 2,
            "eval_max_new_tokens": 6,
            "final_ce_epochs": 1,
            **kd,
        },
    }
    path = folder / "distill.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stage_names(store: Store) -> list[str]:
    return [s["stage"] for s in store.stages()]


CASES = {
    # encoder-decoder, one beam-search PT, a fine-tuned teacher, Joint-Teaching
    "t5-beam": ("t5", {"pt_method": "beam", "pt_count": 1, "joint_alpha": 0.5, "teacher_finetune": True,
                       "teacher_train": {"epochs": 1, "learning_rate": 3e-3, "batch_size": 8, "max_length": 32}}),
    # decoder-only, K sampled PTs, Joint-Teaching
    "llama-sample": ("llama", {"pt_method": "sample", "pt_count": 2, "joint_alpha": 0.5}),
    # decoder-only, the K best beams as PTs, teacher top-k cached once, a randomly initialised student
    "llama-kbeams": ("llama", {"pt_method": "beam", "pt_count": 2, "teacher_topk": 4, "final_ce_epochs": 0,
                               "student_init": "config"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_distill_end_to_end(tmp_path: Path, teachers: dict[str, Path], case: str) -> None:
    family, kd = CASES[case]
    path = write_config(tmp_path, teachers[family], **kd)
    tracked = case == "llama-sample"
    if tracked:  # training logs also go to TensorBoard, named for iteration and stage
        data = yaml.safe_load(path.read_text())
        data["student"]["train"]["report_to"] = ["tensorboard"]
        path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    summary = distill(cfg, progress=False)
    run = cfg.run_dir

    expected = ["data", *(["teacher_finetune"] if kd.get("teacher_finetune") else []), "student_init",
                "pseudo_targets", "kd_train", *(["final_ce"] if kd.get("final_ce_epochs", 1) else []),
                "eval_student", "eval_teacher"]
    with Store.open_existing(run) as store:
        assert stage_names(store) == expected
        details = {s["stage"]: s["detail"] for s in store.stages()}
        pts = store.pseudo_targets()
        metrics = store.metrics()[0]
    assert summary.ran == expected and summary.skipped == []

    # PTs: K per distinct input (12 labeled + 8 unlabeled), with provenance
    k = kd["pt_count"]
    assert len(pts) == 20 * k and {p.index for p in pts} == set(range(k))
    assert {p.method for p in pts} == {kd["pt_method"]}
    teacher_name = str(teachers[family]) + (" (fine-tuned)" if kd.get("teacher_finetune") else "")
    assert {p.teacher for p in pts} == {teacher_name}
    if kd["pt_method"] == "beam":
        assert all(p.params["num_beams"] >= k and p.params["do_sample"] is False for p in pts)
    else:
        assert all(p.params["do_sample"] and p.params["temperature"] == 1.0 and p.params["top_p"] == 0.95 for p in pts)
    assert details["pseudo_targets"]["generated"] == 20 * k and details["pseudo_targets"]["reused"] == 0

    # KD training followed the PT schedule: K epoch lists of gold + one PT per input
    train = details["kd_train"]
    assert train["epoch_lists"] == k and train["examples_per_epoch"] == 12 + 20
    assert train["steps"] > 0 and train["objective"] == {"logits": 1.0}
    assert train["pseudo_targets_read"] == [[[epoch % k] for epoch in range(2)]]  # one process, 2 epochs
    if kd.get("joint_alpha"):
        assert train["student_samples"]["generated"] > 0
    assert json.loads((run / "student-kd" / "train_metrics.json").read_text())["objective"] == {"logits": 1.0}

    # a pruned student keeps the teacher's first and last decoder layers; it loads and generates
    pruned = kd.get("student_init", "pruned") == "pruned"
    assert details["student_init"]["init"] == kd.get("student_init", "pruned")
    if pruned:
        assert details["student_init"]["kept"] == [0, 3]
    loader = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    student = loader.from_pretrained(summary.student)
    layers = student.config.num_decoder_layers if family == "t5" else student.config.num_hidden_layers
    assert layers == (2 if pruned else 4)
    assert summary.student == run / ("student" if kd.get("final_ce_epochs", 1) else "student-kd")
    ids = torch.tensor([[4, 5, 6]])
    out = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=0)
    assert out.shape[1] > (1 if family == "t5" else 3)

    # evaluation: both models, every metric, in eval.json, the store and the report
    results = json.loads((run / "eval.json").read_text())
    overall = results["task_metrics"]["overall"]
    for name in ("bleu", "rouge1", "rouge2", "rougeL", "rouge_mean", "exact_match", "perplexity"):
        assert isinstance(overall[name], float) and isinstance(results["teacher"][name], float)
    assert overall["examples"] == 4 and overall["perplexity"] > 1
    assert metrics["student_rouge_mean"] == overall["rouge_mean"] and "teacher_bleu" in metrics
    assert (run / "eval.md").is_file() and len((run / "predictions-student.jsonl").read_text().splitlines()) == 4
    assert "student:" in summary.line() and "teacher:" in summary.line()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["kd"]["pt_method"] == kd["pt_method"]
    html, _ = build_report(run)
    assert "Pseudo-targets" in html.read_text() and "rouge_mean" in html.read_text()
    if tracked:
        check_distill_outputs(run, html, tmp_path, k)

    # a rerun finds every stage done and does nothing again
    again = distill(load_config(tmp_path / "distill.yaml"), progress=False)
    assert again.ran == [] and again.skipped == expected
    assert again.student_metrics == summary.student_metrics
    with Store.open_existing(run) as store:
        assert len(store.pseudo_targets()) == 20 * k


def check_distill_outputs(run: Path, html: Path, tmp_path: Path, k: int) -> None:
    """The report, `lionkd status` and `lionkd export` of a distill run, and its TensorBoard logs."""
    page = parse(html)
    assert page.h2[:4] == ["Headline", "Pseudo-targets", "Training", "Student vs teacher"], page.h2
    text = html.read_text()
    assert str(run / "student") in text and "of it)" in text  # the student's metrics as a share of the teacher's
    check_report(html, tmp_path / "profile", {"training-loss", "versus"}, hard_set=False)
    curve = json.loads((run / "student-kd" / "train_metrics.json").read_text())["loss_history"]
    assert len(curve) == json.loads((run / "student-kd" / "train_metrics.json").read_text())["steps"]
    for stage in ("student-kd", "student"):
        assert list((run / stage / "tensorboard").glob("events.out.tfevents.*")), stage
    assert run_name(run / "student-kd") == "run/iteration-0/kd_train"

    status = run_cli("status", str(run))
    assert status.returncode == 0, status.stderr
    assert "Distill run" in status.stdout and "kd_train" in status.stdout and "instructions" not in status.stdout
    out = tmp_path / "pts.jsonl"
    export = run_cli("export", str(run), "--out", str(out), "--format", "chat")
    assert export.returncode == 0, export.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 20 * k and f"wrote {20 * k} records" in export.stdout
    assert all(r["messages"][0]["role"] == "user" and r["messages"][-1]["role"] == "assistant" for r in records)
    wrong = run_cli("export", str(run), "--out", str(tmp_path / "x.jsonl"), "--role", "student")
    assert wrong.returncode == 2 and "pseudo-targets" in wrong.stderr and "Traceback" not in wrong.stderr


def test_sampled_pts_differ_per_input(tmp_path: Path, teachers: dict[str, Path]) -> None:
    """K sampled PTs of one input are separate draws; beam PTs of one input are distinct beams."""
    from lionkd.distill.pipeline import generate_pts
    from lionkd.distill.task_data import load_task_data

    cfg = load_config(write_config(tmp_path, teachers["llama"], pt_method="sample", pt_count=3, pt_max_new_tokens=8))
    data = load_task_data(cfg)
    with Store.open_run(cfg.run_dir) as store:
        generate_pts(cfg, store, data.pt_inputs(), progress=False)
        by_input: dict[str, list[str]] = {}
        for p in store.pseudo_targets():
            by_input.setdefault(p.input_id, []).append(p.text)
    assert len(by_input) == 20 and all(len(v) == 3 for v in by_input.values())
    assert sum(len(set(v)) > 1 for v in by_input.values()) >= 10  # an untrained teacher samples widely


def test_eval_rows_held_out_of_labeled_data(tmp_path: Path, teachers: dict[str, Path]) -> None:
    from lionkd.distill.task_data import load_task_data

    config = write_config(tmp_path, teachers["llama"], eval_holdout=0.25)
    data = yaml.safe_load(config.read_text())
    data["kd"]["eval"] = None
    data["kd"]["labeled"]["limit"] = 8
    config.write_text(yaml.safe_dump(data))
    task = load_task_data(load_config(config))
    assert len(task.labeled) == 6 and len(task.eval) == 2 and task.eval_source == "held out from kd.labeled"
    assert not {e.id for e in task.eval} & {e.id for e in task.labeled}
    assert load_task_data(load_config(config)).fingerprint == task.fingerprint  # the same slice every run
    assert len(task.pt_inputs()) == 6 + 8 and all(x.target == "" for x in task.pt_inputs())


def _store_state(db: Path) -> tuple[int, list[str]]:
    if not db.exists():
        return 0, []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            count = con.execute("SELECT COUNT(*) FROM pseudo_targets").fetchone()[0]
            stages = [r[0] for r in con.execute("SELECT stage FROM stages")]
        return count, stages
    except sqlite3.OperationalError:  # the schema is still being created
        return 0, []


def test_distill_resumes_after_sigkill(tmp_path: Path, teachers: dict[str, Path]) -> None:
    # one input per PT batch: the kill lands while PTs are being generated, or soon after
    config = write_config(tmp_path, teachers["llama"], pt_method="sample", pt_count=2, joint_alpha=0.0)
    data = yaml.safe_load(config.read_text())
    data["teacher"]["batch_size"] = 1
    config.write_text(yaml.safe_dump(data))
    db = tmp_path / "run" / "run.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lionkd", "distill", str(config), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        while _store_state(db)[0] == 0:  # wait for the first committed PT batch
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with Store.open_existing(tmp_path / "run") as store:
        at_kill = {p.id: p.text for p in store.pseudo_targets()}
        stages_at_kill = {s["stage"]: s["finished_at"] for s in store.stages()}
    assert at_kill and "eval_student" not in stages_at_kill

    result = run_cli("distill", str(config), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("distilled | student:")
    with Store.open_existing(tmp_path / "run") as store:
        stages = {s["stage"]: s for s in store.stages()}
        pts = {p.id: p.text for p in store.pseudo_targets()}
    # stages finished before the kill were not run again; the others finished now
    for name, finished_at in stages_at_kill.items():
        assert stages[name]["finished_at"] == finished_at
    assert list(stages) == ["data", "student_init", "pseudo_targets", "kd_train", "final_ce", "eval_student",
                            "eval_teacher"]
    # stored PTs were kept as they were, the missing ones generated once
    assert len(pts) == 40 and all(pts[i] == text for i, text in at_kill.items())
    detail = stages["pseudo_targets"]["detail"]
    if "pseudo_targets" not in stages_at_kill:
        assert detail["reused"] == len(at_kill) and detail["generated"] == 40 - len(at_kill)
    assert (tmp_path / "run" / "eval.json").is_file()


def test_config_mistakes_are_one_line_errors(tmp_path: Path, teachers: dict[str, Path]) -> None:
    config = write_config(tmp_path, teachers["llama"])
    data = yaml.safe_load(config.read_text())

    def broken(mutate) -> Path:  # noqa: ANN001
        changed = json.loads(json.dumps(data))
        mutate(changed)
        path = tmp_path / "broken.yaml"
        path.write_text(yaml.safe_dump(changed))
        return path

    # through the command: exit 2 and one line naming the key
    for mutate, expected in [
        (lambda d: d["kd"].update(pt_metod="beam"), ("kd.pt_metod", "did you mean 'pt_method'")),
        (lambda d: d["kd"]["labeled"].update(path="missing.jsonl"), ("kd.labeled", "missing.jsonl", "not found")),
    ]:
        result = run_cli("distill", str(broken(mutate)), "--no-progress")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert all(text in lines[0] for text in expected), lines[0]
    # the same checks in process
    for mutate, expected in [
        (lambda d: d["kd"]["unlabeled"].update(input_column="body"), "kd.unlabeled: .*missing column 'body'"),
        (lambda d: d["kd"]["eval"].update(path=None), "kd.eval.path"),
        (lambda d: d["teacher"].update(backend="openai"), "teacher.backend"),
        (lambda d: d["kd"].update(objective={"logit": 1.0}), "key 'kd.objective': unknown objective 'logit'"),
        (lambda d: (d["student"].update(model="./nowhere"), d["kd"].update(student_init="pretrained")),
         "student.model: model not found: .*a hub id like org/name or one of: smollm2-135m-instruct"),
    ]:
        with pytest.raises(UserError, match=expected) as info:
            distill(load_config(broken(mutate)), progress=False)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_prune_command(tmp_path: Path, teachers: dict[str, Path]) -> None:
    result = run_cli("prune", str(teachers["t5"]), str(tmp_path / "pruned"), "--keep", "0,-1", "--encoder-keep",
                     "even:3")
    assert result.returncode == 0, result.stderr
    assert "layers kept: [0, 3]" in result.stdout and "encoder layers kept: [0, 2, 3]" in result.stdout
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "pruned")
    assert model.config.num_decoder_layers == 2 and model.config.num_layers == 3
    bad = run_cli("prune", str(teachers["llama"]), str(tmp_path / "bad"), "--keep", "0,9")
    assert bad.returncode == 2 and "layer 9 does not exist" in bad.stderr
    before = sorted((p.name, p.stat().st_size) for p in teachers["llama"].iterdir())
    onto_itself = run_cli("prune", str(teachers["llama"]), str(teachers["llama"]))
    assert onto_itself.returncode == 2 and "is the model being pruned" in onto_itself.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    into_busy = run_cli("prune", str(teachers["llama"]), str(tmp_path / "busy"))
    assert into_busy.returncode == 2 and "is not empty" in into_busy.stderr
    assert sorted((p.name, p.stat().st_size) for p in teachers["llama"].iterdir()) == before  # nothing touched
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    with pytest.raises(UserError, match="^prune: model not found: smollm2-360m .*one of: smollm2-135m-instruct"):
        prune_layers("smollm2-360m", tmp_path / "never")  # a name lionkd does not know: the names it does


@pytest.mark.parametrize("backend", ["hf", "sandbox"])
def test_lion_imitation_uses_a_local_teacher_for_logit_kd(tmp_path: Path, teachers: dict[str, Path],
                                                          backend: str) -> None:
    """Lion + KD: with `teacher.backend: hf` the imitation stage trains with logit KD from that teacher."""
    from lionkd.config import RunConfig
    from lionkd.lion.imitation import train
    from lionkd.lion.students import student_dir
    from lionkd.records import Instruction, Response

    teacher = str(teachers["llama"])
    cfg = RunConfig.model_validate({
        "run_dir": str(tmp_path / "run"),
        "teacher": {"backend": backend, "model": teacher if backend == "hf" else "teacher", "api_key_env": None},
        "student": {"model": teacher, "train": {"max_steps": 2, "batch_size": 4, "max_length": 32,
                                                "learning_rate": 1e-3}},
    })
    instructions = [Instruction(text=task_row(i)[0]) for i in range(6)]
    answers = {ins.id: Response(instruction_id=ins.id, role="teacher", model="t", iteration=1,
                                text=task_row(i)[1]) for i, ins in enumerate(instructions)}
    with Store.open_run(cfg.run_dir) as store:
        info = train(cfg, store, instructions, answers, 1, show_progress=False)
    saved = json.loads((student_dir(cfg, 1) / "train_metrics.json").read_text())
    assert info["logit_kd"] is (backend == "hf")
    assert saved["objective"] == ({"logits": 1.0} if backend == "hf" else {"ce": 1.0})
    assert saved["steps"] == 2
