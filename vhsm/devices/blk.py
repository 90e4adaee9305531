"""A file-backed virtio-blk device: the reference for request/response devices.

Teaching notes:

* Every request is one descriptor chain: a 16-byte device-readable header
  (``type``, ``ioprio``, ``sector``), then data (readable for writes, writable
  for reads), then one writable status byte at the very end.
* Data moves with ``os.preadv``/``os.pwritev`` straight between the file and the
  guest memoryviews of the chain: no copy in Python.
* The used length is the whole device-writable size of the chain, status byte
  included (what QEMU reports too): the status sits at the very end, and dirty
  logging marks the first ``length`` writable bytes, so a shorter length would
  leave the status byte unlogged during migration.
* Anything wrong in a request the guest sent gets a status (IOERR, UNSUPP); only a
  chain with nowhere to put the status is a bad chain (completed with length 0).
  The limits the config space advertises are enforced: a read or write with more
  than ``seg_max`` data segments or a segment over ``size_max`` bytes fails with
  IOERR, as does a read without a device-writable data buffer.
* Each queue gets its own worker thread: ``preadv``/``pwritev``/``fsync`` release
  the GIL, so queues really do I/O in parallel.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from vhsm.backend import (
    EPOLLIN,
    IMPLEMENTED_PROTOCOL_FEATURES,
    RING_FEATURES,
    VhostUserBackend,
    drain,
)
from vhsm.errors import BackendError
from vhsm.wire.enums import BlkFeature, VirtioFeature

if TYPE_CHECKING:
    from vhsm.virtq.chain import DescriptorChain
    from vhsm.vring import VringT

log = logging.getLogger(__name__)

# Request types and status values (virtio spec, block device).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 0x1
VIRTIO_BLK_ID_BYTES = 20

SECTOR = 512
HEADER = struct.Struct("<IIQ")  # type, ioprio (reserved), sector
SEGMENT = struct.Struct("<QII")  # discard / write-zeroes: sector, num_sectors, flags
# virtio_blk_config up to write_zeroes_may_unmap (+3 unused bytes): 60 bytes.
CONFIG = struct.Struct("<QII4xIBBHIBxHIIIIIB3x")

MAX_QUEUE_SIZE = 1024
SIZE_MAX = 1 << 20  # largest data segment, bytes
SEG_MAX = 126  # data segments per request: a 128-entry queue minus header and status
MAX_ZERO_SECTORS = 1 << 23  # per discard / write-zeroes segment (4 GiB)
MAX_ZERO_SEGMENTS = 32  # segments per discard / write-zeroes request
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class BlkBackend(VhostUserBackend):
    """virtio-blk over a file or block device.

    Args:
        path: the image (a regular file or a block device); capacity = its size / 512.
        read_only: open it read-only and offer VIRTIO_BLK_F_RO; writes fail with IOERR.
        num_queues: request queues (more than one offers VIRTIO_BLK_F_MQ).
        serial: the GET_ID string (at most 20 bytes; default: the file's name).
    """

    def __init__(
        self, path: str, read_only: bool = False, num_queues: int = 1, serial: str | None = None
    ) -> None:
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues {num_queues} not in 1..65535")
        self.path = path
        self.read_only = read_only
        self._num_queues = num_queues
        self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        self.capacity = os.lseek(self.fd, 0, os.SEEK_END) // SECTOR  # in 512-byte sectors
        name = serial if serial is not None else os.path.basename(path)
        self.serial = name.encode()[:VIRTIO_BLK_ID_BYTES]

    def close(self) -> None:
        """Close the image."""
        os.close(self.fd)

    # --- negotiation ---------------------------------------------------------------
    def num_queues(self) -> int:
        """One virtqueue per request queue."""
        return self._num_queues

    def max_queue_size(self) -> int:
        """Largest ring accepted."""
        return MAX_QUEUE_SIZE

    def features(self) -> int:
        """Ring features, vhost-user's PROTOCOL_FEATURES and LOG_ALL, and the blk features."""
        bits = (
            RING_FEATURES
            | VirtioFeature.LOG_ALL
            | BlkFeature.SIZE_MAX
            | BlkFeature.SEG_MAX
            | BlkFeature.BLK_SIZE
            | BlkFeature.FLUSH
            | BlkFeature.DISCARD
            | BlkFeature.WRITE_ZEROES
        )
        if self.read_only:
            bits |= BlkFeature.RO
        if self._num_queues > 1:
            bits |= BlkFeature.MQ
        return int(bits)

    def protocol_features(self) -> int:
        """Everything vhsm implements (qemu-storage-daemon's set plus inflight, reset, status)."""
        return IMPLEMENTED_PROTOCOL_FEATURES

    def get_config(self, offset: int, size: int) -> bytes:
        """The virtio_blk_config bytes ``[offset, offset+size)``, zeros past its end."""
        config = CONFIG.pack(
            self.capacity,
            SIZE_MAX,
            SEG_MAX,
            SECTOR,  # blk_size
            0,  # physical_block_exp
            0,  # alignment_offset
            1,  # min_io_size (logical blocks)
            0,  # opt_io_size
            0,  # wce (meaningful only with CONFIG_WCE, not offered)
            self._num_queues,
            MAX_ZERO_SECTORS,  # max_discard_sectors
            MAX_ZERO_SEGMENTS,  # max_discard_seg
            1,  # discard_sector_alignment
            MAX_ZERO_SECTORS,  # max_write_zeroes_sectors
            MAX_ZERO_SEGMENTS,  # max_write_zeroes_seg
            1,  # write_zeroes_may_unmap
        )
        return config[offset : offset + size].ljust(size, b"\0")

    def queues_per_thread(self) -> Sequence[Sequence[int]]:
        """One worker per queue: file I/O releases the GIL."""
        return [[q] for q in range(self._num_queues)]

    # --- the data path -------------------------------------------------------------
    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        """Drain queue ``device_event``: suppress kicks while busy, re-check after re-enabling."""
        if evset != EPOLLIN or not 0 <= device_event < self._num_queues:
            raise BackendError(f"blk: unexpected event {device_event} ({evset:#x})")
        drain(vrings[device_event], lambda chain: self.process(chain, device_event))

    def process(self, chain: DescriptorChain, queue: int = 0) -> int:
        """Serve one request; returns the used length (the chain's writable size).

        Every driver puts the header alone in the first descriptor and the status
        byte alone in the last one: that layout is read without copying or
        re-slicing; any other arrangement of the same bytes is served the same way.
        """
        wlen = chain.writable_len
        if not wlen:
            log.warning("blk queue %d head %d: no writable status byte", queue, chain.head)
            return 0
        writable = chain.writable
        last = writable[-1]  # the status byte is the last writable byte
        if chain.readable_len < HEADER.size:
            log.warning("blk queue %d head %d: short header", queue, chain.head)
            last[-1] = VIRTIO_BLK_S_IOERR
            return wlen
        readable = chain.readable
        first = readable[0]
        if len(first) == HEADER.size:
            rtype, _ioprio, sector = HEADER.unpack(first)
            data_in = readable[1:]
        else:
            rtype, _ioprio, sector = HEADER.unpack_from(chain.read(HEADER.size))
            data_in = _skip(readable, HEADER.size)
        data_out = writable[:-1] if len(last) == 1 else [*writable[:-1], last[:-1]]
        try:
            status = self._dispatch(rtype, sector, data_in, data_out, wlen - 1)
        except OSError as exc:
            log.warning(
                "blk queue %d: request type %d sector %d: %s", queue, rtype, sector, str(exc)
            )
            status = VIRTIO_BLK_S_IOERR
        last[-1] = status
        return wlen

    def _dispatch(
        self,
        rtype: int,
        sector: int,
        data_in: Sequence[memoryview],
        data_out: Sequence[memoryview],
        out_len: int,
    ) -> int:
        """Run one request (``out_len``: the bytes of ``data_out``); returns its status."""
        if rtype == VIRTIO_BLK_T_IN:
            # a read needs somewhere to put the data, and no device-readable data
            if data_in or not data_out or not _within_limits(data_out):
                return VIRTIO_BLK_S_IOERR
            if not self._in_range(sector, out_len):
                return VIRTIO_BLK_S_IOERR
            _preadv_all(self.fd, data_out, sector * SECTOR, out_len)
            return VIRTIO_BLK_S_OK
        if rtype == VIRTIO_BLK_T_OUT:
            if self.read_only or not _within_limits(data_in):
                return VIRTIO_BLK_S_IOERR
            in_len = sum(map(len, data_in))
            if not self._in_range(sector, in_len):
                return VIRTIO_BLK_S_IOERR
            _pwritev_all(self.fd, data_in, sector * SECTOR, in_len)
            return VIRTIO_BLK_S_OK
        if rtype == VIRTIO_BLK_T_FLUSH:
            if not self.read_only:
                os.fsync(self.fd)
            return VIRTIO_BLK_S_OK
        if rtype == VIRTIO_BLK_T_GET_ID:
            _scatter(data_out, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0"))
            return VIRTIO_BLK_S_OK
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            return self._zero_segments(rtype, b"".join(data_in))
        return VIRTIO_BLK_S_UNSUPP

    def _in_range(self, sector: int, nbytes: int) -> bool:
        """Whole sectors, all inside the capacity."""
        return nbytes % SECTOR == 0 and sector + nbytes // SECTOR <= self.capacity

    def _zero_segments(self, rtype: int, data: bytes) -> int:
        """DISCARD / WRITE_ZEROES: every segment reads back as zeros afterwards."""
        if not data or len(data) % SEGMENT.size or len(data) // SEGMENT.size > MAX_ZERO_SEGMENTS:
            return VIRTIO_BLK_S_IOERR
        segments = list(SEGMENT.iter_unpack(data))
        for sector, count, flags in segments:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                return VIRTIO_BLK_S_UNSUPP  # unknown flag bits
            if rtype == VIRTIO_BLK_T_DISCARD and flags:
                return VIRTIO_BLK_S_UNSUPP  # the unmap flag is for write-zeroes only
            if self.read_only or count > MAX_ZERO_SECTORS:
                return VIRTIO_BLK_S_IOERR
            if not self._in_range(sector, count * SECTOR):
                return VIRTIO_BLK_S_IOERR
        for sector, count, flags in segments:
            unmap = rtype == VIRTIO_BLK_T_DISCARD or bool(flags)
            _zero_range(self.fd, sector * SECTOR, count * SECTOR, unmap=unmap)
        return VIRTIO_BLK_S_OK


# --- helpers over lists of memoryviews ---------------------------------------------------
def _within_limits(data: Sequence[memoryview]) -> bool:
    """At most SEG_MAX data segments, none longer than SIZE_MAX (the limits the config offers).

    Segments are counted as mapped pieces: a descriptor that crosses a memory-region
    border counts twice (guest RAM regions are not adjacent in practice).
    """
    if len(data) == 1:  # the usual request: one data buffer
        return len(data[0]) <= SIZE_MAX
    return len(data) <= SEG_MAX and (not data or max(map(len, data)) <= SIZE_MAX)


def _skip(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """The views after the first ``n`` bytes."""
    out: list[memoryview] = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


def _scatter(views: Sequence[memoryview], data: bytes) -> int:
    """Copy ``data`` into the views in order; returns bytes copied (short if they are)."""
    done = 0
    for v in views:
        n = min(len(v), len(data) - done)
        v[:n] = data[done : done + n]
        done += n
    return done


def _advance(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """Drop ``n`` bytes from the front (after a short read or write)."""
    return _skip(views, n)


def _preadv_all(fd: int, views: Sequence[memoryview], offset: int, total: int) -> None:
    """Fill every view (``total`` bytes) from ``offset``; past the end of the file is an error.

    One ``preadv`` does it unless the read comes back short.
    """
    if len(views) <= IOV_MAX:
        n = os.preadv(fd, views, offset)
        if n == total:
            return
        if n == 0:
            raise OSError(errno.EIO, "unexpected end of image")
        offset += n
        views = _advance(views, n)
    while views:
        n = os.preadv(fd, views[:IOV_MAX], offset)
        if n == 0:
            raise OSError(errno.EIO, "unexpected end of image")
        offset += n
        views = _advance(views, n)


def _pwritev_all(fd: int, views: Sequence[memoryview], offset: int, total: int) -> None:
    """Write every view (``total`` bytes) at ``offset``, retrying short writes."""
    if len(views) <= IOV_MAX:
        n = os.pwritev(fd, views, offset)
        if n == total:
            return
        offset += n
        views = _advance(views, n)
    while views:
        n = os.pwritev(fd, views[:IOV_MAX], offset)
        offset += n
        views = _advance(views, n)


# fallocate(2) modes: the stdlib has no wrapper taking flags.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int]:
    """The C library's fallocate(2), found once, when a guest first discards or zeroes.

    ctypes is imported here, not with the module: an idle daemon does not carry it.
    The C library is the one Python itself runs on (``CDLL(None)``).
    """
    import ctypes

    func = ctypes.CDLL(None, use_errno=True).fallocate
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


@functools.cache
def _zeros() -> memoryview:
    """A chunk of zeros for file systems that can neither punch holes nor zero ranges."""
    return memoryview(bytes(_ZERO_CHUNK))


def _zero_range(fd: int, offset: int, length: int, *, unmap: bool) -> None:
    """Make ``[offset, offset+length)`` read as zeros: punch a hole (unmap) or zero the range.

    Falls back to writing zeros where the file system supports neither.
    """
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if unmap else FALLOC_FL_ZERO_RANGE
    if length == 0 or _fallocate()(fd, mode, offset, length) == 0:
        return
    zeros = _zeros()
    while length:
        n = os.pwrite(fd, zeros[: min(length, _ZERO_CHUNK)], offset)
        offset += n
        length -= n
