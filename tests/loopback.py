"""Loopback helpers shared by the tests and benchmarks that start real servers (Ray, Serve, moto S3) on 127.0.0.1."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; the caller binds it next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
