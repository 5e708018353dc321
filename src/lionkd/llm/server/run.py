"""Running the app: in a background thread (tests, the demo), or as `lionkd serve` for a model folder
and/or the sandbox world."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from ...errors import UserError
from ..base import Backend
from ..registry import backend_class
from .app import create_app


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, the demo); port 0 picks a free port.

    with ServerThread(create_app({"student": backend})) as server:
        OpenAIBackend("student", base_url=server.base_url)
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> None:
        self.host = host
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=1, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="lionkd-server", daemon=True)
        self.port = port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:  # uvicorn sets `started` once its sockets listen
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        sock: socket.socket = self.server.servers[0].sockets[0]
        self.port = sock.getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)


def serve(
    model_dir: str | None = None,
    *,
    sandbox: bool = False,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    template: str = "chat",
    dtype: str = "auto",
    device: str = "auto",
    batch_size: int = 16,
) -> None:
    """Serve a local model directory and/or the sandbox world until interrupted (`lionkd serve`)."""
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env: the environment variable ${api_key_env} is not set")
    sock = listen(host, port)  # before the model loads: a port in use is known in a moment, not after it
    try:
        models = build_models(model_dir, sandbox=sandbox, name=name, template=template, dtype=dtype, device=device,
                              batch_size=batch_size)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    auth = "bearer key required" if api_key else "no key required"
    print(f"serving {', '.join(models)} at http://{host}:{port}/v1 ({auth}); Ctrl-C stops", flush=True)
    config = uvicorn.Config(create_app(models, api_key), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything says "serving": a port in use is one line, not a uvicorn error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise UserError(f"--host: cannot resolve '{host}' ({exc.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a just-closed port is free
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"--port: {host}:{port} is already in use; stop what listens there or choose "
                            "another --port") from None
        raise UserError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build_models(
    model_dir: str | None, *, sandbox: bool = False, name: str | None = None, template: str = "chat",
    dtype: str = "auto", device: str = "auto", batch_size: int = 16,
) -> dict[str, Backend]:
    if model_dir is None and not sandbox:
        raise UserError("serve: give a MODEL_DIR, or --sandbox for the offline sandbox world")
    if template not in ("chat", "alpaca"):
        raise UserError(f"--template: '{template}' is not one of chat, alpaca")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype: '{dtype}' is not one of auto, float32, bfloat16, float16")
    models: dict[str, Backend] = {}
    if sandbox:
        world = backend_class("sandbox")
        models.update({m: world(m) for m in world.models})  # type: ignore[attr-defined]
    if model_dir is not None:
        from ..models import resolve_model_path, served_name

        path = resolve_model_path(model_dir)
        if path.startswith(("/", ".", "~")) and not Path(path).is_dir():
            raise UserError(f"MODEL_DIR: no such directory: {path}")
        served = name or served_name(model_dir, path)
        models[served] = backend_class("hf_streaming")(str(path), template=template, dtype=dtype,  # type: ignore[call-arg]
                                                       device=device, batch_size=batch_size)
    return models
