"""DevicePlane ring states through a real daemon: a suspended device, disabled rings.

Rules VU-STATE-007 (suspended: no guest writes, no notifications) and VU-STATE-008.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhsm.backend import VhostUserBackend
from vhsm.daemon import Listener, VhostUserDaemon
from vhsm.device_plane import DevicePlane
from vhsm.devices.net import NetBackend
from vhsm.devices.rng import RngBackend
from vhsm.errors import BackendError
from vhsm.frontend import Frontend
from vhsm.memory import GuestMemory, GuestMemoryAtomic
from vhsm.wire import BackendReq, ProtocolFeature, VhostUserMemoryRegion, VirtioFeature

WAIT = 10.0
PF = ProtocolFeature


class ChannelBackend(VhostUserBackend):
    """Two idle queues and the back-end request channel (CONFIG change messages)."""

    def __init__(self) -> None:
        self.channel: Any = None

    def num_queues(self) -> int:
        return 2

    def max_queue_size(self) -> int:
        return 64

    def features(self) -> int:
        return int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)

    def protocol_features(self) -> int:
        return int(PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG)

    def set_backend_req_fd(self, channel: Any) -> None:
        self.channel = channel

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[Any], thread_id: int
    ) -> None:
        vrings[device_event].disable_notification()


@pytest.fixture
def served() -> Iterator[tuple[ChannelBackend, Path]]:
    with tempfile.TemporaryDirectory(prefix="vhsm-dp-") as d:
        backend = ChannelBackend()
        daemon = VhostUserDaemon("channel", backend)
        path = Path(d) / "dp.sock"
        daemon.start(Listener(path))
        try:
            yield backend, path
        finally:
            daemon.stop()


def test_suspended_device_sends_no_backend_channel_message(
    served: tuple[ChannelBackend, Path],
) -> None:
    backend, path = served
    with Frontend.connect(path, timeout=WAIT) as fe:
        fe.negotiate()
        assert backend.channel is not None
        with pytest.raises(BackendError, match="VU-STATE-007"):
            backend.channel.config_change()  # no ring started yet
        fe.set_mem_table()
        fe.setup_vring(0, 16)
        fe.setup_vring(1, 16)
        backend.channel.config_change()
        assert fe.backend_channel is not None
        got = fe.backend_channel.wait_for(BackendReq.BACKEND_CONFIG_CHANGE_MSG, WAIT)
        assert got is not None
        fe.stop_vring(0)
        backend.channel.config_change()  # ring 1 still started: not suspended
        fe.stop_vring(1)
        with pytest.raises(BackendError, match="VU-STATE-007"):
            backend.channel.config_change()
        assert not backend.channel.closed
        fe.restart_vring(1)
        backend.channel.config_change()
        sent = [
            r["name"]
            for r in fe.transcript
            if r.get("channel") == "backend" and r.get("dir") == "B>F"
        ]
        assert sent.count("BACKEND_CONFIG_CHANGE_MSG") == 3


@pytest.mark.parametrize(("backend", "active"), [(NetBackend(), True), (RngBackend(), False)])
def test_only_net_processes_started_but_disabled_rings(
    backend: VhostUserBackend, active: bool
) -> None:
    fd = os.memfd_create("ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 16)
    memory = GuestMemory.from_table([VhostUserMemoryRegion(0, 1 << 16, 1 << 30, 0)], [fd])
    plane = DevicePlane(backend, GuestMemoryAtomic(memory))
    try:
        index = backend.num_queues() - 1
        ring = plane.vrings[index]
        ring.started, ring.enabled = True, False
        assert plane.ring_active(index) is False  # no size and addresses yet: never
        ring.set_queue_size(64)
        ring.set_queue_info(0x1000, 0x2000, 0x3000)
        assert plane.ring_active(index) is active
        ring.started, ring.enabled = False, True
        assert plane.ring_active(index) is False  # stopped: never
    finally:
        plane.close()
