"""The call cache: a repeated call is never sent again, across batches, restarts and crashes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

from lionkd.llm.base import GenRequest
from lionkd.llm.cache import CachedLLM, call_key
from lionkd.llm.openai_backend import OpenAIBackend
from lionkd.store import Store
from llm_fakes import FakeOpenAI


def ask(content: str, **params) -> GenRequest:
    return GenRequest.chat([{"role": "user", "content": content}], **params)


def cached_llm(url: str, store: Store | None, role: str = "teacher") -> CachedLLM:
    return CachedLLM(OpenAIBackend("fake", base_url=url, backoff_base_s=0.01, max_retries=2), store, role=role)


def test_same_batch_twice_is_sent_once(tmp_path):
    batch = [ask(f"q{i}", temperature=0.7) for i in range(12)]
    with FakeOpenAI() as fake, Store(tmp_path / "run.sqlite") as store:
        first = cached_llm(fake.base_url, store).generate(batch, iteration=0)
        second = cached_llm(fake.base_url, store).generate(batch, iteration=1)
        assert fake.total == 12 and set(fake.hits.values()) == {1}
        assert [r.text for r in first] == [r.text for r in second]
        assert not any(r.cached for r in first) and all(r.cached for r in second)
        assert second[0].prompt_tokens == first[0].prompt_tokens
        assert second[0].completion_tokens == first[0].completion_tokens
        usage = store.usage()  # only iteration 0 paid
        assert [(u["iteration"], u["role"], u["calls"]) for u in usage] == [(0, "teacher", 12)]


def test_survives_a_restart(tmp_path):
    with FakeOpenAI() as fake:
        with Store(tmp_path / "run.sqlite") as store:
            cached_llm(fake.base_url, store).generate([ask("a"), ask("b")])
        with Store(tmp_path / "run.sqlite") as store:  # a new process would see the same file
            results = cached_llm(fake.base_url, store).generate([ask("a"), ask("b"), ask("c")])
        assert [r.cached for r in results] == [True, True, False]
        assert fake.hits == {"a": 1, "b": 1, "c": 1}


def test_samples_are_cached_one_by_one(tmp_path):
    with FakeOpenAI() as fake, Store(tmp_path / "run.sqlite") as store:
        llm = cached_llm(fake.base_url, store)
        three = llm.generate([ask("s", n=3)])[0]
        five = llm.generate([ask("s", n=5)])[0]
        assert [b["n"] for b in fake.bodies] == [3, 2]  # only the two missing samples were asked for
        assert [c.text for c in five.choices[:3]] == [c.text for c in three.choices]
        assert len(five.choices) == 5 and not five.cached
        assert llm.generate([ask("s", n=4)])[0].cached and fake.total == 2
        # a sample's key does not depend on n
        assert call_key("openai", "fake", ask("s", n=1), 0) == call_key("openai", "fake", ask("s", n=9), 0)
        assert call_key("openai", "fake", ask("s"), 0) != call_key("openai", "fake", ask("s", seed=1), 0)


def test_duplicates_in_one_batch_are_sent_once(tmp_path):
    with FakeOpenAI() as fake, Store(tmp_path / "run.sqlite") as store:
        results = cached_llm(fake.base_url, store).generate([ask("d"), ask("e"), ask("d"), ask("d", n=2)])
        assert fake.hits == {"d": 1, "e": 1}
        assert results[0].text == results[2].text == results[3].choices[0].text
        assert len(results[3].choices) == 2


def test_failures_are_recorded_not_cached(tmp_path):
    with FakeOpenAI({"x": ["400"]}) as fake, Store(tmp_path / "run.sqlite") as store:
        llm = cached_llm(fake.base_url, store, role="referee")
        assert llm.generate([ask("ok")])[0].ok
        failed = llm.generate([ask("x")], iteration=2)[0]
        assert not failed.ok and "HTTP 400" in failed.error
        assert [(u["role"], u["iteration"], u["failures"]) for u in store.usage() if u["failures"]] == [
            ("referee", 2, 1)]
        again = llm.generate([ask("x")], iteration=2)[0]
        assert again.ok and fake.hits["x"] == 2


def test_no_store_means_no_cache():
    with FakeOpenAI() as fake:
        llm = cached_llm(fake.base_url, None)
        llm.generate([ask("a")])
        llm.generate([ask("a")])
        assert fake.hits["a"] == 2


CHILD = textwrap.dedent("""
    import sys
    from lionkd.llm.base import GenRequest
    from lionkd.llm.cache import CachedLLM
    from lionkd.llm.openai_backend import OpenAIBackend
    from lionkd.store import Store

    url, run_dir, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = CachedLLM(OpenAIBackend("fake", base_url=url, concurrency=4, timeout_s=60), Store.open_run(run_dir),
                    role="teacher")
    llm.generate([GenRequest.chat([{"role": "user", "content": f"q{i}"}]) for i in range(count)], iteration=0)
""")


def stored_calls(path) -> int:
    if not path.exists():
        return 0
    with sqlite3.connect(path, timeout=30) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        except sqlite3.OperationalError:  # the child has not created the table yet
            return 0


def test_sigkill_mid_batch_then_rerun_resends_nothing_completed(tmp_path):
    count, done_before_kill = 30, 10
    run_dir = tmp_path / "run"
    with FakeOpenAI(hold_after=done_before_kill) as fake:  # the 11th reply on waits until release()
        child = subprocess.Popen([sys.executable, "-c", CHILD, fake.base_url, str(run_dir), str(count)])
        try:
            while stored_calls(run_dir / "run.sqlite") < done_before_kill:
                assert child.poll() is None, "the child ended before it was killed"
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
        hits_before = dict(fake.hits)
        assert stored_calls(run_dir / "run.sqlite") == done_before_kill

        fake.release()
        with Store.open_run(run_dir) as store:
            results = cached_llm(fake.base_url, store).generate([ask(f"q{i}") for i in range(count)], iteration=0)
            stored = {row["request"] for row in store._query("SELECT request FROM calls")}
        assert all(r.ok for r in results)
        assert sum(r.cached for r in results) == done_before_kill
        resent = {c for c in fake.hits if fake.hits[c] > hits_before.get(c, 0)}
        completed_first = {f"q{i}" for i in range(count) if results[i].cached}
        assert not resent & completed_first  # nothing completed before the crash was sent again
        assert fake.total - sum(hits_before.values()) == count - done_before_kill
        assert len(stored) == count
