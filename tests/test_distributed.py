"""Training stages on several processes (torchrun, gloo on CPU): the same model as one process, pseudo-
targets rotating on every rank, and a whole Lion run whose imitation stage runs as a 2-process job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import run_cli, sandbox_run_config
from lionkd.config import TrainConfig
from lionkd.kd.data import TrainExample
from lionkd.kd.trainer import build_trainer, train_student
from lionkd.store import Store
from test_kd_trainer import examples, tiny_llama, tiny_tokenizer

MODULE = Path(__file__).resolve()


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_processes_train_the_same_model_over_several_steps_and_epochs(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    data = examples(16)
    settings = TrainConfig(precision="fp32", epochs=2, batch_size=8, learning_rate=1e-2, lr_scheduler="constant",
                           warmup_ratio=0, max_length=32, processes=1)
    one = train_student(base, data, tmp_path / "one", settings=settings, template="alpaca", progress=False)
    two = train_student(base, data, tmp_path / "two", settings=settings.model_copy(update={"processes": 2}),
                        template="alpaca", progress=False)
    assert one["steps"] == two["steps"] == 4  # 16 examples, global batch 8, 2 epochs
    assert (tmp_path / "two" / "train_job.pkl").is_file()
    diff = max_difference(saved_weights(tmp_path / "one"), saved_weights(tmp_path / "two"))
    assert diff <= 1e-4, diff
    moved = max_difference(saved_weights(base), saved_weights(tmp_path / "one"))
    assert moved > 1e-3  # the comparison is between trained models, not two copies of the base


def _rotation_main(out: str) -> None:
    """Under torchrun, 2 processes: K = 2 pseudo-targets per input, 2 epochs; record what each rank reads."""
    tok = tiny_tokenizer()
    prompts = [e.prompt for e in examples(8)]
    per_epoch = [[TrainExample(prompt=p, target=f"{word} {word}") for p in prompts] for word in ("one", "two")]
    settings = TrainConfig(precision="fp32", epochs=2, batch_size=8, learning_rate=1e-3, max_length=32, processes=1)
    trainer = build_trainer(tiny_llama(), per_epoch, Path(out) / "rot", settings=settings, tokenizer=tok,
                            template="alpaca", progress=False)
    seen: dict[int, set[str]] = {}
    compute = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):  # noqa: ANN001
        epoch = int(trainer.state.epoch or 0)
        words = {tok.decode(f["target"][:1]) for f in inputs["features"]}
        seen.setdefault(epoch, set()).update(words)
        return compute(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    trainer.train()
    rank = os.environ["RANK"]
    (Path(out) / f"seen-{rank}.json").write_text(json.dumps({k: sorted(v) for k, v in seen.items()}))


def torchrun(*args: str, out: Path) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(MODULE), *args, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(MODULE.parent)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_pseudo_targets_rotate_on_every_rank(tmp_path):
    result = torchrun("rotation", out=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in ("0", "1"):
        seen = json.loads((tmp_path / f"seen-{rank}.json").read_text())
        assert seen == {"0": ["one"], "1": ["two"]}, (rank, seen)


def lion_config(path: Path, run_dir: Path, processes: int) -> Path:
    train = {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0,
             "max_length": 64, "precision": "fp32", "processes": processes}
    return sandbox_run_config(path, run_dir, train=train, seeds=48, new=16,
                              generation={"temperature": 0, "max_new_tokens": 16, "batch_size": 64})


def test_a_lion_run_with_two_training_processes_matches_one(tmp_path):
    runs = {}
    for n in (1, 2):
        run_dir = tmp_path / f"run{n}"
        result = run_cli("run", str(lion_config(tmp_path / f"cfg{n}.yaml", run_dir, n)), "--no-progress",
                         "--no-report", timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        with Store.open_existing(run_dir) as store:
            runs[n] = {row["role"]: row["calls"] for row in store.usage() if row["iteration"] == 1}
    assert (tmp_path / "run2" / "students" / "iter-1" / "train_job.pkl").is_file()  # it did run as a job
    diff = max_difference(saved_weights(tmp_path / "run1" / "students" / "iter-1"),
                          saved_weights(tmp_path / "run2" / "students" / "iter-1"))
    assert diff <= 1e-4, diff
    assert runs[1] == runs[2]  # one orchestrator: every model call once, whatever the training processes


if __name__ == "__main__":
    {"rotation": _rotation_main}[sys.argv[1]](sys.argv[2])
