"""A Linux guest under QEMU talks vsock through `vhsm serve vsock` (vhost-user-vsock-pci).

Both directions, each verified byte for byte: a guest program connects to host
port 5000 (a host listener at ``<uds>_5000``), sends 1 MiB and reads 512 KiB
back; a host program connects through ``CONNECT 1234`` to the guest's echo
server and checks the echo of 300 KiB.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest.harness import (
    GuestEnv,
    boot_guest,
    in_ci,
    require_guest_env,
    running_backend,
    short_socket_dir,
    vhost_user_device,
)
from guest.initramfs import VIRTIO_MODULES
from guest.vsock import TOOL, HostSide, build_tool, guest_script

from vhsm.devices import vsock
from vhsm.devices.vsock_packet import MAX_CID
from vhsm.errors import VhsmError

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(400)]

SENDS, RECEIVES, ECHO = 1 << 20, 512 << 10, 300 << 10


def free_guest_cid() -> int:
    """A guest CID no vsock device of this host serves (two suites may run here at once)."""
    rnd = random.SystemRandom()
    for _ in range(100):
        cid = rnd.randrange(1000, min(MAX_CID, 1 << 30))  # clear of the small ones people pick
        try:
            lock = vsock._claim_cid(cid)
        except VhsmError:
            continue  # served by another run: draw again
        lock.close()  # `vhsm serve` claims it again at once
        return cid
    raise AssertionError("no free guest CID in 100 draws")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_socket_dir() as path:
        yield path


def test_vsock_guest_against_vhsm(tmp_path: Path, sock_dir: Path) -> None:
    env: GuestEnv = require_guest_env()
    tool = build_tool(tmp_path)
    if isinstance(tool, str):
        if in_ci():
            pytest.fail(tool)
        pytest.skip(tool)
    uds, sock = sock_dir / "v.sock", sock_dir / "vu.sock"
    argv = [sys.executable, "-m", "vhsm", "serve", "vsock", "--socket", str(sock),
            "--guest-cid", str(free_guest_cid()), "--uds-path", str(uds)]  # fmt: skip
    with running_backend(argv, sock, tmp_path / "vhsm-vsock.log") as backend:
        host = HostSide(uds, guest_port=1234, host_port=5000, guest_sends=SENDS,
                        host_sends=RECEIVES, echo_bytes=ECHO)  # fmt: skip
        host.start()
        result = boot_guest(
            env,
            script=guest_script(5000, 1234, SENDS, RECEIVES),
            devices=[vhost_user_device("vhost-user-vsock-pci", sock, id="vuvsock0")],
            backends=[backend],
            workdir=tmp_path / "guest",
            modules=(*VIRTIO_MODULES, "vmw_vsock_virtio_transport"),
            files={TOOL: tool},
            timeout=300,
        )
        host.join(30)
    result.assert_passed()
    assert host.errors == [], result.report()
    assert result.values["vsock_client_sent"] == str(SENDS)
    assert result.values["vsock_client_received"] == str(RECEIVES)
    assert result.values["vsock_echoed"] == str(ECHO)
    assert (host.received, host.echoed) == (SENDS, ECHO)
    assert "Traceback" not in backend.log(), backend.log()
