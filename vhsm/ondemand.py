"""Regions mapped on demand: guest memory reached through page-granular windows.

Some front-ends forbid mapping a region as a whole (Xen's NO_ADVANCE_MAP flag:
the hypervisor or the front-end limits how much of a guest may be mapped at
once). Such a region has no whole-region view. :class:`OnDemandMapping` maps the
pages an access covers when the access happens (a ring's areas when its
addresses are set, a descriptor buffer when its chain is popped), keeps a
bounded cache of those windows (least recently used first out), and unmaps a
window when it leaves the cache.

How pages are mapped is the mapper's business (`vhsm.xen.XenMapper` maps
privcmd foreign frames or gntdev grant references; a plain file works too):
it hands a ``map_pages(first, count)`` callable to the mapping.

Memory safety is the same as for whole regions: a view handed out keeps its
window's ``mmap`` alive, so a window that leaves the cache while a view still
uses it is unmapped when the last view is released, never under it.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections import OrderedDict
from collections.abc import Callable

from vhsm.errors import GuestMemoryError

log = logging.getLogger(__name__)

#: The window granule: Xen maps 4 KiB frames and grant references.
PAGE_SIZE = 4096
#: Windows kept mapped at most (each a run of pages one access needed).
MAX_WINDOWS = 64
#: Pages kept mapped at most over all cached windows (16 MiB).
MAX_CACHED_PAGES = 4096

#: What undoes one mapped window after its ``munmap`` (a gntdev unmap request), or None.
Release = Callable[[], None] | None
#: ``map_pages(first, count)``: an mmap of ``count`` pages of the region from page
#: ``first`` (relative to the region's start), and how to release them afterwards.
MapPages = Callable[[int, int], tuple[mmap.mmap, Release]]

_EMPTY = memoryview(bytearray())


class _Window:
    __slots__ = ("count", "first", "mm", "release", "view")

    def __init__(self, first: int, count: int, mm: mmap.mmap, release: Release) -> None:
        self.first = first
        self.count = count
        self.mm = mm
        self.release = release
        self.view = memoryview(mm)


class OnDemandMapping:
    """A `RegionMapping` whose bytes are mapped per access, window by window.

    ``view`` is empty (there is no whole-region view); :meth:`window` gives the
    bytes of one access. ``maps`` and ``unmaps`` count windows mapped and
    released (for tests and inspection).

    Args:
        size: the region's size in bytes.
        map_pages: maps a run of the region's pages (see `MapPages`).
        what: names the region in errors.
        close: called once when the mapping is closed, after every window (the
            mapper's device fd, for example).
        max_windows: windows kept mapped at most.
        max_pages: pages kept mapped at most over all cached windows.
    """

    def __init__(
        self,
        size: int,
        map_pages: MapPages,
        *,
        what: str,
        close: Callable[[], None] | None = None,
        max_windows: int = MAX_WINDOWS,
        max_pages: int = MAX_CACHED_PAGES,
    ) -> None:
        if size <= 0 or max_windows < 1 or max_pages < 1:
            raise ValueError("an on-demand mapping needs a size and room for one window")
        self.size = size
        self.what = what
        self.max_windows = max_windows
        self.max_pages = max_pages
        self.maps = 0
        self.unmaps = 0
        self._map_pages = map_pages
        self._on_close = close
        self._cache: OrderedDict[tuple[int, int], _Window] = OrderedDict()
        self._cached_pages = 0
        self._lock = threading.Lock()
        self._closed = False

    @property
    def view(self) -> memoryview:
        """Empty: the region is never mapped as a whole (see :meth:`window`)."""
        return _EMPTY

    @property
    def windows(self) -> int:
        """Windows mapped now (cached)."""
        return len(self._cache)

    def window(self, offset: int, length: int) -> memoryview:
        """A writable view of ``[offset, offset+length)`` of the region, mapped if need be.

        A cached window holding the whole range serves it; otherwise the pages the
        range covers are mapped as a new window (the least recently used windows are
        released beyond the cache's bounds).

        Raises:
            GuestMemoryError: the range is outside the region, the mapping is closed,
                or the pages cannot be mapped.
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            raise GuestMemoryError(
                f"{self.what}: [{offset:#x}, {offset + length:#x}) is outside the region"
            )
        if not length:
            return _EMPTY
        first = offset // PAGE_SIZE
        end = (offset + length + PAGE_SIZE - 1) // PAGE_SIZE
        with self._lock:
            if self._closed:
                raise GuestMemoryError(f"{self.what}: the region was unmapped")
            for key, win in self._cache.items():
                if win.first <= first and end <= win.first + win.count:
                    self._cache.move_to_end(key)
                    start = offset - win.first * PAGE_SIZE
                    return win.view[start : start + length]
            win = self._map(first, end - first)
            self._cache[(first, win.count)] = win
            self._cached_pages += win.count
            self._evict()
        start = offset - first * PAGE_SIZE
        return win.view[start : start + length]

    def _map(self, first: int, count: int) -> _Window:
        try:
            mm, release = self._map_pages(first, count)
        except GuestMemoryError:
            raise
        except (OSError, ValueError, OverflowError) as err:
            raise GuestMemoryError(
                f"{self.what}: mapping pages {first:#x}..{first + count - 1:#x} failed: {err}"
            ) from None
        if len(mm) < count * PAGE_SIZE:
            _unmap(_Window(first, count, mm, release))
            raise GuestMemoryError(f"{self.what}: a {count}-page window came back short")
        self.maps += 1
        return _Window(first, count, mm, release)

    def _evict(self) -> None:
        """Release the least recently used windows beyond the bounds (never the newest)."""
        while len(self._cache) > 1 and (
            len(self._cache) > self.max_windows or self._cached_pages > self.max_pages
        ):
            _, old = self._cache.popitem(last=False)
            self._cached_pages -= old.count
            self.unmaps += 1
            _unmap(old)

    def close(self) -> None:
        """Release every window (those still viewed when their last view goes), then the rest."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            windows = list(self._cache.values())
            self._cache.clear()
            self._cached_pages = 0
            self.unmaps += len(windows)
        for win in windows:
            _unmap(win)
        if self._on_close is not None:
            self._on_close()

    def __repr__(self) -> str:
        return f"<OnDemandMapping {self.what} windows={len(self._cache)}>"


def _unmap(win: _Window) -> None:
    """Unmap now (or when its last view goes), then run the mapper's release."""
    try:
        win.view.release()
        win.mm.close()
    except BufferError:
        log.debug("window at page %#x still viewed; unmapped when released", win.first)
    if win.release is not None:
        try:
            win.release()
        except OSError as err:
            log.warning("releasing a window at page %#x failed: %s", win.first, err)


__all__ = [
    "MAX_CACHED_PAGES",
    "MAX_WINDOWS",
    "PAGE_SIZE",
    "MapPages",
    "OnDemandMapping",
]
