"""The vsock guest test's pieces: the static guest tool, the data pattern, the host side.

The guest runs `vsock_tool.c` (built here with ``gcc -static``): a client that
sends to a host listener at ``<uds>_<port>`` and checks what comes back, and an
echo server that a host program reaches through ``CONNECT <port>`` on ``<uds>``.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .static_tool import build_static

SOURCE = Path(__file__).with_name("vsock_tool.c")
#: Guest path of the tool inside the initramfs.
TOOL = "bin/vsock_tool"


def build_tool(workdir: Path) -> bytes | str:
    """The static tool's bytes, or a sentence saying why it cannot be built."""
    return build_static(SOURCE, workdir)


def pattern(n: int, seed: int) -> bytes:
    """Byte i is (i * 7 + seed + (i >> 8)) & 0xff, as vsock_tool.c computes it."""
    return bytes((i * 7 + seed + (i >> 8)) & 0xFF for i in range(n))


@dataclass
class HostSide:
    """The host programs of the test, each on its own thread; `errors` says what failed."""

    uds: Path
    guest_port: int
    host_port: int
    guest_sends: int
    host_sends: int
    echo_bytes: int
    errors: list[str] = field(default_factory=list)
    received: int = 0
    echoed: int = 0
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        """Listen at ``<uds>_<host_port>`` and start both host programs."""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(f"{self.uds}_{self.host_port}")
        srv.listen(4)
        srv.settimeout(240)
        for target, args in ((self._serve_guest, (srv,)), (self._call_guest, ())):
            thread = threading.Thread(target=self._guarded, args=(target, *args), daemon=True)
            self._threads.append(thread)
            thread.start()

    def join(self, timeout: float) -> None:
        """Wait for both programs (a guest that never came shows as an error)."""
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                self.errors.append(f"{thread.name} still running")

    def _guarded(self, target: object, *args: object) -> None:
        try:
            target(*args)  # type: ignore[operator]
        except Exception as err:  # the test reads the errors
            self.errors.append(f"{getattr(target, '__name__', target)}: {err!r}")

    def _serve_guest(self, srv: socket.socket) -> None:
        """The guest's client: read everything it sends, check it, answer, close."""
        with srv:
            conn, _ = srv.accept()
        with conn:
            conn.settimeout(120)
            data = bytearray()
            while chunk := conn.recv(1 << 16):
                data += chunk
            self.received = len(data)
            if bytes(data) != pattern(self.guest_sends, 1):
                self.errors.append(f"guest to host: {len(data)} bytes, not the pattern")
            conn.sendall(pattern(self.host_sends, 2))

    def _call_guest(self) -> None:
        """Reach the guest's echo server through CONNECT, send, and check the echo."""
        deadline = time.monotonic() + 200
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(120)
            sock.connect(str(self.uds))
            sock.sendall(f"CONNECT {self.guest_port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                chunk = sock.recv(1)
                if not chunk:
                    break
                line += chunk
            if line.startswith(b"OK "):
                break
            sock.close()  # the guest is not listening yet: refused, try again
            if time.monotonic() > deadline:
                raise TimeoutError("the guest's echo server never accepted")
            time.sleep(0.5)
        with sock:
            data = pattern(self.echo_bytes, 3)
            writer = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
            writer.start()
            back = bytearray()
            while len(back) < len(data):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                back += chunk
            writer.join(60)
            sock.shutdown(socket.SHUT_WR)
            self.echoed = len(back)
            if bytes(back) != data:
                self.errors.append(f"host to guest echo: {len(back)} bytes, not the pattern")


def guest_script(host_port: int, guest_port: int, sends: int, receives: int) -> str:
    """The guest side: echo server in the background, the client, then both verdicts."""
    return f"""
set -e
/{TOOL} echo {guest_port} &
echo_pid=$!
/{TOOL} client {host_port} {sends} {receives}
echo "VHSM-KV vsock_client=ok"
wait $echo_pid
echo "VHSM-KV vsock_echo=ok"
"""


__all__ = ["TOOL", "HostSide", "build_tool", "guest_script", "pattern"]
