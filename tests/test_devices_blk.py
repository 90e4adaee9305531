from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from devices_support import Bench, eventfd_count
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhsm.devices import blk
from vhsm.devices.blk import BlkBackend
from vhsm.wire.enums import BlkFeature, ProtocolFeature, VirtioFeature

SECTORS = 256  # a 128 KiB image
IN, OUT, FLUSH, GET_ID, DISCARD, WZ = 0, 1, 4, 8, 11, 13
OK, IOERR, UNSUPP = 0, 1, 2


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return path


@pytest.fixture
def bench(image: Path) -> Iterator[Bench]:
    b = Bench(BlkBackend(str(image)))
    yield b
    b.close()
    b.backend.close()  # type: ignore[attr-defined]


def request(
    bench: Bench,
    rtype: int,
    sector: int = 0,
    *,
    data: bytes = b"",
    read_len: int = 0,
    queue: int = 0,
    split: int = 0,
) -> tuple[int, int, int]:
    """Post one request (header, data, status) and run it: (used len, status, data gpa).

    The used length is always the chain's writable size (data to read + status).

    ``split`` > 0 puts the data in descriptors of that many bytes.
    """
    hdr = bench.alloc(16, struct.pack("<IIQ", rtype, 0, sector))
    readable = [(hdr, 16)]
    writable = []
    dgpa = 0
    if data:
        dgpa = bench.alloc(len(data), data)
        readable += _pieces(dgpa, len(data), split)
    if read_len:
        dgpa = bench.alloc(read_len)
        writable += _pieces(dgpa, read_len, split)
    status = bench.alloc(1, b"\xff")
    writable.append((status, 1))
    head = bench.post(queue, readable, writable)
    bench.kick(queue)
    used = bench.used(queue)
    assert [h for h, _ in used] == [head]
    return used[0][1], bench.read(status, 1)[0], dgpa


def _pieces(gpa: int, n: int, split: int) -> list[tuple[int, int]]:
    if not split:
        return [(gpa, n)]
    return [(gpa + o, min(split, n - o)) for o in range(0, n, split)]


def test_negotiation_surface(image: Path) -> None:
    dev = BlkBackend(str(image), num_queues=4)
    try:
        feats = dev.features()
        for bit in (
            VirtioFeature.VERSION_1,
            VirtioFeature.RING_INDIRECT_DESC,
            VirtioFeature.RING_EVENT_IDX,
            VirtioFeature.PROTOCOL_FEATURES,
            VirtioFeature.RING_PACKED,
            BlkFeature.FLUSH,
            BlkFeature.DISCARD,
            BlkFeature.WRITE_ZEROES,
            BlkFeature.MQ,
            BlkFeature.BLK_SIZE,
            BlkFeature.SEG_MAX,
            BlkFeature.SIZE_MAX,
        ):
            assert feats & bit, bit
        assert not feats & BlkFeature.RO
        proto = dev.protocol_features()
        for pbit in (
            ProtocolFeature.CONFIG,
            ProtocolFeature.MQ,
            ProtocolFeature.REPLY_ACK,
            ProtocolFeature.BACKEND_REQ,
            ProtocolFeature.CONFIGURE_MEM_SLOTS,
            ProtocolFeature.INFLIGHT_SHMFD,
            ProtocolFeature.RESET_DEVICE,
            ProtocolFeature.STATUS,
            ProtocolFeature.LOG_SHMFD,
        ):
            assert proto & pbit, pbit
        assert dev.num_queues() == dev.queue_num() == 4
        assert [list(q) for q in dev.queues_per_thread()] == [[0], [1], [2], [3]]
    finally:
        dev.close()
    single = BlkBackend(str(image))
    assert not single.features() & BlkFeature.MQ
    single.close()


def test_config_space_layout(image: Path) -> None:
    dev = BlkBackend(str(image), num_queues=3)
    try:
        cfg = dev.get_config(0, 60)
        assert len(cfg) == 60
        assert struct.unpack_from("<Q", cfg, 0)[0] == SECTORS
        size_max, seg_max = struct.unpack_from("<II", cfg, 8)
        assert size_max == blk.SIZE_MAX and seg_max == blk.SEG_MAX
        assert struct.unpack_from("<I", cfg, 20)[0] == 512  # blk_size
        assert struct.unpack_from("<H", cfg, 34)[0] == 3  # num_queues
        max_discard, discard_seg, align = struct.unpack_from("<III", cfg, 36)
        assert max_discard == blk.MAX_ZERO_SECTORS and discard_seg == blk.MAX_ZERO_SEGMENTS
        assert align == 1
        max_wz, wz_seg = struct.unpack_from("<II", cfg, 48)
        assert max_wz == blk.MAX_ZERO_SECTORS and wz_seg == blk.MAX_ZERO_SEGMENTS
        assert cfg[56] == 1  # write_zeroes_may_unmap
        # QEMU asks for 57 bytes; partial windows and reads past the end are zero-padded
        assert dev.get_config(0, 57) == cfg[:57]
        assert dev.get_config(34, 2) == b"\x03\x00"
        assert dev.get_config(58, 8) == bytes(8)
    finally:
        dev.close()


def test_write_then_read_back(bench: Bench, image: Path) -> None:
    payload = os.urandom(4096)
    used, status, _ = request(bench, OUT, 8, data=payload)
    assert (used, status) == (1, OK)
    assert image.read_bytes()[8 * 512 : 8 * 512 + 4096] == payload
    used, status, gpa = request(bench, IN, 8, read_len=4096)
    assert (used, status) == (4097, OK)
    assert bench.read(gpa, 4096) == payload


def test_many_segments_and_region_border(bench: Bench, image: Path) -> None:
    payload = os.urandom(3 * 512)
    used, status, _ = request(bench, OUT, 1, data=payload, split=100)
    assert (used, status) == (1, OK)
    assert image.read_bytes()[512 : 512 + 3 * 512] == payload
    # a read whose single data buffer straddles two guest memory regions
    hdr = bench.alloc(16, struct.pack("<IIQ", IN, 0, 1))
    data = bench.alloc_at_border(700, 3 * 512 - 700)
    st_gpa = bench.alloc(1, b"\xff")
    head = bench.post(0, [(hdr, 16)], [(data, 3 * 512), (st_gpa, 1)])
    bench.kick(0)
    assert bench.used(0) == [(head, 3 * 512 + 1)]
    assert bench.read(st_gpa, 1) == b"\x00"
    assert bench.read(data, 3 * 512) == payload


def test_status_shares_the_last_data_descriptor(bench: Bench) -> None:
    hdr = bench.alloc(16, struct.pack("<IIQ", IN, 0, 0))
    buf = bench.alloc(513)
    head = bench.post(0, [(hdr, 16)], [(buf, 513)])
    bench.kick(0)
    assert bench.used(0) == [(head, 513)]
    assert bench.read(buf, 513) == bytes(range(256)) * 2 + b"\x00"


def test_out_of_range_sector_is_ioerr(bench: Bench) -> None:
    assert request(bench, IN, SECTORS, read_len=512)[:2] == (513, IOERR)
    assert request(bench, IN, SECTORS - 1, read_len=1024)[:2] == (1025, IOERR)
    assert request(bench, OUT, SECTORS, data=bytes(512))[:2] == (1, IOERR)
    assert request(bench, IN, 2**64 - 1, read_len=512)[:2] == (513, IOERR)
    assert request(bench, IN, SECTORS - 1, read_len=512)[:2] == (513, OK)  # last sector
    assert request(bench, OUT, 0, data=bytes(100))[:2] == (1, IOERR)  # not whole sectors


def test_short_header_is_ioerr(bench: Bench) -> None:
    hdr = bench.alloc(8, struct.pack("<II", IN, 0))
    st_gpa = bench.alloc(1, b"\xff")
    head = bench.post(0, [(hdr, 8)], [(st_gpa, 1)])
    bench.kick(0)
    assert bench.used(0) == [(head, 1)]
    assert bench.read(st_gpa, 1) == bytes([IOERR])


def test_header_split_over_descriptors(bench: Bench) -> None:
    hdr = bench.alloc(16, struct.pack("<IIQ", IN, 0, 2))
    buf = bench.alloc(512)
    st_gpa = bench.alloc(1, b"\xff")
    head = bench.post(0, [(hdr, 5), (hdr + 5, 11)], [(buf, 512), (st_gpa, 1)])
    bench.kick(0)
    assert bench.used(0) == [(head, 513)]
    assert bench.read(st_gpa, 1) == b"\x00"
    assert bench.read(buf, 512) == bytes(range(256)) * 2


def test_no_status_byte_is_a_bad_chain(bench: Bench) -> None:
    hdr = bench.alloc(16, struct.pack("<IIQ", FLUSH, 0, 0))
    head = bench.post(0, [(hdr, 16)], [])
    bench.kick(0)
    assert bench.used(0) == [(head, 0)]


def test_unmapped_buffer_completed_with_zero_and_err(bench: Bench) -> None:
    hdr = bench.alloc(16, struct.pack("<IIQ", IN, 0, 0))
    st_gpa = bench.alloc(1, b"\xff")
    head = bench.post(0, [(hdr, 16)], [(0x7FFF_0000_0000, 512), (st_gpa, 1)])
    bench.kick(0)
    assert bench.used(0) == [(head, 0)]
    assert eventfd_count(bench.errs[0]) >= 1
    assert request(bench, FLUSH)[:2] == (1, OK)  # the queue goes on


def test_flush_calls_fsync(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    assert request(bench, FLUSH)[:2] == (1, OK)
    assert synced == [bench.backend.fd]  # type: ignore[attr-defined]


def test_flush_failure_is_ioerr(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(5, "EIO")

    monkeypatch.setattr(os, "fsync", broken)
    assert request(bench, FLUSH)[:2] == (1, IOERR)


def test_get_id(image: Path) -> None:
    bench = Bench(BlkBackend(str(image), serial="vhsm-serial-0123456789abc"))
    try:
        used, status, gpa = request(bench, GET_ID, read_len=20)
        assert (used, status) == (21, OK)
        assert bench.read(gpa, 20) == b"vhsm-serial-01234567"
    finally:
        bench.close()
    bench = Bench(BlkBackend(str(image)))
    try:
        used, status, gpa = request(bench, GET_ID, read_len=20)
        assert (used, status) == (21, OK)
        assert bench.read(gpa, 20) == b"disk.img".ljust(20, b"\0")
    finally:
        bench.close()


def test_unknown_type_is_unsupp(bench: Bench) -> None:
    assert request(bench, 99)[:2] == (1, UNSUPP)
    assert request(bench, 10, read_len=24)[:2] == (25, UNSUPP)  # GET_LIFETIME not offered


def _segments(*segs: tuple[int, int, int]) -> bytes:
    return b"".join(struct.pack("<QII", *s) for s in segs)


@pytest.mark.parametrize("rtype", [DISCARD, WZ])
def test_discard_and_write_zeroes_zero_the_range(bench: Bench, image: Path, rtype: int) -> None:
    before = image.read_bytes()
    used, status, _ = request(bench, rtype, data=_segments((4, 3, 0), (20, 1, 0)))
    assert (used, status) == (1, OK)
    after = image.read_bytes()
    assert len(after) == len(before)
    assert after[4 * 512 : 7 * 512] == bytes(3 * 512)
    assert after[20 * 512 : 21 * 512] == bytes(512)
    assert after[: 4 * 512] == before[: 4 * 512]
    assert after[7 * 512 : 20 * 512] == before[7 * 512 : 20 * 512]
    assert after[21 * 512 :] == before[21 * 512 :]


def test_write_zeroes_with_unmap(bench: Bench, image: Path) -> None:
    used, status, _ = request(bench, WZ, data=_segments((0, 8, 1)))
    assert (used, status) == (1, OK)
    assert image.read_bytes()[: 8 * 512] == bytes(8 * 512)


def test_zeroing_falls_back_to_writes(
    bench: Bench, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fallocate(*args: object) -> int:
        return -1

    monkeypatch.setattr(blk, "_fallocate", lambda: no_fallocate)
    assert request(bench, WZ, data=_segments((2, 2, 0)))[:2] == (1, OK)
    assert image.read_bytes()[2 * 512 : 4 * 512] == bytes(1024)


def test_discard_and_write_zeroes_validation(bench: Bench) -> None:
    assert request(bench, DISCARD, data=_segments((0, 1, 1)))[1] == UNSUPP  # unmap on discard
    assert request(bench, WZ, data=_segments((0, 1, 2)))[1] == UNSUPP  # unknown flag
    assert request(bench, WZ, data=_segments((SECTORS, 1, 0)))[1] == IOERR
    assert request(bench, DISCARD, data=_segments((SECTORS - 1, 2, 0)))[1] == IOERR
    assert request(bench, DISCARD, data=b"\0" * 15)[1] == IOERR  # not whole segments
    assert request(bench, DISCARD)[1] == IOERR  # no segment at all
    too_many = _segments(*[(i, 1, 0) for i in range(blk.MAX_ZERO_SEGMENTS + 1)])
    assert request(bench, DISCARD, data=too_many)[1] == IOERR


def test_read_only_refuses_writes(image: Path) -> None:
    before = image.read_bytes()
    dev = BlkBackend(str(image), read_only=True)
    assert dev.features() & BlkFeature.RO
    bench = Bench(dev)
    try:
        assert request(bench, OUT, 0, data=b"x" * 512)[:2] == (1, IOERR)
        assert request(bench, DISCARD, data=_segments((0, 1, 0)))[1] == IOERR
        assert request(bench, WZ, data=_segments((0, 1, 0)))[1] == IOERR
        assert request(bench, FLUSH)[1] == OK
        used, status, gpa = request(bench, IN, 1, read_len=512)
        assert (used, status) == (513, OK)
        assert bench.read(gpa, 512) == before[512:1024]
    finally:
        bench.close()
        dev.close()
    assert image.read_bytes() == before


def test_multiqueue(image: Path) -> None:
    dev = BlkBackend(str(image), num_queues=3)
    bench = Bench(dev)
    try:
        for q in range(3):
            assert request(bench, OUT, q, data=bytes([q + 1]) * 512, queue=q)[:2] == (1, OK)
        for q in range(3):
            used, status, gpa = request(bench, IN, q, read_len=512, queue=(q + 1) % 3)
            assert (used, status) == (513, OK)
            assert bench.read(gpa, 512) == bytes([q + 1]) * 512
    finally:
        bench.close()
        dev.close()


def test_packed_ring_and_indirect(image: Path) -> None:
    bench = Bench(BlkBackend(str(image)), packed=True)
    try:
        payload = os.urandom(1024)
        assert request(bench, OUT, 3, data=payload)[:2] == (1, OK)
        hdr = bench.alloc(16, struct.pack("<IIQ", IN, 0, 3))
        buf = bench.alloc(1024)
        st_gpa = bench.alloc(1, b"\xff")
        table = bench.alloc(16 * 3, align=16)
        head = bench.drivers[0].add_chain(
            [(hdr, 16)], [(buf, 1024), (st_gpa, 1)], indirect_gpa=table, memory=bench.memory
        )
        bench.kick(0)
        assert bench.used(0) == [(head, 1025)]
        assert bench.read(buf, 1024) == payload
    finally:
        bench.close()


def test_batch_of_requests_in_one_kick(bench: Bench, image: Path) -> None:
    statuses = []
    for i in range(20):
        hdr = bench.alloc(16, struct.pack("<IIQ", OUT, 0, i))
        data = bench.alloc(512, bytes([i]) * 512)
        st_gpa = bench.alloc(1, b"\xff")
        bench.post(0, [(hdr, 16), (data, 512)], [(st_gpa, 1)])
        statuses.append(st_gpa)
    bench.kick(0)
    assert len(bench.used(0)) == 20
    assert all(bench.read(s, 1) == b"\x00" for s in statuses)
    content = image.read_bytes()
    assert all(content[i * 512 : (i + 1) * 512] == bytes([i]) * 512 for i in range(20))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sector=st.integers(0, SECTORS + 4),
    nsect=st.integers(1, 8),
    split=st.sampled_from([0, 100, 512, 700]),
)
def test_io_matches_a_model(image: Path, sector: int, nsect: int, split: int) -> None:
    bench = Bench(BlkBackend(str(image)))
    try:
        model = bytearray(image.read_bytes())
        payload = os.urandom(nsect * 512)
        used, status, _ = request(bench, OUT, sector, data=payload, split=split)
        fits = sector + nsect <= SECTORS
        assert (used, status) == (1, OK if fits else IOERR)
        if fits:
            model[sector * 512 : (sector + nsect) * 512] = payload
        assert image.read_bytes() == bytes(model)
        used, status, gpa = request(bench, IN, sector, read_len=nsect * 512, split=split)
        if fits:
            assert (used, status) == (nsect * 512 + 1, OK)
            assert bench.read(gpa, nsect * 512) == payload
        else:
            assert (used, status) == (nsect * 512 + 1, IOERR)
    finally:
        bench.close()
        bench.backend.close()  # type: ignore[attr-defined]


# --- the limits the config space advertises are enforced ---------------------------------
@pytest.fixture
def big_bench(tmp_path: Path) -> Iterator[Bench]:
    """A 2 MiB image behind a 256-entry ring: room for seg_max segments and size_max bytes."""
    path = tmp_path / "big.img"
    path.write_bytes(bytes(2 << 20))
    b = Bench(BlkBackend(str(path)), size=256)
    yield b
    b.close()
    b.backend.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("rtype", [IN, OUT])
def test_more_segments_than_seg_max_is_ioerr(big_bench: Bench, rtype: int) -> None:
    n = blk.SEG_MAX * 512
    data = os.urandom(n + 512) if rtype == OUT else b""
    read_len = n + 512 if rtype == IN else 0
    # seg_max segments are served; one more fails and leaves the image alone
    ok = request(big_bench, rtype, 0, data=data[:n], read_len=read_len and n, split=512)
    assert ok[1] == OK
    before = Path(big_bench.backend.path).read_bytes()  # type: ignore[attr-defined]
    too_many = request(big_bench, rtype, 0, data=data, read_len=read_len, split=512)
    assert too_many[1] == IOERR
    assert Path(big_bench.backend.path).read_bytes() == before  # type: ignore[attr-defined]


@pytest.mark.parametrize("rtype", [IN, OUT])
def test_segment_larger_than_size_max_is_ioerr(big_bench: Bench, rtype: int) -> None:
    big_bench._next = 2 << 20  # the second region: the buffer is one piece
    n = blk.SIZE_MAX + 512
    data = bytes([7]) * n if rtype == OUT else b""
    status = request(big_bench, rtype, 0, data=data, read_len=0 if data else n)[1]
    assert status == IOERR
    assert Path(big_bench.backend.path).read_bytes() == bytes(2 << 20)  # type: ignore[attr-defined]
    big_bench._next = 2 << 20
    assert (
        request(big_bench, rtype, 0, data=data[: n - 512], read_len=0 if data else n - 512)[1] == OK
    )


def test_read_without_writable_data_is_ioerr(bench: Bench) -> None:
    # header and status only: nothing to read into
    assert request(bench, IN, 0)[:2] == (1, IOERR)
    # the data buffer is device-readable: the device must not pretend it read into it
    hdr = bench.alloc(16, struct.pack("<IIQ", IN, 0, 0))
    buf = bench.alloc(512, b"\xaa" * 512)
    st_gpa = bench.alloc(1, b"\xff")
    head = bench.post(0, [(hdr, 16), (buf, 512)], [(st_gpa, 1)])
    bench.kick(0)
    assert bench.used(0) == [(head, 1)]
    assert bench.read(st_gpa, 1) == bytes([IOERR])
    assert bench.read(buf, 512) == b"\xaa" * 512


def test_short_transfers_are_completed_by_further_calls(
    bench: Bench, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preadv/pwritev that moves fewer bytes than asked is continued where it stopped."""
    real_read, real_write = os.preadv, os.pwritev
    calls: list[int] = []

    def one_segment_at_a_time(real: Any) -> Any:
        def call(fd: int, views: Sequence[memoryview], offset: int) -> int:
            calls.append(len(views))
            return int(real(fd, [views[0][:512]], offset))

        return call

    monkeypatch.setattr(os, "preadv", one_segment_at_a_time(real_read))
    monkeypatch.setattr(os, "pwritev", one_segment_at_a_time(real_write))
    data = bytes(range(256)) * 8
    assert request(bench, OUT, 4, data=data, split=1024)[:2] == (1, OK)
    assert len(calls) == 4  # 2 KiB, 512 bytes per call
    used, status, gpa = request(bench, IN, 4, read_len=2048, split=1024)
    assert (used, status) == (2049, OK)
    assert bench.read(gpa, 2048) == data
    assert image.read_bytes()[4 * 512 : 4 * 512 + 2048] == data


def test_header_sharing_a_descriptor_with_the_data(bench: Bench, image: Path) -> None:
    """The header need not be alone in its descriptor, nor the status byte in its own."""
    data = b"\x5a" * 512
    hdr_and_data = bench.alloc(16 + 512, struct.pack("<IIQ", OUT, 0, 3) + data)
    status = bench.alloc(1, b"\xff")
    head = bench.post(0, [(hdr_and_data, 16 + 512)], [(status, 1)])
    bench.kick(0)
    assert bench.used(0) == [(head, 1)] and bench.read(status, 1) == bytes([OK])
    assert image.read_bytes()[3 * 512 : 4 * 512] == data
    hdr = bench.alloc(16, struct.pack("<IIQ", IN, 0, 3))
    data_and_status = bench.alloc(513, b"\xff" * 513)
    head = bench.post(0, [(hdr, 16)], [(data_and_status, 513)])
    bench.kick(0)
    assert bench.used(0) == [(head, 513)]
    assert bench.read(data_and_status, 513) == data + bytes([OK])
