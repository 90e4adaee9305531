"""The dirty-page log of live migration: one bit per 4 KiB guest page, shared with the front-end.

The front-end reads and clears the bitmap concurrently, so bits are set with an atomic
byte OR (``__atomic_fetch_or_1`` from libatomic through ctypes). Bytes whose eight pages
are all dirty are simply stored as 0xFF: a byte store is atomic and its result is the same
as the OR. Fallback when libatomic cannot be loaded: a plain read-modify-write under our
lock. Against a front-end that atomically fetches-and-clears words, that race can only
re-set bits it already collected (an extra page copy), never lose one of ours.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import TYPE_CHECKING

from vhsm.errors import GuestMemoryError, WireError
from vhsm.memory import map_fd

if TYPE_CHECKING:
    import ctypes
    from collections.abc import Callable

    from vhsm.wire.payloads import VhostUserLog

__all__ = ["LOG_PAGE_SHIFT", "LOG_PAGE_SIZE", "DirtyLog", "atomic_or_available"]

log = logging.getLogger(__name__)

LOG_PAGE_SHIFT = 12
LOG_PAGE_SIZE = 1 << LOG_PAGE_SHIFT
"""``VHOST_LOG_PAGE``: each bit of the log covers this many bytes of guest-physical space."""

_SEQ_CST = 5  # __ATOMIC_SEQ_CST


@functools.cache
def _fetch_or() -> Callable[[int, int, int], int] | None:
    """The byte OR of libatomic, loaded with the first log (not a daemon's until then)."""
    import ctypes

    for name in ("libatomic.so.1", "libatomic.so"):
        try:
            lib = ctypes.CDLL(name)
            func = getattr(lib, "__atomic_fetch_or_1")
        except (OSError, AttributeError):
            continue
        func.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int]
        func.restype = ctypes.c_uint8
        return func  # type: ignore[no-any-return]
    log.warning("libatomic not found: dirty log bits set with a locked read-modify-write")
    return None


def atomic_or_available() -> bool:
    """Whether bytes of the log are OR-ed atomically (libatomic loaded)."""
    return _fetch_or() is not None


class DirtyLog:
    """The mapped log bitmap from SET_LOG_BASE, plus the optional SET_LOG_FD eventfd."""

    def __init__(
        self,
        view: memoryview,
        *,
        close: Callable[[], None] | None = None,
        atomic: bool = True,
    ) -> None:
        """Wrap ``view`` (the log bytes, byte 0 covering GPA 0); ``close`` unmaps it.

        ``atomic=False`` forces the locked read-modify-write fallback (tests, odd platforms).
        """
        self._view = view
        self._size = view.nbytes
        self._close_mapping = close
        self._lock = threading.Lock()
        self._log_fd: int | None = None
        self._closed = False
        self._anchor: ctypes.Array[ctypes.c_char] | None = None
        self._base = 0
        self._fetch_or = _fetch_or() if atomic else None
        if self._fetch_or is not None and self._size:
            import ctypes

            # Holding the ctypes object keeps the buffer exported until close().
            self._anchor = (ctypes.c_char * self._size).from_buffer(view)
            self._base = ctypes.addressof(self._anchor)

    @classmethod
    def from_fd(
        cls, desc: VhostUserLog, fd: int, *, request: str = "SET_LOG_BASE", atomic: bool = True
    ) -> DirtyLog:
        """Map the log described by ``desc`` from ``fd`` (always closed).

        Raises:
            WireError: ``mmap_size`` 0 or offset + size overflow (VU-MEM-010).
            GuestMemoryError: the file is shorter than offset + size, or mmap failed.
        """
        try:
            if desc.mmap_size <= 0:
                raise WireError(request, "mmap_size", desc.mmap_size, ">= 1", "VU-MEM-010")
            if desc.mmap_offset < 0 or desc.mmap_offset + desc.mmap_size > 1 << 64:
                raise WireError(
                    request,
                    "mmap_offset",
                    desc.mmap_offset,
                    f"mmap_offset + mmap_size ({desc.mmap_size:#x}) <= 2**64",
                    "VU-MEM-010",
                )
            mapping = map_fd(fd, desc.mmap_offset, desc.mmap_size, what=f"{request} dirty log")
        finally:
            try:
                os.close(fd)
            except OSError:
                log.debug("closing log fd %d failed", fd)
        return cls(mapping.view, close=mapping.close, atomic=atomic)

    @property
    def size(self) -> int:
        """Bytes of bitmap (covers ``size * 8 * 4096`` bytes of guest-physical space)."""
        return self._size

    @property
    def covered(self) -> int:
        """The first guest-physical address the log cannot record."""
        return self._size << (LOG_PAGE_SHIFT + 3)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def set_log_fd(self, fd: int | None) -> None:
        """Install (or with None remove) the SET_LOG_FD eventfd; takes ownership of ``fd``."""
        with self._lock:
            old, self._log_fd = self._log_fd, fd
        if old is not None:
            os.close(old)

    def mark(self, gpa: int, length: int, *, notify: bool = True) -> None:
        """Set the bit of every 4 KiB page that ``[gpa, gpa+length)`` touches.

        Signals the log eventfd afterwards when one is set and ``notify`` is true.

        Raises:
            GuestMemoryError: the range reaches beyond the log (nothing is written), or the
                log is closed.
        """
        if length <= 0:
            if length < 0 or gpa < 0:
                raise GuestMemoryError(f"dirty log: bad range gpa={gpa:#x} length={length}")
            return
        first = gpa >> LOG_PAGE_SHIFT
        last = (gpa + length - 1) >> LOG_PAGE_SHIFT
        b0, b1 = first >> 3, last >> 3
        if gpa < 0 or b1 >= self._size:
            raise GuestMemoryError(
                f"dirty log: range [{gpa:#x}, {gpa + length:#x}) needs log byte {b1:#x}, "
                f"the log has {self._size:#x} bytes (covers up to {self.covered:#x})"
            )
        head = (0xFF << (first & 7)) & 0xFF
        tail = 0xFF >> (7 - (last & 7))
        with self._lock:
            if self._closed:
                raise GuestMemoryError("dirty log: mark() after close()")
            if b0 == b1:
                self._or(b0, head & tail)
            else:
                self._or(b0, head)
                if b1 - b0 > 1:
                    self._view[b0 + 1 : b1] = b"\xff" * (b1 - b0 - 1)
                self._or(b1, tail)
            fd = self._log_fd if notify else None
            if fd is not None:
                self._signal(fd)

    def notify(self) -> None:
        """Signal the log eventfd (after a batch of ``mark(..., notify=False)``)."""
        with self._lock:
            if self._log_fd is not None and not self._closed:
                self._signal(self._log_fd)

    def _or(self, index: int, bits: int) -> None:
        fetch_or = self._fetch_or
        if fetch_or is not None:
            fetch_or(self._base + index, bits, _SEQ_CST)
        else:
            view = self._view
            view[index] = view[index] | bits

    @staticmethod
    def _signal(fd: int) -> None:
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:
            pass  # counter saturated: the reader has a wake-up pending anyway
        except OSError as exc:
            log.warning("signalling the log fd %d failed: %s", fd, str(exc))

    def close(self) -> None:
        """Unmap the log and close the log fd (idempotent); later marks raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            fd, self._log_fd = self._log_fd, None
            self._anchor = None
            self._base = 0
            if self._close_mapping is not None:
                self._close_mapping()
        if fd is not None:
            os.close(fd)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._size:#x} bytes"
        return f"<DirtyLog {state}, atomic={self._fetch_or is not None}>"
