"""Run the app with uvicorn, on a host and port or on a socket already bound (tests bind port 0)."""

from __future__ import annotations

import socket

import uvicorn

from ..pipeline import Pipeline
from .app import ServerSettings, create_app, store_problem


def server(pipeline: Pipeline, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> uvicorn.Server:
    """A uvicorn server for the app; ``run()`` it, or ``run(sockets=[...])`` on a bound socket."""
    # On shutdown, streams still open get a few seconds, not the rest of a long generation.
    config = uvicorn.Config(
        create_app(pipeline, settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5
    )
    return uvicorn.Server(config)


def serve(pipeline: Pipeline, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C); refuses to start while the KV store is unreachable."""
    if problem := store_problem(pipeline):
        raise ValueError(f"{problem}; start the store, or pass another --store")
    server(pipeline, settings, host, port).run()


def loopback_socket() -> socket.socket:
    """A socket bound to a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock
