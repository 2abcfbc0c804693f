"""Run the app with uvicorn, on a host and port or on a socket already bound (tests bind port 0)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn

from ..pipeline import Pipeline
from .app import ServerSettings, create_app, store_problem


class _Server(uvicorn.Server):
    """uvicorn's server, calling ``on_listening`` once it listens: not before, so a port in use or a failed startup
    is all a caller says."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # exits the process on a failure, as uvicorn does
        if self.started and self._on_listening is not None:
            self._on_listening()


def server(
    pipeline: Pipeline,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_listening: Callable[[], None] | None = None,
) -> uvicorn.Server:
    """A uvicorn server for the app; ``run()`` it, or ``run(sockets=[...])`` on a bound socket."""
    # On shutdown, streams still open get a few seconds, not the rest of a long generation.
    config = uvicorn.Config(
        create_app(pipeline, settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5
    )
    return _Server(config, on_listening)


def serve(
    pipeline: Pipeline,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Serve until interrupted (Ctrl-C); refuses to start while the KV store is unreachable. ``on_listening`` is
    called once the server accepts connections (the command line says "serving ... on" there)."""
    if problem := store_problem(pipeline):
        raise ValueError(f"{problem}; start the store, or pass another --store")
    server(pipeline, settings, host, port, on_listening).run()


def loopback_socket() -> socket.socket:
    """A socket bound to a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock
