"""Helpers every test directory needs for real servers and processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

T = TypeVar("T")


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


@contextlib.contextmanager
def serve_in_thread(
    serve: Callable[[], AbstractAsyncContextManager[T]], timeout: float = 30.0
) -> Iterator[T]:
    """Enter ``serve()`` on an event loop of its own, in a thread, for as long as
    the ``with`` block runs: for code under test that runs its own event loop
    (CLI commands, ``LiveLab.admin``). A failure to start, or while serving, is
    raised here rather than left to hang the test."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    served: list[T] = []
    failed: list[BaseException] = []

    async def main() -> None:
        async with serve() as value:
            served.append(value)
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # reported by the caller's thread
            failed.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        if not ready.wait(timeout):
            raise TimeoutError(f"not serving after {timeout:g} s")
        if failed:
            raise failed[0]
        yield served[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()
    if failed:
        raise failed[0]
