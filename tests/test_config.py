import textwrap

import pytest

from conftest import run_cli
from lionkd.config import RunConfig, load_config
from lionkd.errors import UserError


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_short_config_gets_paper_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "seed: 3\n"))
    assert cfg.seed == 3
    assert cfg.teacher.temperature == 0.7 and cfg.referee.temperature == 0.2
    assert cfg.generator.temperature == 1.0
    assert cfg.lion.tau == 1.0 and cfg.lion.rouge_l_max == 0.7 and cfg.lion.hard_fraction == 0.5
    assert cfg.run_dir == tmp_path / "runs/lion"


def test_typo_names_key_and_suggests(tmp_path):
    path = write(tmp_path, """\
        teacher:
          model: gpt-4o-mini
          temprature: 0.3
        """)
    result = run_cli("config", "check", str(path))
    assert result.returncode == 2
    assert "temprature" in result.stderr and "did you mean 'temperature'" in result.stderr
    assert f"{path}:3" in result.stderr  # the line of the bad key
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_section_lists_valid_keys(tmp_path):
    with pytest.raises(UserError, match="unknown key 'lion.tua'.*did you mean 'tau'"):
        load_config(write(tmp_path, "lion:\n  tua: 2\n"))
    with pytest.raises(UserError, match="unknown key 'zzz'"):
        load_config(write(tmp_path, "zzz: 1\n"))


def test_wrong_type_names_key_and_expected_type(tmp_path):
    result = run_cli("config", "check", str(write(tmp_path, "referee:\n  max_tokens: lots\n")))
    assert result.returncode == 2
    assert "referee.max_tokens" in result.stderr and "must be an integer" in result.stderr


def test_missing_seed_file_names_the_path(tmp_path):
    result = run_cli("config", "check", str(write(tmp_path, "lion:\n  seed_pool: data/seeds.json\n")))
    assert result.returncode == 2
    assert str(tmp_path / "data/seeds.json") in result.stderr


def test_missing_config_and_bad_yaml(tmp_path):
    assert run_cli("config", "check", str(tmp_path / "nope.yaml")).returncode == 2
    bad = run_cli("config", "check", str(write(tmp_path, "teacher: [unclosed\n")))
    assert bad.returncode == 2 and "not valid YAML" in bad.stderr


def test_secret_never_printed(tmp_path):
    secret = "sk-test-SECRET"
    path = write(tmp_path, """\
        teacher: {backend: openai, model: gpt-4o-mini, api_key_env: OPENAI_API_KEY}
        referee: {backend: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: OPENAI_API_KEY}
        """)
    result = run_cli("config", "check", str(path), env={"OPENAI_API_KEY": secret})
    assert result.returncode == 0, result.stderr
    assert "OPENAI_API_KEY" in result.stdout
    for part in (secret, "SECRET", "sk-test"):
        assert part not in result.stdout and part not in result.stderr


@pytest.mark.parametrize("preset", ["demo", "api", "kd", "on-policy"])
def test_presets_are_valid_configs(tmp_path, preset):
    result = run_cli("init", "--preset", preset)
    assert result.returncode == 0
    path = write(tmp_path, result.stdout, f"{preset}.yaml")
    cfg = load_config(path, check_paths=False)
    assert isinstance(cfg, RunConfig)


def test_unknown_preset_is_a_user_error():
    result = run_cli("init", "--preset", "nope")
    assert result.returncode == 2 and "unknown preset" in result.stderr


def test_report_to_takes_known_trackers_that_are_installed(tmp_path):
    import importlib.util

    cfg = load_config(write(tmp_path, "student:\n  train:\n    report_to: [tensorboard]\n"))
    assert cfg.student.train.report_to == ["tensorboard"]
    with pytest.raises(UserError, match=r"student\.train\.report_to\.0"):
        load_config(write(tmp_path, "student:\n  train:\n    report_to: [tensorbored]\n"))
    if importlib.util.find_spec("wandb") is None:  # optional: then the key says how to get it
        with pytest.raises(UserError, match=r"student\.train\.report_to.*pip install wandb"):
            load_config(write(tmp_path, "student:\n  train:\n    report_to: [wandb]\n"))


# --------------------------------------------------------------------------- what a first hour of use finds


@pytest.mark.parametrize(("text", "message"), [
    ("student:\n  train:\n    learning_rate: .inf\n", r"student.train.learning_rate': Input should be a finite"),
    ("student:\n  train:\n    learning_rate: 1e30\n", r"student.train.learning_rate"),
    ("student:\n  train:\n    weight_decay: .inf\n", r"student.train.weight_decay"),
    ("student:\n  train:\n    epochs: .inf\n", r"student.train.epochs"),
    ("student:\n  train:\n    lr_scheduler: bogus\n", r"lr_scheduler': Input should be 'linear', 'cosine'"),
    ("lion:\n  hard_easy_ratio: 'nan:1'\n", r"hard_easy_ratio': both sides must be finite"),
    ("lion:\n  iterations: 1000000000\n", r"lion.iterations"),
    ("teacher:\n  base_url: http://127.0.0.1:99999/v1\n", r"teacher.base_url': the port of .* is not a port"),
    ("teacher:\n  base_url: 127.0.0.1:8000\n", r"teacher.base_url': must be an http\(s\) URL"),
    ("kd:\n  objective: {logit: 1.0}\n", r"kd.objective': unknown objective 'logit' \(did you mean 'logits'\?\)"),
    ("lion:\n  tau: 2\nseed: 1\nlion:\n  iterations: 2\n", r":4: .*key 'lion' is given twice \(lines 1 and 4\)"),
])
def test_implausible_values_are_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, text))


def test_the_schedules_offered_are_transformers_own():
    from typing import get_args

    from transformers.trainer_utils import SchedulerType

    from lionkd.config import LRScheduler

    assert set(get_args(LRScheduler)) <= {s.value for s in SchedulerType}


def test_a_pasted_key_is_refused_without_repeating_it(tmp_path):
    secret = "sk-proj-abc123DEF456ghi789"
    with pytest.raises(UserError, match="referee.api_key_env': must name an environment variable") as info:
        load_config(write(tmp_path, f"referee:\n  api_key_env: {secret}\n"))
    assert secret not in str(info.value)
    assert load_config(write(tmp_path, "referee:\n  api_key_env: MY_KEY_2\n")).referee.api_key_env == "MY_KEY_2"


def test_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfseed: 5\n")
    assert load_config(path).seed == 5


@pytest.mark.parametrize(("student", "message"), [
    ("./no/such/folder", r"student.model: model not found: ./no/such/folder"),
    ("{tmp}/notes.gguf", r"student.model: .*notes.gguf is not a GGUF file"),
    ("{tmp}", r"student.model: .* is not a model folder \(no config.json"),
])
def test_config_check_finds_student_mistakes_before_any_call(tmp_path, student, message):
    (tmp_path / "notes.gguf").write_text("just some text\n")
    path = write(tmp_path, f"student:\n  model: {student.format(tmp=tmp_path)}\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode == 2, result.stderr
    line = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(line) == 1 and "Traceback" not in result.stderr
    import re
    assert re.search(message, line[0]), line[0]


def test_fp16_on_a_cpu_and_a_prompt_without_placeholders_are_found_by_config_check(tmp_path):
    import torch

    from lionkd.lion.loop import check_config

    if not torch.cuda.is_available():
        cfg = load_config(write(tmp_path, "student:\n  train:\n    precision: fp16\n"))
        with pytest.raises(UserError, match="student.train.precision: fp16 needs a GPU"):
            check_config(cfg)
    cfg = load_config(write(tmp_path, "lion:\n  prompts:\n    referee: 'Judge {instruction} please'\n"))
    with pytest.raises(UserError, match=r"lion.prompts.referee: missing placeholder \{answer_1\}"):
        check_config(cfg)
