"""A free TCP port for a rendezvous (torch.distributed's MASTER_PORT)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the OS says is free now; the caller binds it soon after (a small race that
    every launcher accepts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
