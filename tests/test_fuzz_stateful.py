"""A hypothesis state machine driving a live blk daemon through the project's front-end.

Random interleavings of negotiation, memory-table changes (SET_MEM_TABLE,
ADD/REM_MEM_REG), ring start (SET_VRING_KICK) / stop (GET_VRING_BASE) /
enable / disable, RESET_DEVICE, disconnect / reconnect and verified I/O.
After every step the daemon's session and vring machines and the rings'
``started`` / ``enabled`` flags must agree with what the driver did (VU-STATE-008);
I/O on a started and enabled ring must complete with the right data; a
request posted while the ring is disabled must complete once it is enabled;
the fd count must not grow, and the daemon must report no internal error.
``fuzz/fuzz_stateful.py`` runs it longer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fuzz_support import count, fuzz_settings, open_fds, settle_fds, temp_dir, wait_idle
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vhsm.daemon import Listener, VhostUserDaemon
from vhsm.devices.blk import BlkBackend
from vhsm.frontend import BlkDevice, Frontend
from vhsm.session import SessionState

WAIT = 10.0
SECTORS = 2048
EXTRA_GPA = 64 << 20


class DaemonMachine(RuleBasedStateMachine):
    """Model: connected, negotiated, memory set, and ring 0's started / enabled flags."""

    def __init__(self) -> None:
        super().__init__()
        self._dir = temp_dir()
        directory = self._dir.__enter__()
        self.image = directory / "disk.img"
        with self.image.open("wb") as f:
            f.truncate(SECTORS * 512)
        self.backend = BlkBackend(str(self.image))
        self.daemon = VhostUserDaemon("stateful", self.backend)
        self.path = Path(directory) / "vu.sock"
        self.daemon.start(Listener(self.path))
        self.fds = open_fds()
        self.fe: Frontend | None = None
        self.negotiated = self.memory = self.ring = False
        self.started = self.enabled = False
        self.extra_region = False
        self.disk: dict[int, bytes] = {}
        self.pending: tuple[int, bytes] | None = None  # a write posted while disabled
        self.steps = 0

    # --- helpers -----------------------------------------------------------------------
    def _session(self) -> Any:
        return self.daemon.plane._session

    def _complete_pending(self) -> None:
        if self.pending is None or self.fe is None:
            return
        vq = self.fe.vring(0)
        _, length = vq.wait_used(WAIT)
        assert length == 1
        sector, data = self.pending
        self.disk[sector] = data
        self.pending = None

    # --- rules -------------------------------------------------------------------------
    @precondition(lambda self: self.fe is None)
    @rule()
    def connect(self) -> None:
        wait_idle(self.daemon)
        self.fe = Frontend.connect(self.path, timeout=WAIT)
        self.negotiated = self.memory = self.ring = self.started = self.enabled = False
        self.extra_region = False

    @precondition(lambda self: self.fe is not None and not self.negotiated)
    @rule(owner_first=st.booleans())
    def negotiate(self, owner_first: bool) -> None:
        assert self.fe is not None
        self.fe.negotiate(owner_first=owner_first)
        self.negotiated = True

    @precondition(lambda self: self.negotiated)
    @rule()
    def set_mem_table(self) -> None:
        assert self.fe is not None
        self.fe.set_mem_table()
        self.memory = True

    @precondition(lambda self: self.memory and not self.extra_region)
    @rule()
    def add_region(self) -> None:
        assert self.fe is not None
        self.fe.add_mem_region(EXTRA_GPA, 1 << 20)
        self.extra_region = True

    @precondition(lambda self: self.extra_region and self.fe is not None)
    @rule()
    def remove_region(self) -> None:
        assert self.fe is not None
        self.fe.remove_mem_region(EXTRA_GPA)
        self.extra_region = False

    @precondition(lambda self: self.memory and not self.ring and self.pending is None)
    @rule()
    def setup_ring(self) -> None:
        assert self.fe is not None
        if 0 in self.fe.vrings:  # after RESET_DEVICE or a reconnect: resume in place
            self.fe.restart_vring(0)
            self.fe.enable_vring(0, True)
        else:
            self.fe.setup_vring(0, 64)
        self.ring = self.started = self.enabled = True

    @precondition(lambda self: self.started)
    @rule()
    def stop_ring(self) -> None:
        assert self.fe is not None
        self.fe.stop_vring(0)
        self.started = False

    @precondition(lambda self: self.ring and not self.started and self.negotiated)
    @rule()
    def restart_ring(self) -> None:
        assert self.fe is not None
        self.fe.restart_vring(0)
        self.started = True
        if self.enabled:
            self._complete_pending()

    @precondition(lambda self: self.ring and self.negotiated)
    @rule(enabled=st.booleans())
    def enable(self, enabled: bool) -> None:
        assert self.fe is not None
        self.fe.enable_vring(0, enabled)
        self.enabled = enabled
        if enabled and self.started:
            self._complete_pending()

    @precondition(lambda self: self.negotiated and self.pending is None)
    @rule()
    def reset_device(self) -> None:
        assert self.fe is not None
        self.fe.reset_device()
        self.started = self.enabled = self.ring = False
        self.negotiated = False  # RESET_DEVICE forgets the features: negotiate again
        self.fe.set_features(self.fe.acked_features)
        self.negotiated = True

    @precondition(lambda self: self.started and self.enabled and self.pending is None)
    @rule(sector=st.integers(0, SECTORS - 8), seed=st.integers(0, 255), read_back=st.booleans())
    def io(self, sector: int, seed: int, read_back: bool) -> None:
        assert self.fe is not None
        blk = BlkDevice(self.fe, timeout=WAIT)
        data = bytes([seed]) * 4096
        blk.write(sector, data)
        for i in range(8):
            self.disk[sector + i] = data[512 * i : 512 * i + 512]
        if read_back:
            assert blk.read(sector, 8) == data

    @precondition(lambda self: self.started and not self.enabled and self.pending is None)
    @rule(sector=st.integers(0, SECTORS - 1))
    def post_while_disabled(self, sector: int) -> None:
        assert self.fe is not None
        mem, vq = self.fe.memory, self.fe.vring(0)
        data = os.urandom(512)
        hdr, buf, status = mem.alloc(16), mem.alloc(512), mem.alloc(1)
        mem.write(hdr, (1).to_bytes(4, "little") + bytes(4) + sector.to_bytes(8, "little"))
        mem.write(buf, data)
        vq.post([(hdr, 16), (buf, 512)], [(status, 1)])
        vq.kick(force=True)
        self.pending = (sector, data)

    @precondition(lambda self: self.fe is not None and self.pending is None)
    @rule()
    def disconnect(self) -> None:
        assert self.fe is not None
        self.fe.close()
        self.fe = None
        self.negotiated = self.memory = self.ring = self.started = self.enabled = False
        self.extra_region = False
        wait_idle(self.daemon)
        assert settle_fds(self.fds) <= self.fds, "fds left after a session ended"

    @precondition(lambda self: self.fe is not None and self.ring and self.pending is None)
    @rule()
    def reconnect(self) -> None:
        assert self.fe is not None
        self.fe.reconnect(WAIT)  # full set-up again, rings resumed and enabled
        self.negotiated = self.memory = self.ring = self.started = self.enabled = True
        self.extra_region = False
        if any(r.guest_phys_addr == EXTRA_GPA for r in self.fe.memory.regions):
            self.extra_region = True

    # --- invariants ----------------------------------------------------------------------
    @invariant()
    def machines_agree_with_the_driver(self) -> None:
        self.steps += 1
        assert self.daemon.last_error is None, repr(self.daemon.last_error)
        if self.fe is None or not self.negotiated:
            return
        session = self._session()
        assert session is not None
        vring = self.daemon.plane.vrings[0]
        state = session.vring_state(0)
        assert state.started == self.started == bool(vring.started), (state, vring.started)
        assert state.enabled == self.enabled == bool(vring.enabled), (state, vring.enabled)
        expected = SessionState.RUNNING if self.started else SessionState.SUSPENDED
        assert session.state == expected, (session.state, expected)

    @invariant()
    def no_fd_growth(self) -> None:
        assert open_fds() <= self.fds + 40, "fd count keeps growing"

    def teardown(self) -> None:
        try:
            if self.fe is not None:
                self.fe.close()
            wait_idle(self.daemon)
            with open(self.image, "rb") as f:
                for sector, data in self.disk.items():
                    f.seek(sector * 512)
                    assert f.read(512) == data, f"sector {sector} lost"
        finally:
            self.daemon.stop()
            self.backend.close()
            self._dir.__exit__(None, None, None)
            count("stateful_steps", self.steps)
            count("stateful_runs")


DaemonMachine.TestCase.settings = fuzz_settings(25, stateful_step_count=30)
test_daemon_state_machine = DaemonMachine.TestCase
