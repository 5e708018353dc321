"""`student.generation.server_command`: a model served by a child process for the length of one stage.

`ServedModel(command, model)` starts `command` (e.g. `vllm serve {model} --port {port}
--tensor-parallel-size 8`, or lionkd's own `serve`), waits until its OpenAI-compatible API answers,
and stops it on exit, so its GPU memory is free before the next training stage. The orchestrator
talks to it with the ordinary OpenAI backend: the student's bulk generation scales like any
endpoint. Placeholders: {model} (the model folder, also the name clients ask for), {port} (a free
port), {python} (this Python).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType

import httpx

from ..errors import UserError


class ServedModel:
    def __init__(self, command: str, model: str, *, start_timeout_s: float = 900.0) -> None:
        self.model = model
        self.start_timeout_s = start_timeout_s
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        try:
            self.argv = [part.format(model=model, port=self.port, python=sys.executable)
                         for part in shlex.split(command)]
        except (KeyError, IndexError, ValueError) as exc:
            raise UserError(f"student.generation.server_command: cannot fill in {command!r} ({exc}); "
                            "placeholders are {model}, {port}, {python}") from None
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ServedModel:
        self.log = tempfile.TemporaryFile()  # the server's output, shown only if it fails to start
        try:
            self.process = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # its own group: stopped with its children
        except OSError as exc:
            raise UserError(f"student.generation.server_command: cannot start {self.argv[0]} ({exc})") from None
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.process.poll() is not None:
                self._fail(f"exited with code {self.process.returncode} before serving")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self._fail(f"gave no answer on port {self.port} after {self.start_timeout_s:.0f} s")
            time.sleep(0.2)

    def _fail(self, what: str) -> None:
        """Stop the server and raise one line: what happened and the last line it printed."""
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        self.__exit__(None, None, None)
        raise UserError(f"student.generation.server_command {what}: {lines[-1][:300] if lines else '(no output)'}")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        self.log.close()

