"""The fds a front-end hands over, checked for kind and access mode before they are used.

A front-end may send any fd where the protocol expects a notifier or a socket: a
regular file, a directory, the wrong end of a pipe, an eventfd left blocking. Used
as is, such an fd wedges a worker (a blocking eventfd whose counter is full, a
kick the front-end drains itself) or fails on every notification. So every fd is
checked once, when it is installed: a notifier (kick, call, err, log) must be an
eventfd, or a pipe end where eventfds do not exist, open for the direction the
back-end uses it in (rule VU-FD-001); the back-end request channel must be a unix
stream socket (VU-FD-002). Notifiers are switched to non-blocking mode: a kick
read that finds nothing returns at once, a call write into a full counter is
dropped (the front-end has a wake-up pending anyway). QEMU and DPDK create their
eventfds non-blocking already, so this changes nothing for them.

A rejected fd is closed here: the caller owned it and must not use it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
from typing import Literal

from vhsm.errors import WireError

__all__ = ["describe", "take_notifier", "take_stream_socket"]

Direction = Literal["read", "write"]

_EVENTFD_LINK = "anon_inode:[eventfd]"
_READABLE = (os.O_RDONLY, os.O_RDWR)
_WRITABLE = (os.O_WRONLY, os.O_RDWR)


def describe(fd: int) -> str:
    """What `fd` is, in words ("eventfd", "pipe", "socket", "regular file", ...)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as err:
        return f"unusable fd ({err.strerror or err})"
    kinds = (
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISFIFO, "pipe"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISREG, "regular file"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    )
    for test, name in kinds:
        if test(mode):
            return name
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "anonymous inode"
    return "eventfd" if link == _EVENTFD_LINK else link


def take_notifier(fd: int, request: str, direction: Direction) -> int:
    """Check a kick (read), call, err or log (write) fd and make it non-blocking.

    Returns `fd`. On a wrong kind or access mode, closes `fd` and raises
    WireError citing VU-FD-001.
    """
    kind = describe(fd)
    problem = None
    if kind not in ("eventfd", "pipe"):
        problem = f"a {kind}"
    else:
        flags = _flags(fd)
        allowed = _READABLE if direction == "read" else _WRITABLE
        if flags is None or flags & os.O_ACCMODE not in allowed:
            problem = f"a {kind} not open for {'reading' if direction == 'read' else 'writing'}"
        elif not flags & os.O_NONBLOCK:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            except OSError as err:
                problem = f"a {kind} that cannot be made non-blocking ({err.strerror or err})"
    if problem is None:
        return fd
    _close(fd)
    raise WireError(
        request,
        "fd",
        problem,
        f"an eventfd the back-end can {direction}",
        rule_id="VU-FD-001",
    )


def take_stream_socket(fd: int, request: str) -> socket.socket:
    """Wrap the back-end request channel fd as a socket.

    On anything but a unix stream socket, closes `fd` and raises WireError
    citing VU-FD-002.
    """
    kind = describe(fd)
    problem = None if kind == "socket" else f"a {kind}"
    sock: socket.socket | None = None
    if problem is None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            problem = f"an unusable socket ({err.strerror or err})"
        else:
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                problem = f"a {sock.family.name}/{sock.type.name} socket"
    if problem is None and sock is not None:
        return sock
    if sock is not None:
        sock.close()
    else:
        _close(fd)
    raise WireError(request, "fd", problem, "a unix stream socket", rule_id="VU-FD-002")


def _flags(fd: int) -> int | None:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return None


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
