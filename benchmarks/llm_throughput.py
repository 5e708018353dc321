"""Client throughput: lionkd's OpenAIBackend against an endpoint that answers after a fixed delay.

A local OpenAI-compatible server (uvicorn, in its own process, an async endpoint that sleeps 50 ms
and so is never the bottleneck) answers every request. lionkd's client sends the same batch at
concurrency 1, 8, 32 and 128; the ideal rate is concurrency / delay. A plain sequential loop over the
official SDK runs beside it for the ratio. CPU use of the client and the server process is reported
to show where a shortfall comes from on a small machine (client and server share its cores).

    python -m benchmarks.llm_throughput          (or: python benchmarks/llm_throughput.py)
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from _common import write_results
from lionkd.llm.base import GenRequest
from lionkd.llm.openai_backend import OpenAIBackend

DELAY_S = 0.05
REQUESTS = 256
SEQUENTIAL_REQUESTS = 64
CONCURRENCY = (1, 8, 32, 128)
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the server (own process)


def serve_delayed(port: int, delay_s: float = DELAY_S) -> None:
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    reply = {
        "id": "bench", "object": "chat.completion", "created": 0, "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "bench", "object": "model", "created": 0, "owned_by": "b"}]}

    @app.post("/v1/chat/completions")
    async def chat() -> dict:
        await asyncio.sleep(delay_s)
        return reply

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the clients


def _requests(tag: str, count: int) -> list[GenRequest]:
    return [GenRequest.chat([{"role": "user", "content": f"{tag} question {i}"}], max_tokens=4) for i in range(count)]


def run_lionkd(url: str, concurrency: int, server_pid: int) -> dict:
    backend = OpenAIBackend("bench", base_url=url, concurrency=concurrency, max_retries=0, timeout_s=30)

    async def batch() -> tuple[float, float, float, int]:
        await backend.agenerate(_requests(f"warm{concurrency}", concurrency))  # connections, first probe
        cpu0, srv0, t0 = time.process_time(), _cpu_seconds(server_pid), time.perf_counter()
        results = await backend.agenerate(_requests(f"c{concurrency}", REQUESTS))
        wall = time.perf_counter() - t0
        failed = sum(not r.ok for r in results)
        return wall, time.process_time() - cpu0, _cpu_seconds(server_pid) - srv0, failed

    wall, client_cpu, server_cpu, failed = asyncio.run(batch())
    rps = REQUESTS / wall
    ideal = concurrency / DELAY_S
    return {"concurrency": concurrency, "seconds": round(wall, 3), "rps": round(rps, 1), "ideal_rps": ideal,
            "pct_of_ideal": round(100 * rps / ideal, 1), "client_cpu_pct": round(100 * client_cpu / wall, 1),
            "server_cpu_pct": round(100 * server_cpu / wall, 1), "client_cpu_ms_per_request":
            round(1000 * client_cpu / REQUESTS, 2), "failed": failed}


def run_sequential_sdk(url: str) -> float:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "warm"}]
    client.chat.completions.create(model="bench", messages=messages, max_tokens=4)
    start = time.perf_counter()
    for i in range(SEQUENTIAL_REQUESTS):
        client.chat.completions.create(model="bench", messages=[{"role": "user", "content": f"seq {i}"}], max_tokens=4)
    return SEQUENTIAL_REQUESTS / (time.perf_counter() - start)


# --------------------------------------------------------------------------- the table


def main() -> dict:
    load = os.getloadavg()[0]  # other work on the machine, before ours starts
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.llm_throughput", "--serve", str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:  # wait until the server accepts connections
            try:
                httpx.get(f"{url}/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the benchmark server did not start") from None
                time.sleep(0.1)
        sequential = run_sequential_sdk(url)
        rows = [run_lionkd(url, c, server.pid) for c in CONCURRENCY]
    finally:
        server.terminate()
        server.wait(timeout=30)
    for row in rows:
        row["vs_sequential_sdk"] = round(row["rps"] / sequential, 1)

    print(f"\nlionkd OpenAIBackend vs an endpoint with {DELAY_S * 1000:.0f} ms latency, {REQUESTS} requests "
          f"({os.cpu_count()} CPU cores shared by client and server; load average {load:.1f})")
    print(f"plain sequential SDK loop: {sequential:.1f} req/s (ideal {1 / DELAY_S:.0f})\n")
    head = (f"{'concurrency':>11} {'req/s':>8} {'ideal':>7} {'% ideal':>8} {'x sequential':>13} {'client CPU':>11} "
            f"{'server CPU':>11} {'client ms/req':>14}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['concurrency']:>11} {r['rps']:>8.1f} {r['ideal_rps']:>7.0f} {r['pct_of_ideal']:>7.1f}% "
              f"{r['vs_sequential_sdk']:>12.1f}x {r['client_cpu_pct']:>10.0f}% {r['server_cpu_pct']:>10.0f}% "
              f"{r['client_cpu_ms_per_request']:>14.2f}")
    per_request = max(r["client_cpu_ms_per_request"] for r in rows)
    print(f"\nclient CPU per request up to {per_request:.1f} ms: one fully free core caps this client at about "
          f"{1000 / per_request:.0f} req/s")
    result = {"delay_s": DELAY_S, "requests": REQUESTS, "cpu_count": os.cpu_count(), "load_average": load,
              "sequential_sdk_rps": round(sequential, 1), "rows": rows}
    write_results("llm_throughput", result)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve_delayed(int(sys.argv[2]))
    else:
        main()
