"""Training stages on several processes (torchrun, gloo on CPU): the same model as one process over
several steps and epochs, a `distill` whose pseudo-targets rotate on every rank, and a whole Lion run
whose imitation stage runs as a 2-process job."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli, sandbox_run_config
from lionkd.config import TrainConfig, load_config
from lionkd.distill.pipeline import distill
from lionkd.kd.job import TrainJob
from lionkd.kd.train import train_student
from lionkd.llm.precision import PRECISION_META, pin_precision
from lionkd.store import Store
from test_kd_pipeline import build_teacher, write_config
from test_kd_trainer import examples, tiny_llama, tiny_tokenizer


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_processes_train_the_same_model_over_several_steps_and_epochs(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    tiny_llama(seed=3).save_pretrained(tmp_path / "teacher")  # word-level KD: its normalisation is per target token
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    data = examples(16)
    settings = TrainConfig(precision="fp32", epochs=2, batch_size=8, learning_rate=1e-2, lr_scheduler="constant",
                           warmup_ratio=0, max_length=32, processes=1)
    kd = {"teacher": tmp_path / "teacher", "objective": {"ce": 0.5, "logits": 0.5}, "template": "alpaca",
          "progress": False}
    one = train_student(TrainJob(base, data, tmp_path / "one", settings=settings, **kd))
    two = train_student(TrainJob(base, data, tmp_path / "two", settings=settings.model_copy(update={"processes": 2}), **kd))
    assert one["steps"] == two["steps"] == 4  # 16 examples, global batch 8, 2 epochs
    assert (tmp_path / "two" / "train_job.pkl").is_file()
    diff = max_difference(saved_weights(tmp_path / "one"), saved_weights(tmp_path / "two"))
    assert diff <= 1e-4, diff
    moved = max_difference(saved_weights(base), saved_weights(tmp_path / "one"))
    assert moved > 1e-3  # the comparison is between trained models, not two copies of the base


def test_distill_with_two_pseudo_targets_on_two_processes_reads_pt0_then_pt1_on_every_rank(tmp_path):
    path = write_config(tmp_path, build_teacher("llama", tmp_path / "teacher"), pt_method="sample", pt_count=2,
                        joint_alpha=0.5, final_ce_epochs=0)
    config = yaml.safe_load(path.read_text())
    config["student"]["train"]["processes"] = 2
    path.write_text(yaml.safe_dump(config))
    distill(load_config(path), progress=False)
    kd_stage = tmp_path / "run" / "student-kd"
    assert (kd_stage / "train_job.pkl").is_file()  # it did run as a 2-process job
    metrics = json.loads((kd_stage / "train_metrics.json").read_text())
    assert metrics["pseudo_targets_read"] == [[[0], [1]], [[0], [1]]]  # per rank, per epoch
    assert metrics["student_samples"]["generated"] > 0  # Joint-Teaching sampled on both ranks in step


def lion_config(path: Path, run_dir: Path, processes: int) -> Path:
    # precision is left at its default, auto: the orchestrator decides it once for every process
    train = {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0,
             "max_length": 64, "processes": processes}
    return sandbox_run_config(path, run_dir, train=train, seeds=48, new=16,
                              generation={"temperature": 0, "max_new_tokens": 16, "batch_size": 64})


def test_a_lion_run_with_two_training_processes_matches_one(tmp_path):
    runs, formats = {}, {}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a loaded machine: auto is timed on it
    try:
        for n in (1, 2):
            run_dir = tmp_path / f"run{n}"
            result = run_cli("run", str(lion_config(tmp_path / f"cfg{n}.yaml", run_dir, n)), "--no-progress",
                             "--no-report", timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            with Store.open_existing(run_dir) as store:
                runs[n] = {row["role"]: row["calls"] for row in store.usage() if row["iteration"] == 1}
                formats[n] = json.loads(store.get_meta(PRECISION_META))["student.train.precision"]
    finally:
        busy.kill()
        busy.wait()
    job = tmp_path / "run2" / "students" / "iter-1" / "train_job.pkl"
    assert job.is_file()  # it did run as a job
    assert formats[2] in ("fp32", "bf16") and pickle.loads(job.read_bytes()).settings.precision == formats[2]
    diff = max_difference(saved_weights(tmp_path / "run1" / "students" / "iter-1"),
                          saved_weights(tmp_path / "run2" / "students" / "iter-1"))
    assert diff <= 1e-4, diff
    assert runs[1] == runs[2]  # one orchestrator: every model call once, whatever the training processes


def test_auto_precision_is_decided_once_per_run_and_kept_by_every_later_stage(tmp_path, monkeypatch):
    import lionkd.llm.precision as precision

    with Store.open_run(tmp_path / "run") as store:
        monkeypatch.setattr(precision, "training_precision", lambda setting, key="": "bf16")
        assert pin_precision(store, "auto") == "bf16"
        # a rerun on a machine where the timing now says otherwise keeps what the run computed in
        monkeypatch.setattr(precision, "training_precision", lambda setting, key="": "fp32" if setting == "auto"
                            else setting)
        assert pin_precision(store, "auto") == "bf16"
        assert pin_precision(store, "fp32") == "fp32"  # a format the user names (an allowed config change) wins
        assert json.loads(store.get_meta(PRECISION_META)) == {"student.train.precision": "fp32"}
