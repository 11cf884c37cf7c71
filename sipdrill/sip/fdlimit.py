"""The open-file limit: one socket per client connection, so it bounds how
many clients a process (a pool front end, a clients process) can hold."""

from __future__ import annotations

import contextlib
import resource

__all__ = ["FD_HEADROOM", "raise_fd_limit"]

#: Descriptors a process uses besides its client connections (listeners, the
#: store, logs, the control API's connections).
FD_HEADROOM = 256


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the soft limit. The
    hard limit itself cannot be raised without CAP_SYS_RESOURCE (a container
    gets its engine's: 20,000 on the machine this lab is built on)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
