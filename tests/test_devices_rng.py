from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from devices_support import Bench, eventfd_count

from vhsm.devices.rng import RngBackend
from vhsm.errors import BackendError
from vhsm.wire.enums import ProtocolFeature, VirtioFeature


@pytest.fixture(params=["split", "packed"])
def bench(request: pytest.FixtureRequest) -> Iterator[Bench]:
    b = Bench(RngBackend(), packed=request.param == "packed")
    yield b
    b.close()


def test_negotiation_surface() -> None:
    rng = RngBackend()
    assert rng.num_queues() == rng.queue_num() == 1
    feats = rng.features()
    for bit in (
        VirtioFeature.VERSION_1,
        VirtioFeature.RING_INDIRECT_DESC,
        VirtioFeature.RING_EVENT_IDX,
        VirtioFeature.PROTOCOL_FEATURES,
        VirtioFeature.RING_PACKED,
    ):
        assert feats & bit
    proto = rng.protocol_features()
    assert proto & ProtocolFeature.MQ and proto & ProtocolFeature.REPLY_ACK
    assert not proto & ProtocolFeature.CONFIG  # no config space


def test_fills_writable_buffers_and_reports_lengths(bench: Bench) -> None:
    a = bench.alloc(64)
    b = bench.alloc(100)
    c = bench.alloc(3)
    h1 = bench.post(0, [], [(a, 64)])
    h2 = bench.post(0, [], [(b, 100), (c, 3)])  # two descriptors in one chain
    bench.kick(0)
    assert sorted(bench.used(0)) == sorted([(h1, 64), (h2, 103)])
    # 64 + 100 zero bytes turning into random ones: all zero has probability 2^-1312
    assert bench.read(a, 64) != bytes(64)
    assert bench.read(b, 100) != bytes(100)
    assert eventfd_count(bench.calls[0]) >= 1
    assert eventfd_count(bench.errs[0]) == 0


def test_buffer_across_regions(bench: Bench) -> None:
    gpa = bench.alloc_at_border(40, 40)
    head = bench.post(0, [], [(gpa, 80)])
    bench.kick(0)
    assert bench.used(0) == [(head, 80)]
    assert bench.read(gpa, 40) != bytes(40) and bench.read(gpa + 40, 40) != bytes(40)


def test_readable_part_is_left_alone(bench: Bench) -> None:
    r = bench.alloc(16, b"do not touch me!")
    w = bench.alloc(32)
    head = bench.post(0, [(r, 16)], [(w, 32)])
    bench.kick(0)
    assert bench.used(0) == [(head, 32)]
    assert bench.read(r, 16) == b"do not touch me!"


def test_many_kicks_drain_everything() -> None:
    bench = Bench(RngBackend(), size=8)
    try:
        total = 0
        for round_ in range(5):
            bufs = [bench.alloc(16) for _ in range(8)]
            for gpa in bufs:
                bench.post(0, [], [(gpa, 16)])
            bench.kick(0)
            used = bench.used(0)
            assert len(used) == 8 and all(n == 16 for _, n in used), round_
            total += len(used)
        assert total == 40
    finally:
        bench.close()


def test_bad_chain_completed_with_zero_and_err_signalled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bench = Bench(RngBackend())
    try:
        good = bench.alloc(8)
        h_bad = bench.post(0, [], [(0x7FFF_0000_0000, 8)])  # outside guest memory
        h_good = bench.post(0, [], [(good, 8)])
        bench.kick(0)
        assert sorted(bench.used(0)) == sorted([(h_bad, 0), (h_good, 8)])
        assert eventfd_count(bench.errs[0]) >= 1
        assert "bad chain" in caplog.text
    finally:
        bench.close()


def test_event_idx_suppresses_kicks_while_draining_and_reenables() -> None:
    bench = Bench(RngBackend())
    try:
        assert bench.features & VirtioFeature.RING_EVENT_IDX
        gpa = bench.alloc(8)
        bench.post(0, [], [(gpa, 8)])
        bench.kick(0)
        assert len(bench.used(0)) == 1
        # after the drain the device asked for a kick at the next avail index (1)
        drv = bench.drivers[0]
        avail_event = struct.unpack_from("<H", bench.read(drv.used_gpa + 4 + 8 * drv.size, 2))[0]  # type: ignore[union-attr]
        assert avail_event == 1
        bench.post(0, [], [(gpa, 8)])
        assert drv.kick_needed()
    finally:
        bench.close()


def test_unexpected_event_is_refused() -> None:
    bench = Bench(RngBackend())
    try:
        with pytest.raises(BackendError):
            bench.backend.handle_event(1, 1, bench.vrings, 0)
    finally:
        bench.close()
