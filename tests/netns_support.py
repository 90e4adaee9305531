"""Throwaway network namespaces for the TAP tests (root needed; skip otherwise).

`NetNs` creates ``vhsm-<random>`` with ``ip netns add`` and deletes it at the end
(its TAPs go with it). `NetNs.call` runs a function on a thread that entered
the namespace (``setns`` is per thread), so a TAP or a packet socket created
there belongs to it while the rest of the test runs in the host namespace.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def netns_problem() -> str | None:
    """None when namespaces and TAPs can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces and TAPs need root"
    if shutil.which("ip") is None:
        return "ip(8) not found (iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun missing"
    return None


class NetNs:
    """A network namespace of its own, removed by `close`."""

    def __init__(self) -> None:
        self.name = f"vhsm-{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.ip("link", "set", "lo", "up")
        # no IPv6: its neighbour and multicast chatter would mix with the tests' frames
        subprocess.run(
            self.argv(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                       "net.ipv6.conf.default.disable_ipv6=1"]),
            check=True, capture_output=True,
        )  # fmt: skip

    def ip(self, *args: str) -> str:
        """``ip -n NAME ...``; its output (CalledProcessError on failure)."""
        return subprocess.run(
            ["ip", "-n", self.name, *args], check=True, capture_output=True, text=True
        ).stdout

    def argv(self, argv: Sequence[str]) -> list[str]:
        """A command line that runs ``argv`` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on a thread inside the namespace; return its result or raise its error."""
        box: dict[str, object] = {}

        def run() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            try:
                box["value"] = fn()
            except BaseException as err:
                box["error"] = err

        thread = threading.Thread(target=run, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]

    def close(self) -> None:
        """Delete the namespace (and every interface in it)."""
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def tap_name() -> str:
    """A TAP name unlikely to clash (IFNAMSIZ: at most 15 bytes)."""
    return f"vt{secrets.token_hex(4)}"


__all__ = ["NetNs", "netns_problem", "tap_name"]
