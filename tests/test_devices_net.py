from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from devices_support import Bench, eventfd_count
from hypothesis import given, settings
from hypothesis import strategies as st

from vhsm.devices.net import NET_HDR_SIZE, NetBackend
from vhsm.errors import BackendError
from vhsm.wire.enums import NetFeature, ProtocolFeature, VirtioFeature

HDR = bytes(NET_HDR_SIZE)  # a TX header asking for nothing (no offloads offered)


@pytest.fixture
def sink() -> Iterator[Bench]:
    b = Bench(NetBackend("sink"), size=256)
    yield b
    b.close()


@pytest.fixture
def loop() -> Iterator[Bench]:
    b = Bench(NetBackend("loopback"), size=64)
    yield b
    b.close()


def dev(bench: Bench) -> NetBackend:
    assert isinstance(bench.backend, NetBackend)
    return bench.backend


def frame(n: int, seed: int = 0) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(n))


def send(bench: Bench, data: bytes, *, pair: int = 0, split_header: bool = False) -> int:
    """Post one TX packet (header + frame); returns its head."""
    if split_header:
        h = bench.alloc(NET_HDR_SIZE, HDR)
        f = bench.alloc(len(data), data)
        return bench.post(2 * pair + 1, [(h, NET_HDR_SIZE), (f, len(data))], [])
    gpa = bench.alloc(NET_HDR_SIZE + len(data), HDR + data)
    return bench.post(2 * pair + 1, [(gpa, NET_HDR_SIZE + len(data))], [])


def rx_buffers(bench: Bench, sizes: list[int], *, pair: int = 0) -> list[tuple[int, int, int]]:
    """Post RX chains of the given sizes: [(head, gpa, size)]."""
    out = []
    for n in sizes:
        gpa = bench.alloc(n, b"\xee" * n)
        out.append((bench.post(2 * pair, [], [(gpa, n)]), gpa, n))
    return out


# --- negotiation -----------------------------------------------------------------------------
def test_negotiation_surface() -> None:
    one = NetBackend()
    assert one.mode == "sink" and one.num_queues() == 2 and one.queue_num() == 1
    feats = one.features()
    for bit in (
        VirtioFeature.VERSION_1,
        VirtioFeature.RING_INDIRECT_DESC,
        VirtioFeature.RING_EVENT_IDX,
        VirtioFeature.PROTOCOL_FEATURES,
        VirtioFeature.RING_PACKED,
        NetFeature.MRG_RXBUF,
    ):
        assert feats & bit, bit
    assert not feats & NetFeature.MQ
    assert one.protocol_features() & ProtocolFeature.MQ
    four = NetBackend(mode="loopback", queue_pairs=4)
    assert four.num_queues() == 8 and four.queue_num() == 4
    assert four.features() & NetFeature.MQ and four.features() & NetFeature.CTRL_VQ
    assert [list(q) for q in four.queues_per_thread()] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError):
        NetBackend(mode="bridge")
    with pytest.raises(ValueError):
        NetBackend(queue_pairs=0)


def test_acked_features_select_rx_layout() -> None:
    net = NetBackend("loopback")
    net.acked_features(int(VirtioFeature.VERSION_1 | NetFeature.MRG_RXBUF))
    assert net.mrg_rxbuf
    net.reset_device()
    assert not net.mrg_rxbuf


# --- sink ------------------------------------------------------------------------------------
def test_sink_counts_and_touches_every_byte(sink: Bench) -> None:
    frames = [frame(n, seed) for seed, n in enumerate([60, 1514, 64, 0, 300, 9000 // 7])]
    heads = [send(sink, f) for f in frames]
    heads.append(send(sink, frame(100, 9), split_header=True))  # a two-descriptor packet
    frames.append(frame(100, 9))
    sink.kick(1)
    used = sink.used(1)
    assert sorted(h for h, _ in used) == sorted(heads)
    assert all(n == 0 for _, n in used)  # TX buffers: nothing written
    stats = dev(sink).stats
    assert stats.tx_packets == len(frames)
    assert stats.tx_bytes == sum(len(f) for f in frames)
    assert stats.tx_checksum == sum(zlib.adler32(f) for f in frames)
    assert stats.tx_errors == 0 and stats.rx_packets == 0
    assert eventfd_count(sink.calls[1]) >= 1


def test_sink_copy_reads_every_frame_without_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    import vhsm.devices.net as net

    gathered: list[tuple[int, int]] = []
    gather = net._gather_rows

    def spy(region: memoryview, offsets: np.ndarray, n: int, skip: int) -> np.ndarray:
        rows = gather(region, offsets, n, skip)
        gathered.append(rows.shape)
        return rows

    monkeypatch.setattr(net, "_gather_rows", spy)
    bench = Bench(NetBackend("sink", sink_reads="copy"), size=256)
    try:
        big = [frame(1500, i) for i in range(100)]  # one burst of equal frames: one gather
        heads = [send(bench, f) for f in big]
        heads.append(send(bench, frame(100, 9), split_header=True))  # a chain: copied alone
        bench.kick(1)
        runt = bench.alloc(5, b"\0" * 5)
        heads.append(bench.post(1, [(runt, 5)], []))
        bench.kick(1)
        assert sorted(h for h, _ in bench.used(1)) == sorted(heads)
        stats = dev(bench).stats
        assert (stats.tx_packets, stats.tx_bytes, stats.tx_errors) == (101, 150_100, 1)
        assert stats.tx_checksum == 0
        assert gathered == [(100, 1500)]
    finally:
        bench.close()
    with pytest.raises(ValueError, match="sink_reads 'peek' not one of"):
        NetBackend("sink", sink_reads="peek")


def test_sink_header_bytes_are_not_counted(sink: Bench) -> None:
    gpa = sink.alloc(NET_HDR_SIZE + 4, b"\xff" * NET_HDR_SIZE + b"\x01\x02\x03\x04")
    sink.post(1, [(gpa, NET_HDR_SIZE + 4)], [])
    sink.kick(1)
    assert dev(sink).stats.tx_checksum == zlib.adler32(b"\x01\x02\x03\x04")
    assert dev(sink).stats.tx_bytes == 4


def test_sink_packet_across_regions(sink: Bench) -> None:
    data = frame(200, 3)
    gpa = sink.alloc_at_border(50, NET_HDR_SIZE + 150)
    sink.memory.write(gpa, HDR + data, gather=True)
    sink.post(1, [(gpa, NET_HDR_SIZE + 200)], [])
    sink.kick(1)
    assert len(sink.used(1)) == 1
    stats = dev(sink).stats
    assert (stats.tx_packets, stats.tx_bytes, stats.tx_checksum) == (1, 200, zlib.adler32(data))


def test_sink_bad_and_short_packets(sink: Bench) -> None:
    good = send(sink, frame(50))
    short_gpa = sink.alloc(5, b"\0" * 5)
    short = sink.post(1, [(short_gpa, 5)], [])
    bad = sink.post(1, [(0x7FFF_0000_0000, 64)], [])
    sink.kick(1)
    assert sorted(sink.used(1)) == sorted([(good, 0), (short, 0), (bad, 0)])
    stats = dev(sink).stats
    assert stats.tx_packets == 1 and stats.tx_bytes == 50 and stats.tx_errors == 2
    assert eventfd_count(sink.errs[1]) >= 1


def test_sink_big_burst_and_repeated_kicks(sink: Bench) -> None:
    total = 0
    checksum = 0
    for burst in range(4):
        for i in range(200):
            f = frame(60 + (i % 5), burst + i)
            send(sink, f)
            total += len(f)
            checksum += zlib.adler32(f)
        sink.kick(1)
        assert len(sink.used(1)) == 200
    stats = dev(sink).stats
    assert stats.tx_packets == 800 and stats.tx_bytes == total and stats.tx_checksum == checksum


def test_sink_ignores_rx(sink: Bench) -> None:
    rx_buffers(sink, [1526, 1526])
    sink.kick(0)
    assert sink.used(0) == []


def test_several_pairs_offer_no_memory_slots() -> None:
    """QEMU 7.2 would send the memory table once per pair as overlapping ADD_MEM_REG."""
    assert NetBackend("sink").protocol_features() & ProtocolFeature.CONFIGURE_MEM_SLOTS
    two = NetBackend("loopback", queue_pairs=2).protocol_features()
    assert not two & ProtocolFeature.CONFIGURE_MEM_SLOTS
    assert two & ProtocolFeature.MQ


def test_sink_multiqueue_pairs_are_counted_apart() -> None:
    bench = Bench(NetBackend("sink", queue_pairs=3), size=16)
    try:
        send(bench, frame(10), pair=2)
        send(bench, frame(20), pair=2)
        send(bench, frame(30), pair=0)
        bench.kick(5)
        bench.kick(1)
        assert len(bench.used(5)) == 2 and len(bench.used(1)) == 1
        per_pair = dev(bench).pair_stats
        assert [s.tx_packets for s in per_pair] == [1, 0, 2]
        assert [s.tx_bytes for s in per_pair] == [30, 0, 30]
        assert dev(bench).stats.tx_packets == 3
        with pytest.raises(BackendError):
            bench.backend.handle_event(6, 1, bench.vrings, 0)
    finally:
        bench.close()


def test_sink_on_packed_rings() -> None:
    bench = Bench(NetBackend("sink"), size=32, packed=True)
    try:
        frames = [frame(n, n) for n in (64, 128, 1500)]
        for f in frames:
            send(bench, f)
        send(bench, frame(77, 1), split_header=True)
        bench.kick(1)
        assert len(bench.used(1)) == 4
        stats = dev(bench).stats
        assert stats.tx_packets == 4
        assert stats.tx_checksum == sum(zlib.adler32(f) for f in [*frames, frame(77, 1)])
    finally:
        bench.close()


# --- loopback --------------------------------------------------------------------------------
def rx_header(bench: Bench, gpa: int) -> tuple[int, ...]:
    return struct.unpack("<BBHHHHH", bench.read(gpa, NET_HDR_SIZE))


def test_loopback_returns_frames(loop: Bench) -> None:
    bufs = rx_buffers(loop, [1526] * 3)
    frames = [frame(60, 1), frame(1514, 2)]
    for f in frames:
        send(loop, f)
    loop.kick(1)
    assert len(loop.used(1)) == 2
    used = loop.used(0)
    assert [h for h, _ in used] == [bufs[0][0], bufs[1][0]]
    for (_, n), (_, gpa, _), f in zip(used, bufs, frames, strict=False):
        assert n == NET_HDR_SIZE + len(f)
        assert rx_header(loop, gpa) == (0, 0, 0, 0, 0, 0, 1)
        assert loop.read(gpa + NET_HDR_SIZE, len(f)) == f
    stats = dev(loop).stats
    assert (stats.tx_packets, stats.rx_packets, stats.rx_bytes) == (2, 2, 60 + 1514)
    assert eventfd_count(loop.calls[0]) >= 1 and eventfd_count(loop.calls[1]) >= 1


def test_loopback_without_rx_buffers_drops(loop: Bench) -> None:
    send(loop, frame(60))
    loop.kick(1)
    assert len(loop.used(1)) == 1  # TX is always consumed
    assert loop.used(0) == []
    stats = dev(loop).stats
    assert stats.rx_dropped == 1 and stats.rx_packets == 0


def test_loopback_mrg_rxbuf_spans_chains(loop: Bench) -> None:
    assert dev(loop).mrg_rxbuf
    bufs = rx_buffers(loop, [64, 64, 64, 64])
    data = frame(150, 5)  # 12 + 150 = 162 bytes: three 64-byte buffers
    send(loop, data)
    loop.kick(1)
    used = loop.used(0)
    assert [h for h, _ in used] == [b[0] for b in bufs[:3]]
    assert [n for _, n in used] == [64, 64, 34]
    assert rx_header(loop, bufs[0][1])[-1] == 3  # num_buffers
    got = b"".join(loop.read(gpa, n) for (_, n), (_, gpa, _) in zip(used, bufs, strict=False))
    assert got[NET_HDR_SIZE:] == data
    assert loop.read(bufs[3][1], 64) == b"\xee" * 64  # untouched, still available
    send(loop, frame(10))
    loop.kick(1)
    assert loop.used(0) == [(bufs[3][0], NET_HDR_SIZE + 10)]


def test_loopback_mrg_rxbuf_out_of_buffers_midway(loop: Bench) -> None:
    bufs = rx_buffers(loop, [64, 64])
    send(loop, frame(200))
    loop.kick(1)
    # the two chains are returned unused: the frame did not fit, it is dropped
    assert loop.used(0) == [(bufs[0][0], 0), (bufs[1][0], 0)]
    assert dev(loop).stats.rx_dropped == 1


def test_loopback_without_mrg_rxbuf_needs_whole_buffers() -> None:
    feats = NetBackend("loopback").features() & ~NetFeature.MRG_RXBUF
    bench = Bench(NetBackend("loopback"), features=feats)
    try:
        assert not dev(bench).mrg_rxbuf
        small, big = rx_buffers(bench, [64, 1526])
        send(bench, frame(100))  # does not fit in 64 bytes: that buffer is returned empty
        send(bench, frame(100, 1))
        bench.kick(1)
        used = bench.used(0)
        assert used == [(small[0], 0), (big[0], NET_HDR_SIZE + 100)]
        assert rx_header(bench, big[1])[-1] == 1
        assert bench.read(big[1] + NET_HDR_SIZE, 100) == frame(100, 1)
        assert dev(bench).stats.rx_dropped == 1
    finally:
        bench.close()


def test_loopback_disabled_rx_drops(loop: Bench) -> None:
    rx_buffers(loop, [1526])
    loop.vrings[0].enabled = False
    send(loop, frame(60))
    loop.kick(1)
    assert loop.used(0) == [] and dev(loop).stats.rx_dropped == 1


@pytest.mark.parametrize("mode", ["sink", "loopback"])
def test_started_but_disabled_tx_drops_without_side_effects(mode: str) -> None:
    assert NetBackend.process_disabled_rings  # the daemon delivers such kicks to net
    bench = Bench(NetBackend(mode), size=32)
    try:
        rx = rx_buffers(bench, [1526, 1526])
        bench.vrings[1].enabled = False  # started, disabled (VU-STATE-008)
        heads = [send(bench, frame(60)), send(bench, frame(90, 1), split_header=True)]
        bad = bench.post(1, [(0x7FFF_0000_0000, 64)], [])
        bench.kick(1)
        assert sorted(bench.used(1)) == sorted([(heads[0], 0), (heads[1], 0), (bad, 0)])
        stats = dev(bench).stats
        assert (stats.tx_dropped, stats.tx_errors) == (2, 1)
        assert (stats.tx_packets, stats.tx_bytes, stats.tx_checksum) == (0, 0, 0)
        assert bench.used(0) == [] and stats.rx_packets == stats.rx_dropped == 0
        assert eventfd_count(bench.calls[1]) >= 1
        bench.kick(0)  # an RX kick on a disabled pair changes nothing either
        bench.vrings[1].enabled = True
        send(bench, frame(70, 2))
        bench.kick(1)
        stats = dev(bench).stats
        assert (stats.tx_packets, stats.tx_bytes, stats.tx_dropped) == (1, 70, 2)
        if mode == "loopback":
            assert bench.used(0) == [(rx[0][0], NET_HDR_SIZE + 70)]
    finally:
        bench.close()


def test_loopback_multiqueue_stays_in_its_pair() -> None:
    bench = Bench(NetBackend("loopback", queue_pairs=2), size=16)
    try:
        (b0,) = rx_buffers(bench, [256], pair=0)
        (b1,) = rx_buffers(bench, [256], pair=1)
        send(bench, frame(40, 1), pair=1)
        bench.kick(3)
        assert bench.used(0) == []
        assert bench.used(2) == [(b1[0], NET_HDR_SIZE + 40)]
        assert bench.read(b1[1] + NET_HDR_SIZE, 40) == frame(40, 1)
        send(bench, frame(30, 2), pair=0)
        bench.kick(1)
        assert bench.used(0) == [(b0[0], NET_HDR_SIZE + 30)]
    finally:
        bench.close()


def test_loopback_bad_tx_chain(loop: Bench) -> None:
    rx_buffers(loop, [1526])
    bad = loop.post(1, [(0x7FFF_0000_0000, 64)], [])
    good = send(loop, frame(20))
    loop.kick(1)
    assert sorted(loop.used(1)) == sorted([(bad, 0), (good, 0)])
    assert len(loop.used(0)) == 1
    assert dev(loop).stats.tx_errors == 1 and eventfd_count(loop.errs[1]) >= 1


@settings(max_examples=60, deadline=None)
@given(
    frame_len=st.integers(0, 3000),
    rx_sizes=st.lists(st.integers(1, 700), min_size=1, max_size=12),
)
def test_loopback_reassembles_any_split(frame_len: int, rx_sizes: list[int]) -> None:
    bench = Bench(NetBackend("loopback"), size=16)
    try:
        data = os.urandom(frame_len)
        bufs = rx_buffers(bench, rx_sizes)
        send(bench, data)
        bench.kick(1)
        used = bench.used(0)
        need = NET_HDR_SIZE + frame_len
        cum = np.cumsum(rx_sizes)
        if cum[-1] < need:
            assert all(n == 0 for _, n in used) and dev(bench).stats.rx_dropped == 1
            return
        k = int(np.searchsorted(cum, need)) + 1
        assert [h for h, _ in used] == [b[0] for b in bufs[:k]]
        assert sum(n for _, n in used) == need
        got = b"".join(bench.read(gpa, n) for (_, n), (_, gpa, _) in zip(used, bufs, strict=False))
        assert struct.unpack_from("<H", got, 10)[0] == k
        assert got[NET_HDR_SIZE:] == data
    finally:
        bench.close()


def test_loopback_on_packed_rings() -> None:
    bench = Bench(NetBackend("loopback"), size=16, packed=True)
    try:
        bufs = rx_buffers(bench, [40, 40, 1526])
        send(bench, frame(50, 4))  # 62 bytes: two 40-byte buffers
        send(bench, frame(500, 5), split_header=True)
        bench.kick(1)
        used = bench.used(0)
        assert [h for h, _ in used] == [b[0] for b in bufs]
        assert [n for _, n in used] == [40, 22, NET_HDR_SIZE + 500]
        assert rx_header(bench, bufs[0][1])[-1] == 2 and rx_header(bench, bufs[2][1])[-1] == 1
        first = bench.read(bufs[0][1], 40) + bench.read(bufs[1][1], 22)
        assert first[NET_HDR_SIZE:] == frame(50, 4)
        assert bench.read(bufs[2][1] + NET_HDR_SIZE, 500) == frame(500, 5)
    finally:
        bench.close()
