"""The run report: built from a populated run store, checked as HTML and (where present) in Chromium."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from lionkd.eval.report import build_report, eval_markdown
from lionkd.records import Instruction, Judgement, Response
from lionkd.store import Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "input", "link", "col", "area", "base", "source", "wbr"}
SECRET = "sk-test-very-secret-value"


class Checker(HTMLParser):
    """Checks that tags nest properly and collects ids, headings and images."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: set[str] = set()
        self.images: list[str] = []
        self.h2: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"] or "")
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "h2":
            self._in_h2 = True
            self.h2.append("")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.h2[-1] += data


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REPORT_TEST_KEY", SECRET)
    run = tmp_path / "run"
    config = {
        "run_dir": str(run),
        "teacher": {"backend": "openai", "model": "gpt-x", "api_key_env": "REPORT_TEST_KEY",
                    "base_url": f"http://example.invalid/{SECRET}", "price": {"input": 1.0, "output": 2.0}},
        "referee": {"backend": "openai", "model": "gpt-x", "api_key_env": "REPORT_TEST_KEY",
                    "price": {"input": 1.0, "output": 2.0}},
        "generator": {"backend": "openai", "model": "gpt-y", "api_key_env": "REPORT_TEST_KEY"},
        "lion": {"iterations": 3, "tau": 1.0},
    }
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with Store.open_run(run) as store:
        seeds = [Instruction(text=f"Add {i} and {i + 1}. <b>&</b>", domain="math" if i % 2 else "text")
                 for i in range(6)]
        store.add_instructions(seeds)
        ids = [s.id for s in seeds]
        store.set_pool(0, "train", ids)
        store.set_pool(0, "cache", ids)
        for it in range(3):
            new = [Instruction(text=f"Generated task {it}-{k} about sums", origin="generated", iteration=it,
                               mode="hard" if k % 2 else "easy", domain="math") for k in range(2)]
            store.add_instructions(new)
            ids += [n.id for n in new]
            store.set_pool(it + 1, "train", [n.id for n in new])
            store.set_pool(it + 1, "cache", ids)
            for k, iid in enumerate(ids[:4]):
                store.add_response(Response(iid, "teacher", "gpt-x", it, f"teacher answer {k}"))
                store.add_response(Response(iid, "student", "tiny", it, f"student answer {k} </td>"))
                store.add_judgement(Judgement(iid, it, "Assistant 1: 8\nAssistant 2: 5", "Assistant 1: 6\n"
                                              "Assistant 2: 8", (8.0, 8.0), (5.0 + it, 6.0), parse_failures=k % 2))
            store.put_metrics(it, {
                "hard_ratio": 0.5 - 0.1 * it, "score_gap": 2.0 - 0.5 * it, "teacher_mean": 8.0,
                "student_mean": 6.0 + 0.5 * it, "order_agreement": 0.9, "novelty_rejections": 3 - it,
                "parse_failures": it, "accuracy": {"math": 0.2 + 0.1 * it, "text": 0.5 + 0.05 * it},
                "note": "free text",
            })
            for role, model, n in (("teacher", "gpt-x", 10), ("referee", "gpt-x", 8), ("generator", "gpt-y", 2)):
                for c in range(n):
                    store.put_call(f"{role}-{it}-{c}", backend="openai", model=model, request={"c": c},
                                   result={"text": "x"}, prompt_tokens=100, completion_tokens=50, role=role,
                                   iteration=it)
            store.put_failure("f", backend="openai", model="gpt-x", error="timeout", role="referee", iteration=it)
            for stage in ("imitation", "discrimination", "generation"):
                store.finish_stage(it, stage, {"items": 4})
    (run / "eval-final").mkdir()
    results = {
        "model": "runs/student", "examples": 4,
        "task_metrics": {"overall": {"bleu": 12.5, "rouge1": 40.0, "exact_match": 25.0},
                         "per_category": {"math": {"examples": 2, "bleu": 10.0, "rouge1": 30.0, "exact_match": 0.0}}},
        "judge": {"questions": 4, "judged": 3, "unparseable": 1, "parse_failures": 3, "relative_score": 87.5,
                  "candidate_mean": 7.0, "reference_mean": 8.0, "wins": 1, "ties": 0, "losses": 2,
                  "order_agreement": 2 / 3,
                  "per_category": {"math": {"relative_score": 80.0, "judged": 2},
                                   "text": {"relative_score": 100.0, "judged": 1}}},
    }
    (run / "eval-final" / "eval.json").write_text(json.dumps(results), encoding="utf-8")
    return run


def test_report_has_every_section_and_embeds_png_plots(run_dir: Path) -> None:
    html_path, md_path = build_report(run_dir)
    text = html_path.read_text(encoding="utf-8")
    checker = Checker()
    checker.feed(text)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    for anchor in ("dynamics", "verdicts", "pools", "usage", "stages", "config", "eval-eval-final-eval-json"):
        assert anchor in checker.ids, anchor
    assert "Learning dynamics" in checker.h2 and "Calls, tokens and cost" in checker.h2
    # accuracy, scores, rates, counts, tokens per role, judge per category
    assert len(checker.images) >= 6
    for src in checker.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    # user text is escaped, secrets never shown, prices applied: teacher 30 calls x (100 in, 50 out) at $1/$2 per 1M
    assert "<b>&</b>" not in text and "&lt;b&gt;&amp;&lt;/b&gt;" in text
    assert SECRET not in text and SECRET not in md_path.read_text(encoding="utf-8")
    assert "0.006" in text  # teacher: 30 * (100 * 1 + 50 * 2) / 1e6
    assert "accuracy[math]" in text and "87.5" in text
    md = md_path.read_text(encoding="utf-8")
    assert "## Learning dynamics" in md and "| hard_ratio |" in md
    for line in md.splitlines():
        if line.startswith("!["):
            assert (run_dir / line.split("](")[1].rstrip(")")).is_file()


def test_report_of_a_bare_store_still_renders(tmp_path: Path) -> None:
    Store.open_run(tmp_path).close()
    html_path, _ = build_report(tmp_path)
    checker = Checker()
    checker.feed(html_path.read_text(encoding="utf-8"))
    assert checker.errors == [] and "usage" in checker.ids and checker.images == []


def test_eval_markdown_lists_metrics() -> None:
    md = eval_markdown({"examples": 2, "task_metrics": {"overall": {"bleu": 1.5}}, "judge": {"relative_score": 90.0}})
    assert "| all | 2 | 1.5 |" in md and "90" in md


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed")
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    html_path, _ = build_report(run_dir)
    shot = tmp_path / "shot.png"
    cmd = [str(shutil.which(str(CHROMIUM)) or CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--no-first-run", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400", f"--screenshot={shot}",
           html_path.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000  # a blank page compresses to a few KB
