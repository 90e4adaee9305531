"""A minimal synchronous QMP client for the guest tests (QEMU's JSON monitor on a unix socket).

QEMU is started with ``-qmp unix:PATH,server=on,wait=off``; the client connects (retrying
while QEMU starts), leaves capabilities negotiation mode, and runs commands one at a
time. Asynchronous events that arrive in between are kept in :attr:`QMPClient.events`.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["QMPClient", "QMPError", "qmp_args"]


class QMPError(RuntimeError):
    """QEMU answered a command with an error, or the monitor went away."""


def qmp_args(path: Path) -> tuple[str, ...]:
    """QEMU arguments that open a QMP server on ``path`` (QEMU does not wait for a client)."""
    return ("-qmp", f"unix:{path},server=on,wait=off")


class QMPClient:
    """One QMP connection; every call blocks for at most ``timeout`` seconds."""

    def __init__(self, path: Path, *, timeout: float = 60.0) -> None:
        """Connect to QEMU's QMP socket at ``path`` and negotiate capabilities.

        Raises:
            QMPError: no monitor answered within ``timeout`` seconds.
        """
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self._sock = self._connect(path, timeout)
        self._sock.settimeout(timeout)
        greeting = self._read_message()
        if "QMP" not in greeting:
            raise QMPError(f"no QMP greeting on {path}: {greeting!r}")
        self.execute("qmp_capabilities")

    @staticmethod
    def _connect(path: Path, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return sock
            except OSError as err:
                sock.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"QMP socket {path} not reachable: {err}") from err
                time.sleep(0.1)

    def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except OSError as err:
                raise QMPError(f"QMP {self.path}: {err}") from err
            if not chunk:
                raise QMPError(f"QMP {self.path}: connection closed by QEMU")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command and return its ``return`` value.

        Raises:
            QMPError: QEMU answered with an error, or the connection failed.
        """
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as err:
            raise QMPError(f"QMP {self.path}: {command}: {err}") from err
        while True:
            message = self._read_message()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise QMPError(f"QMP {command}: {message['error']}")
            elif "return" in message:
                return message["return"]

    def close(self) -> None:
        """Close the connection (QEMU keeps running)."""
        self._sock.close()
