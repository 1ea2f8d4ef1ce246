"""Running `llmql serve`: in the foreground (`run_server`, the CLI) or in a background
thread of this process (`running`, for notebooks, tests and benchmarks)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from llmql.engine.server import ServerConfig, create_app


def run_server(model: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
               policy: str | None = None, config: ServerConfig | None = None) -> None:
    """Load `model` (see `llmql.engine.load`) and serve it until interrupted."""
    import uvicorn

    from llmql.engine import load

    engine = load(model, **({"policy": policy} if policy else {}))
    try:
        uvicorn.run(create_app(engine, config), host=host, port=port, log_level="info")
    finally:
        engine.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app: Any, *, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread until the block ends; yields its
    base URL ("http://HOST:PORT"; a free port unless `port` is given)."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
