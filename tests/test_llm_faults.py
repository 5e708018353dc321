"""OpenAIBackend against a scripted server: every request ends as a success or a recorded failure."""

from __future__ import annotations

import re
import time

import pytest

from conftest import closed_port
from lionkd.errors import UserError
from lionkd.llm.base import GenRequest
from lionkd.llm.cache import CachedLLM
from lionkd.llm.openai_backend import OpenAIBackend, _retry_after
from lionkd.llm.ratelimit import TokenBucket
from lionkd.store import Store
from llm_fakes import FakeOpenAI

SECRET = "sk-test-secret-0123456789"


def ask(content: str, **params) -> GenRequest:
    return GenRequest.chat([{"role": "user", "content": content}], **params)


def backend(url: str, **kw) -> OpenAIBackend:
    opts = {"api_key": SECRET, "timeout_s": 0.5, "max_retries": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
            "concurrency": 8} | kw
    return OpenAIBackend("fake-model", base_url=url, **opts)


def test_mixed_faults_end_as_successes_or_recorded_failures(tmp_path):
    plan: dict[str, list[str | None]] = {}
    for i, fault in enumerate(["429"] * 4 + ["500"] * 4 + ["503"] * 4 + ["stall"] * 4 + ["malformed"] * 4
                              + ["wrong"] * 2):
        plan[f"q{i}"] = [fault]
    plan["q22"] = plan["q23"] = ["503"] * 10  # never recovers
    plan["q24"] = ["400"]  # not worth retrying
    contents = [f"q{i}" for i in range(40)]
    with FakeOpenAI(plan) as fake, Store(tmp_path / "run.sqlite") as store:
        llm = CachedLLM(backend(fake.base_url), store, role="teacher")
        results = llm.generate([ask(c) for c in contents], iteration=0)

        assert len(results) == 40 and all(r is not None for r in results)
        for c, r in zip(contents, results, strict=True):
            if c in ("q22", "q23", "q24"):
                assert not r.ok and not r.choices
            else:
                assert r.ok and r.text == f"reply 0: {c}", (c, r.error)
        assert "HTTP 503" in results[22].error and "4 attempts" in results[22].error
        assert "HTTP 400" in results[24].error and "1 attempt" in results[24].error
        for i in range(22):
            assert fake.hits[f"q{i}"] == 2  # one fault, one retry
        assert fake.hits["q22"] == fake.hits["q23"] == 4  # 1 + max_retries
        assert fake.hits["q24"] == 1
        stats = llm.backend.stats
        assert stats["retries"] == 18 + 2 * 3  # a 429 with Retry-After is waited out, not retried
        assert stats["retry:timeout"] == 4 and stats["retry:malformed"] == 6 and stats["rate_limited"] == 4
        assert stats["ok"] == 37 and stats["failed"] == 3
        # the ledger has every success, the failures table every failure
        usage = store.usage()
        assert sum(u["calls"] for u in usage) == 37 and sum(u["failures"] for u in usage) == 3
        assert SECRET not in str(store._query("SELECT error FROM failures")[0][0])


def test_retry_after_is_honoured():
    with FakeOpenAI({"slow": ["429"]}, retry_after="0.3") as fake:
        result = backend(fake.base_url, backoff_base_s=0.001, backoff_max_s=0.001).generate([ask("slow")])[0]
        assert result.ok
        first, second = fake.arrivals["slow"]
        assert second - first >= 0.29


def test_a_rate_limit_is_waited_out_within_the_timeout_and_costs_no_attempt():
    with FakeOpenAI({"busy": ["429"] * 8}, retry_after="0.05") as fake:
        b = backend(fake.base_url, max_retries=1, timeout_s=2.0)
        result = b.generate([ask("busy")])[0]
        assert result.ok and fake.hits["busy"] == 9  # eight waits, then the answer; no attempt spent
        assert b.stats["rate_limited"] == 8 and b.stats["retries"] == 0 and b.stats.get("failed", 0) == 0
    with FakeOpenAI({"busy": ["429"] * 50}, retry_after="0.25") as fake:
        b = backend(fake.base_url, max_retries=1, timeout_s=1.0)
        b._verified = True  # an endpoint that has answered before
        result = b.generate([ask("busy")])[0]
        # past the timeout, a 429 is a failed attempt like any other: 1 s of waits, then two attempts
        assert not result.ok and "HTTP 429" in result.error and fake.hits["busy"] == 4 + 2


@pytest.mark.parametrize("fault", ["500", "malformed"])
def test_an_endpoint_that_fails_every_request_alike_stops_in_seconds(fault):
    with FakeOpenAI(lambda content, attempt: fault) as fake:
        b = backend(fake.base_url, max_retries=6, backoff_base_s=0.2, backoff_max_s=60.0)
        with pytest.raises(UserError, match=r"the first 3 attempts all failed the same way .*check base_url"):
            b.generate([ask(f"q{i}") for i in range(50)])
        # one request, three attempts (two short backoffs): not 50 requests of 7 attempts each
        assert fake.total == 3 and b.stats["retries"] == 2


def test_retry_after_formats():
    assert _retry_after({"retry-after": "2"}) == 2.0
    assert _retry_after({"retry-after-ms": "250"}) == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5))
    assert 3.5 <= _retry_after({"retry-after": date}) <= 5.01
    assert _retry_after({}) is None


def test_401_fails_the_batch_fast_without_the_key():
    with FakeOpenAI(lambda content, attempt: "401") as fake:
        llm = CachedLLM(backend(fake.base_url), None, role="teacher")
        with pytest.raises(UserError) as err:
            llm.generate([ask(f"q{i}") for i in range(20)])
        message = str(err.value)
        assert message.startswith("teacher: ") and "401" in message and "api_key_env" in message
        assert SECRET not in message
        assert fake.total == 1  # one probe, no retries, no volley
        assert fake.auth == [f"Bearer {SECRET}"]  # the key did go where it belongs


def test_404_unknown_model_fails_fast():
    with FakeOpenAI(lambda content, attempt: "404") as fake:
        with pytest.raises(UserError, match="not found \\(404\\).*model name"):
            backend(fake.base_url).generate([ask(f"q{i}") for i in range(5)])
        assert fake.total == 1


def test_client_errors_after_a_success_fail_one_request_without_retry():
    plan = {"bad-auth": ["401"], "forbidden": ["403"], "gone": ["404"]}
    with FakeOpenAI(plan) as fake:
        b = backend(fake.base_url)
        assert b.generate([ask("hello")])[0].ok
        results = b.generate([ask("bad-auth"), ask("forbidden"), ask("gone"), ask("fine")])
        assert [r.ok for r in results] == [False, False, False, True]
        assert "HTTP 403" in results[1].error
        assert fake.hits["bad-auth"] == fake.hits["forbidden"] == fake.hits["gone"] == 1


def test_connection_refused_is_retried_then_reported():
    b = backend(f"http://127.0.0.1:{closed_port()}/v1", max_retries=2)
    b._reachable = True  # as if the server went away after the probe reached it
    (result,) = b.generate([ask("anyone?")])
    assert not result.ok and "connection error" in result.error and "3 attempts" in result.error
    assert b.stats["retry:connection"] == 2


def test_a_dead_endpoint_fails_fast_with_one_error():
    b = backend(f"http://127.0.0.1:{closed_port()}/v1", max_retries=6, backoff_base_s=1.0, backoff_max_s=60.0)
    with pytest.raises(UserError, match="cannot reach the endpoint .*refused.*check base_url") as err:
        b.generate([ask(f"q{i}") for i in range(20)])
    # the probe's few quick tries only: no request was sent, so none of them waited out its backoffs
    assert b.stats["attempts"] == 0 and b.stats["retries"] == 0 and SECRET not in str(err.value)


def test_an_unknown_host_fails_fast():
    b = backend("http://no-such-host.invalid/v1")
    with pytest.raises(UserError, match="cannot reach the endpoint"):
        b.generate([ask("q")])


def test_the_probe_is_free_on_servers_without_a_model_list():
    with FakeOpenAI() as fake:  # answers 404 to GET /v1/models
        assert backend(fake.base_url).generate([ask("q")])[0].ok
        assert fake.total == 1


def test_most_requests_failing_alike_stop_the_batch_with_one_line():
    with FakeOpenAI(lambda content, attempt: None if content == "q0" else "503") as fake:
        b = backend(fake.base_url, max_retries=1, concurrency=4)
        with pytest.raises(UserError) as err:
            b.generate([ask(f"q{i}") for i in range(100)])
        message = str(err.value)
        assert "requests failed (HTTP 503" in message and "\n" not in message
        failed, finished = map(int, re.search(r"(\d+) of (\d+) requests failed", message).groups())
        assert failed >= 8 and 2 * failed > finished
        assert fake.total < 40  # stopped early: not 100 requests, each tried twice


def test_a_few_failures_do_not_stop_a_batch():
    with FakeOpenAI(lambda content, attempt: "400" if content.endswith("7") else None) as fake:
        results = backend(fake.base_url).generate([ask(f"q{i}") for i in range(60)])
        assert sum(not r.ok for r in results) == 6 and fake.total == 60


def test_concurrency_is_bounded_and_used():
    with FakeOpenAI(delay_s=0.05) as fake:
        b = backend(fake.base_url, concurrency=4)
        results = b.generate([ask(f"q{i}") for i in range(24)])
        assert all(r.ok for r in results)
        assert fake.max_in_flight == 4


def test_requests_per_minute_paces_requests():
    with FakeOpenAI() as fake:
        b = backend(fake.base_url, requests_per_minute=600)  # 10 per second
        b.request_bucket = TokenBucket(600, burst_s=0.1)  # a bucket of one: no initial burst
        start = time.monotonic()
        assert all(r.ok for r in b.generate([ask(f"q{i}") for i in range(6)]))
        assert time.monotonic() - start >= 0.45  # 5 waits of 0.1 s after the first


def test_token_bucket_reserves_fifo_and_corrects():
    now = [0.0]
    bucket = TokenBucket(60, burst_s=2, clock=lambda: now[0])  # 1 unit/s, capacity 2
    assert bucket.reserve(1) == 0 and bucket.reserve(1) == 0
    assert bucket.reserve(1) == pytest.approx(1.0)
    assert bucket.reserve(1) == pytest.approx(2.0)  # queued behind the previous caller
    now[0] = 10.0
    assert bucket.reserve(5) == 0  # bigger than the bucket: takes a full bucket
    bucket.correct(-2)  # refund
    assert bucket.reserve(2) == 0
