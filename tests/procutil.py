"""Helpers every test directory needs for real servers and processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket


def free_port(host: str = "127.0.0.1", *, udp_too: bool = False) -> int:
    """A port free on ``host`` (checked, not guaranteed); with ``udp_too`` free
    for both TCP and UDP, for servers that listen on both (SIP, DNS)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            if not udp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode
