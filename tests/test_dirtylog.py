from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhsm.dirtylog import LOG_PAGE_SIZE, DirtyLog, atomic_or_available
from vhsm.errors import GuestMemoryError, WireError
from vhsm.wire.payloads import VhostUserLog

LOG_SIZE = 64  # bytes: 512 pages = 2 MiB of guest space
OFFSET = 0x1808  # unaligned offset inside the fd


def memfd(size: int) -> int:
    fd = os.memfd_create("vhsm-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def bits_of(data: bytes) -> set[int]:
    return {i * 8 + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1}


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // LOG_PAGE_SIZE, (gpa + length - 1) // LOG_PAGE_SIZE + 1))


@pytest.fixture(params=[True, False], ids=["atomic", "fallback"])
def dlog(request: pytest.FixtureRequest) -> Iterator[tuple[DirtyLog, int]]:
    fd = memfd(OFFSET + LOG_SIZE)
    peek = os.dup(fd)
    d = DirtyLog.from_fd(VhostUserLog(LOG_SIZE, OFFSET), fd, atomic=request.param)
    yield d, peek
    d.close()
    os.close(peek)


def read_log(peek: int) -> bytes:
    return os.pread(peek, LOG_SIZE, OFFSET)


def test_atomic_or_is_available_here() -> None:
    assert atomic_or_available()


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (0, 1),
        (0x0FFF, 1),
        (0x0FFF, 2),  # straddles pages 0 and 1
        (0x1000, 0x1000),  # exactly page 1
        (0x1000, 0x1001),  # pages 1 and 2
        (0x7000, 0x2000),  # crosses a byte boundary (pages 7, 8)
        (0x3000, 0x40000),  # head byte, full bytes, tail byte
        (LOG_SIZE * 8 * LOG_PAGE_SIZE - 1, 1),  # the very last page
        (0, LOG_SIZE * 8 * LOG_PAGE_SIZE),  # everything
    ],
)
def test_mark_sets_exactly_the_touched_pages(
    dlog: tuple[DirtyLog, int], gpa: int, length: int
) -> None:
    d, peek = dlog
    d.mark(gpa, length)
    assert bits_of(read_log(peek)) == pages(gpa, length)


def test_mark_preserves_bits_set_by_others(dlog: tuple[DirtyLog, int]) -> None:
    d, peek = dlog
    os.pwrite(peek, b"\x81", OFFSET)  # pages 0 and 7 already dirty
    d.mark(0x2000, 0x10)  # page 2
    assert bits_of(read_log(peek)) == {0, 2, 7}


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (LOG_SIZE * 8 * LOG_PAGE_SIZE, 1),
        (LOG_SIZE * 8 * LOG_PAGE_SIZE - 1, 2),
        (0, LOG_SIZE * 8 * LOG_PAGE_SIZE + 1),
        (1 << 63, 8),
        (-0x1000, 0x10),
    ],
)
def test_out_of_range_refused_and_nothing_written(
    dlog: tuple[DirtyLog, int], gpa: int, length: int
) -> None:
    d, peek = dlog
    with pytest.raises(GuestMemoryError):
        d.mark(gpa, length)
    assert read_log(peek) == bytes(LOG_SIZE)


def test_zero_length_marks_nothing(dlog: tuple[DirtyLog, int]) -> None:
    d, peek = dlog
    d.mark(0x5000, 0)
    assert read_log(peek) == bytes(LOG_SIZE)
    with pytest.raises(GuestMemoryError):
        d.mark(0x5000, -1)


def test_bytes_beyond_the_log_untouched() -> None:
    fd = memfd(OFFSET + LOG_SIZE + 16)
    peek = os.dup(fd)
    os.pwrite(peek, b"\x00" * (OFFSET + LOG_SIZE + 16), 0)
    d = DirtyLog.from_fd(VhostUserLog(LOG_SIZE, OFFSET), fd)
    d.mark(0, LOG_SIZE * 8 * LOG_PAGE_SIZE)
    data = os.pread(peek, OFFSET + LOG_SIZE + 16, 0)
    assert data[:OFFSET] == bytes(OFFSET)
    assert data[OFFSET : OFFSET + LOG_SIZE] == b"\xff" * LOG_SIZE
    assert data[OFFSET + LOG_SIZE :] == bytes(16)
    d.close()
    os.close(peek)


def test_log_fd_signalled() -> None:
    d = DirtyLog.from_fd(VhostUserLog(LOG_SIZE, 0), memfd(LOG_SIZE))
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    reader = os.dup(efd)
    d.set_log_fd(efd)
    d.mark(0, 1)
    d.mark(0x1000, 1)
    d.mark(0x2000, 1, notify=False)
    assert os.eventfd_read(reader) == 2
    d.notify()
    assert os.eventfd_read(reader) == 1
    d.close()
    with pytest.raises(OSError):
        os.fstat(efd)  # the log owned and closed it
    os.close(reader)


@pytest.mark.parametrize(
    ("desc", "rule"),
    [
        (VhostUserLog(0, 0), "VU-MEM-010"),
        (VhostUserLog(0x100, (1 << 64) - 0x10), "VU-MEM-010"),
    ],
)
def test_bad_descriptions_refused(desc: VhostUserLog, rule: str) -> None:
    fd = memfd(0x1000)
    with pytest.raises(WireError) as info:
        DirtyLog.from_fd(desc, fd)
    assert info.value.rule_id == rule
    with pytest.raises(OSError):
        os.fstat(fd)


def test_short_file_refused() -> None:
    fd = memfd(0x100)
    with pytest.raises(GuestMemoryError, match="too small"):
        DirtyLog.from_fd(VhostUserLog(0x100, 0x10), fd)


def test_close_is_idempotent_and_mark_after_close_refused() -> None:
    d = DirtyLog.from_fd(VhostUserLog(LOG_SIZE, 0), memfd(LOG_SIZE))
    d.close()
    d.close()
    assert d.closed
    with pytest.raises(GuestMemoryError, match="close"):
        d.mark(0, 1)


@pytest.fixture(scope="module")
def shared_log() -> Iterator[tuple[DirtyLog, DirtyLog, int]]:
    fd = memfd(OFFSET + LOG_SIZE)
    peek = os.dup(fd)
    atomic = DirtyLog.from_fd(VhostUserLog(LOG_SIZE, OFFSET), fd)
    plain = DirtyLog.from_fd(VhostUserLog(LOG_SIZE, OFFSET), os.dup(peek), atomic=False)
    yield atomic, plain, peek
    atomic.close()
    plain.close()
    os.close(peek)


@settings(max_examples=200, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, LOG_SIZE * 8 * LOG_PAGE_SIZE - 1), st.integers(1, 0x30000)),
        max_size=8,
    ),
    use_atomic=st.booleans(),
)
def test_marks_match_a_page_model(
    shared_log: tuple[DirtyLog, DirtyLog, int],
    writes: list[tuple[int, int]],
    use_atomic: bool,
) -> None:
    atomic, plain, peek = shared_log
    d = atomic if use_atomic else plain
    os.pwrite(peek, bytes(LOG_SIZE), OFFSET)
    expected: set[int] = set()
    for gpa, length in writes:
        if gpa + length > d.covered:
            with pytest.raises(GuestMemoryError):
                d.mark(gpa, length)
        else:
            d.mark(gpa, length)
            expected |= pages(gpa, length)
    assert bits_of(read_log(peek)) == expected


def test_concurrent_marks_into_shared_bytes_lose_no_bit() -> None:
    # two logs over the same file stand in for two back-end processes/threads without a
    # common lock: only the atomic OR keeps every bit
    fd = memfd(LOG_SIZE)
    peek = os.dup(fd)
    one = DirtyLog.from_fd(VhostUserLog(LOG_SIZE, 0), fd)
    two = DirtyLog.from_fd(VhostUserLog(LOG_SIZE, 0), os.dup(peek))

    def run(d: DirtyLog, parity: int) -> None:
        for _ in range(20):
            for page in range(parity, LOG_SIZE * 8, 2):
                d.mark(page * LOG_PAGE_SIZE, 1)

    threads = [threading.Thread(target=run, args=(d, p)) for d, p in ((one, 0), (two, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert os.pread(peek, LOG_SIZE, 0) == b"\xff" * LOG_SIZE
    one.close()
    two.close()
    os.close(peek)
