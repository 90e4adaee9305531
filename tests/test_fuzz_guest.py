"""Hostile guests: random descriptor tables, avail rings and indices written while devices run.

A live daemon serves a reference device (blk, rng) to the project's front-end.
Each example resets ring 0 (GET_VRING_BASE, then the ring set-up again from
base 0), writes the guest's ring contents by hand and kicks. Properties:

* the device writes guest memory only in the used ring and in buffers some
  descriptor marked device-writable (never a descriptor table, avail ring or
  device-readable buffer, never outside the mapped region);
* it never hangs: every kick ends with all available entries consumed or the
  error eventfd signalled;
* structured bad chains (head out of range, loops, bad indirect tables,
  addresses outside memory ...) are answered as errors: err fd signalled and,
  when the head is in range, a used element of length 0;
* the daemon keeps serving: a good request completes after every example.

``fuzz/fuzz_guest.py`` runs the same tests longer.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from fuzz_support import count, fuzz_settings, open_fds, running_daemon, settle_fds, temp_dir
from hypothesis import assume, given
from hypothesis import strategies as st

from vhsm.devices.blk import BlkBackend
from vhsm.devices.rng import RngBackend
from vhsm.frontend import Frontend

N = 16  # ring size
MEM = 4 << 20  # the front-end's single region at guest address 0
DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = 1, 2, 4
BLK_HDR = struct.Struct("<IIQ")
WAIT = 5.0


@attrs.define
class Guest:
    """The live set-up one device's examples share."""

    name: str
    daemon: Any
    fe: Frontend
    scratch: int  # guest address of a 512 KiB area for buffers and indirect tables
    errors: int = 0

    @property
    def vq(self) -> Any:
        return self.fe.vring(0)

    @property
    def view(self) -> memoryview:
        return self.fe.memory.regions[0].view

    def write(self, gpa: int, data: bytes) -> None:
        self.view[gpa : gpa + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.view[gpa : gpa + n])

    def reset_ring(self) -> None:
        """Stop ring 0, zero its areas, start it again from base 0 (the device re-reads them)."""
        vq = self.vq
        self.fe.stop_vring(0)
        self.write(vq.desc_gpa, bytes(16 * N))
        self.write(vq.avail_gpa, bytes(6 + 2 * N))
        self.write(vq.used_gpa, bytes(6 + 8 * N))
        vq.base = 0
        self.fe.restart_vring(0)
        drain(vq.err_fd)
        drain(vq.call_fd)

    def post(self, table: bytes, heads: list[int], avail_idx: int) -> bytes:
        """Write the guest's ring contents, snapshot guest memory, kick; return the snapshot."""
        vq = self.vq
        self.write(vq.desc_gpa, table[: 16 * N].ljust(16 * N, b"\0"))
        ring = b"".join(struct.pack("<H", h & 0xFFFF) for h in heads[:N]).ljust(2 * N, b"\0")
        self.write(vq.avail_gpa + 4, ring)
        self.write(vq.avail_gpa + 2, struct.pack("<H", avail_idx & 0xFFFF))
        before = bytes(self.view)
        os.eventfd_write(vq.kick_fd, 1)
        return before

    def used(self) -> list[tuple[int, int]]:
        vq = self.vq
        idx = struct.unpack("<H", self.read(vq.used_gpa + 2, 2))[0]
        elems = self.read(vq.used_gpa + 4, 8 * N)
        return [struct.unpack_from("<II", elems, 8 * (i % N)) for i in range(min(idx, N))]

    def settle(self, avail_idx: int) -> bool:
        """Wait until the device consumed everything or signalled an error; return the latter."""
        vring = self.daemon.plane.vrings[0]
        deadline = _now() + WAIT
        err = False
        while True:
            err = err or _eventfd_signalled(self.vq.err_fd)
            if (avail_idx - vring.queue_next_avail()) & 0xFFFF == 0 or err:
                break
            assert _now() < deadline, (
                f"{self.name}: device hung: next avail {vring.queue_next_avail()},"
                f" avail idx {avail_idx}, no error signalled"
            )
            _pause()
        self.barrier(avail_idx)
        return err or _eventfd_signalled(self.vq.err_fd)

    def barrier(self, avail_idx: int) -> None:
        """Wait for the worker's pass over the ring to end (it holds the dispatch lock).

        A device that keeps retrying a ring error never ends its pass: then the
        guest's avail index is repaired (so the worker, and the daemon, get out)
        and the test fails with what happened.
        """
        lock = self.daemon.plane.handlers[0]._lock
        if lock.acquire(timeout=WAIT):
            lock.release()
            return
        vring = self.daemon.plane.vrings[0]
        self.write(self.vq.avail_gpa + 2, struct.pack("<H", vring.queue_next_avail() & 0xFFFF))
        lock.acquire(timeout=WAIT)
        lock.release()
        raise AssertionError(
            f"{self.name}: livelock: the worker never finished its pass over the ring "
            f"(avail idx {avail_idx}, next avail {vring.queue_next_avail()}); it kept "
            "retrying an error that consumes nothing"
        )

    def check_serves(self) -> None:
        """After the hostile round: a good request on a fresh ring completes."""
        self.reset_ring()
        buf = self.scratch
        if self.name == "blk":
            self.write(buf, BLK_HDR.pack(8, 0, 0))  # GET_ID
            table = DESC.pack(buf, 16, NEXT, 1) + DESC.pack(buf + 64, 21, WRITE, 0)
            want = 21
        else:
            table = DESC.pack(buf, 64, WRITE, 0)
            want = 64
        self.post(table, [0], 1)
        err = self.settle(1)
        assert not err, f"{self.name}: a good request was answered as an error"
        assert self.used() == [(0, want)], f"{self.name}: good request: used {self.used()}"


def _now() -> float:
    import time

    return time.monotonic()


def _pause() -> None:
    import time

    time.sleep(0.0005)


def drain(fd: int) -> None:
    _eventfd_signalled(fd)


def _eventfd_signalled(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


@pytest.fixture(scope="module", params=["blk", "rng"])
def guest(request: Any) -> Iterator[Guest]:
    with temp_dir() as directory:
        image = Path(directory) / "disk.img"
        image.write_bytes(bytes(1 << 20))
        backend: Any = BlkBackend(str(image)) if request.param == "blk" else RngBackend()
        try:
            with running_daemon(backend, f"guest-{request.param}") as (daemon, path):
                fe = Frontend.connect(path, timeout=WAIT)
                fe.start(queues=1, size=N)
                scratch = fe.memory.alloc(512 << 10, align=4096)
                fds = open_fds()
                yield Guest(request.param, daemon, fe, scratch)
                assert daemon.last_error is None, repr(daemon.last_error)
                assert settle_fds(fds) <= fds, "fd count grew during the hostile-guest run"
                fe.close()
        finally:
            if isinstance(backend, BlkBackend):
                backend.close()


# --- what the device may write ---------------------------------------------------------
def allowed_writes(g: Guest, memory: bytes) -> np.ndarray:
    """Mask of the guest bytes the device may change: used ring + any device-writable buffer."""
    mask = np.zeros(MEM, dtype=bool)
    vq = g.vq
    mask[vq.used_gpa : vq.used_gpa + 6 + 8 * N] = True

    def allow_table(table: bytes, entries: int, depth: int) -> None:
        for i in range(entries):
            addr, length, flags, _ = DESC.unpack_from(table, 16 * i)
            if flags & INDIRECT and depth == 0 and length % 16 == 0 and addr + length <= MEM:
                allow_table(memory[addr : addr + length], length // 16, 1)
            elif flags & WRITE and addr < MEM:
                mask[addr : min(MEM, addr + length)] = True

    allow_table(memory[vq.desc_gpa : vq.desc_gpa + 16 * N], N, 0)
    return mask


def check_writes(g: Guest, before: bytes) -> None:
    after = np.frombuffer(g.view, dtype=np.uint8)
    changed = np.nonzero(np.frombuffer(before, dtype=np.uint8) != after)[0]
    if changed.size:
        bad = changed[~allowed_writes(g, before)[changed]]
        assert not bad.size, (
            f"{g.name}: device wrote guest bytes no descriptor made writable: "
            f"{[hex(int(a)) for a in bad[:8]]}"
        )


def writable_len(table: bytes, memory: bytes, head: int) -> int:
    """Device-writable bytes of the (valid) chain at ``head``."""
    total, idx, seen = 0, head, 0
    depth = 0
    while seen <= N:
        seen += 1
        addr, length, flags, nxt = DESC.unpack_from(table, 16 * idx)
        if flags & INDIRECT and depth == 0:
            table, idx, depth = memory[addr : addr + length], 0, 1
            continue
        if flags & WRITE:
            total += length
        if not flags & NEXT:
            break
        idx = nxt
    return total


# --- structured chains: one defect each ---------------------------------------------------
DEFECTS = [
    "none",
    "none",
    "none",
    "head_oob",
    "addr_oob",
    "straddle",
    "loop",
    "next_oob",
    "read_after_write",
    "indirect_nested",
    "indirect_badlen",
    "indirect_next",
    "huge_len",
]


@attrs.frozen
class Chain:
    defect: str
    indirect: bool
    kind: int  # blk request type
    data_len: int


chains = st.builds(
    Chain,
    st.sampled_from(DEFECTS),
    st.booleans(),
    st.sampled_from([0, 1, 8, 4, 99]),
    st.sampled_from([0, 512, 1024, 4096]),
)


def build(g: Guest, plan: list[Chain]) -> tuple[bytes, list[int], list[tuple[int, bool]]]:
    """Lay out the chains; return (desc table, avail heads, [(head, bad)])."""
    table = bytearray(16 * N)
    heads: list[int] = []
    expect: list[tuple[int, bool]] = []
    for i, c in enumerate(plan):
        base = 4 * i  # descriptors 4i..4i+3 belong to chain i
        buf = g.scratch + i * 0x10000
        g.write(buf, BLK_HDR.pack(c.kind, 0, 8 * i))
        parts: list[tuple[int, int, int]] = [(buf, 16, 0)]  # header (readable)
        if c.data_len:
            parts.append((buf + 0x1000, c.data_len, 0 if c.kind == 1 else WRITE))
        parts.append((buf + 0x8000, 1, WRITE))  # status byte
        if c.defect == "read_after_write":
            parts.append((buf + 0x9000, 8, 0))
        if c.defect in ("addr_oob", "huge_len", "straddle"):
            addr = {"addr_oob": MEM + 0x1000, "huge_len": buf, "straddle": MEM - 8}[c.defect]
            length = 0xFFFF_FFFF if c.defect == "huge_len" else 64
            parts[0] = (addr, length, 0)
        descs = [
            [addr, length, flags | (NEXT if j + 1 < len(parts) else 0), j + 1]
            for j, (addr, length, flags) in enumerate(parts)
        ]
        if c.defect == "loop":
            descs[-1][2] |= NEXT
            descs[-1][3] = 0
        if c.defect == "next_oob":
            descs[0][3] = 200
        head = base
        if c.indirect or c.defect.startswith("indirect"):
            itable = buf + 0xA000
            raw = b"".join(DESC.pack(*d) for d in descs)
            if c.defect == "indirect_nested":
                raw = DESC.pack(itable, 16, INDIRECT, 0) + raw[16:]
            g.write(itable, raw)
            length = len(raw) + (3 if c.defect == "indirect_badlen" else 0)
            flags = INDIRECT | (NEXT if c.defect == "indirect_next" else 0)
            table[16 * base : 16 * base + 16] = DESC.pack(itable, length, flags, base + 1)
        else:
            for j, d in enumerate(descs):
                nxt = d[3] + base if d[3] < N and c.defect != "next_oob" else d[3]
                if c.defect == "loop" and j == len(descs) - 1:
                    nxt = base
                table[16 * (base + j) : 16 * (base + j) + 16] = DESC.pack(d[0], d[1], d[2], nxt)
        if c.defect == "head_oob":
            head = N + i
        heads.append(head)
        expect.append((head, c.defect != "none"))
    return bytes(table), heads, expect


@fuzz_settings(60)
@given(plan=st.lists(chains, min_size=1, max_size=4))
def test_bad_chains_are_answered_as_errors(guest: Guest, plan: list[Chain]) -> None:
    g = guest
    g.reset_ring()
    table, heads, expect = build(g, plan)
    before = g.post(table, heads, len(heads))
    err = g.settle(len(heads))
    check_writes(g, before)
    used = g.used()
    wanted = [(h, bad) for h, bad in expect if h < N]
    assert [u[0] for u in used] == [h for h, _ in wanted], f"used {used}, expected {expect}"
    for (head, bad), (_, length) in zip(wanted, used, strict=True):
        if bad:
            assert length == 0, f"bad chain at head {head} completed with length {length}"
        else:
            assert length <= writable_len(table, before, head)
    if any(bad for _, bad in expect):
        assert err, f"{g.name}: bad chains {expect} but the err fd was not signalled"
    g.check_serves()
    count(f"guest_structured[{g.name}]")


# --- anything at all ----------------------------------------------------------------------
in_memory = st.one_of(
    st.integers(0, MEM - 1),
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0, MEM - 1, MEM, MEM - 16, (1 << 64) - 1]),
)
descs = st.tuples(
    in_memory,
    st.one_of(st.integers(0, 4096), st.integers(0, 0xFFFF_FFFF)),
    st.integers(0, 7) | st.integers(0, 0xFFFF),
    st.integers(0, N + 1) | st.integers(0, 0xFFFF),
)


@fuzz_settings(60)
@given(
    table=st.lists(descs, min_size=N, max_size=N),
    itable=st.binary(min_size=0, max_size=256),
    heads=st.lists(st.integers(0, N - 1) | st.integers(0, 0xFFFF), max_size=N),
    # index jumps too: beyond next avail + N the ring is marked broken (err fd), not spun on
    avail_idx=st.integers(0, N) | st.integers(0, 0xFFFF),
)
def test_random_rings_never_escape_or_hang(
    guest: Guest,
    table: list[tuple[int, int, int, int]],
    itable: bytes,
    heads: list[int],
    avail_idx: int,
) -> None:
    g = guest
    ring_start, ring_end = g.vq.desc_gpa, g.vq.used_gpa + 6 + 8 * N
    # A writable buffer over the guest's own avail ring lets the device scramble avail idx,
    # which ends in the livelock test_avail_index_moved_too_far_... pins down: kept apart.
    padded = itable.ljust(256, b"\0")
    inner = [DESC.unpack_from(padded, 16 * i) for i in range(16)]
    assume(
        not any(f & WRITE and a < ring_end and ring_start < a + n for a, n, f, _ in table + inner)
    )
    g.reset_ring()
    g.write(g.scratch, itable.ljust(256, b"\0"))
    # indirect descriptors point at the random table in scratch half of the time
    raw = b"".join(
        DESC.pack(g.scratch if f & INDIRECT and a % 2 else a, n, f, x) for a, n, f, x in table
    )
    before = g.post(raw, heads, avail_idx)
    g.settle(avail_idx)
    check_writes(g, before)
    for head, length in g.used():
        assert head < N, f"used id {head} out of range"
        assert length <= 0xFFFF_FFFF
    g.check_serves()
    count(f"guest_random[{g.name}]")


def test_avail_index_moved_too_far_is_an_error_not_a_livelock(guest: Guest) -> None:
    """VU-RING-009: avail idx - last avail > N is a guest error: signal err once, never spin."""
    g = guest
    g.reset_ring()
    g.post(bytes(16 * N), [], N + 1)
    err = g.settle(N + 1)
    assert err, "avail idx moved too far but the err fd was not signalled"
    g.check_serves()
