"""Ports for the processes the tests start on 127.0.0.1.

Under pytest-xdist each worker takes its ports from its own block of 1000, below Linux's ephemeral
range (32768 and up, where the OS places the ports it picks itself), so two workers never hand out
the same port, and a port is never one the OS just gave a connection.
"""
import itertools
import os
import socket

_BLOCK = 1000
_FIRST = 10000
_next = itertools.count()  # ports handed out by this worker, in turn through its block


def _block_start() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    return _FIRST + (int(worker) % 20 if worker.isdigit() else 0) * _BLOCK


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, of this worker's block."""
    start = _block_start()
    for _ in range(_BLOCK):
        port = start + next(_next) % _BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + _BLOCK - 1}")
