"""Xen guest memory: a `RegionMapper` for memory regions that carry Xen fields.

With the XEN_MMAP protocol feature a memory region descriptor has two more
fields: ``xen_mmap_flags`` and ``domid``. The flags say how the region is mapped:

* 0: a plain Unix mapping of the region's fd (as without Xen);
* FOREIGN: the guest's frames are mapped through the privcmd device
  (``/dev/xen/privcmd``): ``mmap`` of the device reserves the range, then
  ``IOCTL_PRIVCMD_MMAPBATCH_V2`` fills it with the domain's frames, one guest
  frame number per page starting at ``guest_phys_addr / 4096``;
* GRANT: the pages are grant references of the domain, mapped through the
  gntdev device (``/dev/xen/gntdev``): ``IOCTL_GNTDEV_MAP_GRANT_REF`` inserts the
  references (``guest_phys_addr / 4096`` on, bit 63 of the address ignored) and
  returns an offset, at which the device is then ``mmap``-ed;
* NO_ADVANCE_MAP (with FOREIGN or GRANT): the front-end forbids mapping the
  region as a whole. The region is then a `vhsm.ondemand.OnDemandMapping`:
  nothing is mapped when the table arrives; each access (a ring's areas when
  its addresses are set, each descriptor buffer when its chain is popped) maps
  the pages it covers through the same device, as one window, and a bounded
  cache of windows is kept (the least recently used are unmapped first).

When the front-end sends the Xen device's own fd with the region (a character
device, as Xen's vhost-user front-ends do), that fd is used; otherwise the
device is opened by path. A missing device is an error naming it. The argument
structures are ctypes mirrors of the kernel UAPI headers ``xen/privcmd.h`` and
``xen/gntdev.h`` (the tests compare sizes, offsets and request numbers with
the headers themselves).

Choose the mapper when building the daemon::

    VhostUserDaemon("dev", backend, mapper=XenMapper())

and offer ``ProtocolFeature.XEN_MMAP`` from the back-end's ``protocol_features``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

from vhsm.errors import GuestMemoryError, VhsmError
from vhsm.ioctl import io
from vhsm.memory import MmapMapping, map_fd
from vhsm.ondemand import OnDemandMapping, Release
from vhsm.wire.enums import ProtocolFeature, XenMmapFlag

if TYPE_CHECKING:
    from vhsm.backend import VhostUserBackend
    from vhsm.memory import RegionMapping
    from vhsm.wire.payloads import VhostUserMemoryRegion

log = logging.getLogger(__name__)

PRIVCMD_DEVICE = "/dev/xen/privcmd"
GNTDEV_DEVICE = "/dev/xen/gntdev"
XEN_PAGE_SIZE = 4096
#: Grant regions carry this bit in their guest address (not part of the reference).
GRANT_ADDR_BIT = 1 << 63


class PrivcmdMmapbatchV2(ctypes.Structure):
    """``struct privcmd_mmapbatch_v2`` (xen/privcmd.h)."""

    _fields_ = (
        ("num", ctypes.c_uint),  # number of pages to populate
        ("dom", ctypes.c_uint16),  # domid_t: target domain
        ("addr", ctypes.c_uint64),  # virtual address
        ("arr", ctypes.POINTER(ctypes.c_uint64)),  # const xen_pfn_t *: frames
        ("err", ctypes.POINTER(ctypes.c_int)),  # int *: per-frame error codes
    )


class GntdevGrantRef(ctypes.Structure):
    """``struct ioctl_gntdev_grant_ref`` (xen/gntdev.h)."""

    _fields_ = (("domid", ctypes.c_uint32), ("ref", ctypes.c_uint32))


class GntdevMapGrantRef(ctypes.Structure):
    """``struct ioctl_gntdev_map_grant_ref`` with its one declared ``refs`` entry."""

    _fields_ = (
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("index", ctypes.c_uint64),  # out: the offset to mmap at
        ("refs", GntdevGrantRef * 1),
    )


class GntdevUnmapGrantRef(ctypes.Structure):
    """``struct ioctl_gntdev_unmap_grant_ref`` (xen/gntdev.h)."""

    _fields_ = (
        ("index", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


IOCTL_PRIVCMD_MMAPBATCH_V2 = io("P", 4, ctypes.sizeof(PrivcmdMmapbatchV2))
IOCTL_GNTDEV_MAP_GRANT_REF = io("G", 0, ctypes.sizeof(GntdevMapGrantRef))
IOCTL_GNTDEV_UNMAP_GRANT_REF = io("G", 1, ctypes.sizeof(GntdevUnmapGrantRef))

#: ``ioctl(fd, request, argument)``: replaceable in tests (no Xen here).
Ioctl = Callable[[int, int, ctypes.Structure | ctypes.Array[ctypes.c_char]], int]


def _ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.Array[ctypes.c_char]) -> int:
    return fcntl.ioctl(fd, request, arg, True)  # type: ignore[no-any-return]


def map_grant_ref_arg(domid: int, first_ref: int, count: int) -> ctypes.Array[ctypes.c_char]:
    """The IOCTL_GNTDEV_MAP_GRANT_REF argument: header, then ``count`` references."""
    size = ctypes.sizeof(GntdevMapGrantRef) + (count - 1) * ctypes.sizeof(GntdevGrantRef)
    buf = ctypes.create_string_buffer(size)
    head = GntdevMapGrantRef.from_buffer(buf)
    head.count = count
    refs = (GntdevGrantRef * count).from_buffer(buf, GntdevMapGrantRef.refs.offset)
    for i in range(count):
        refs[i].domid = domid
        refs[i].ref = first_ref + i
    return buf


class XenMapping:
    """A region mapped through a Xen device: ``view`` over the mmap, ``close`` undoes it."""

    def __init__(
        self,
        mm: mmap.mmap,
        size: int,
        undo: Callable[[], None] | None = None,
        own_fd: int | None = None,
    ) -> None:
        self._inner = MmapMapping(mm, memoryview(mm)[:size], 0, size)
        self._undo = undo
        self._own_fd = own_fd

    @property
    def view(self) -> memoryview:
        """The region's bytes."""
        return self._inner.view

    def close(self) -> None:
        """Unmap (deferred to the GC while views are out), then release the Xen side."""
        self._inner.close()
        undo, self._undo = self._undo, None
        if undo is not None and self._inner.closed:
            try:
                undo()
            except OSError as err:
                log.warning("xen: releasing a mapping failed: %s", err)
        fd, self._own_fd = self._own_fd, None
        if fd is not None:
            os.close(fd)


class XenMapper:
    """Maps memory regions by their Xen flags (see the module docstring).

    Args:
        privcmd: path of the privcmd device (foreign mappings).
        gntdev: path of the gntdev device (grant mappings).
        ioctl: the ioctl call (tests replace it; the default is ``fcntl.ioctl``).
    """

    def __init__(
        self,
        privcmd: str = PRIVCMD_DEVICE,
        gntdev: str = GNTDEV_DEVICE,
        *,
        ioctl: Ioctl = _ioctl,
    ) -> None:
        self.privcmd = privcmd
        self.gntdev = gntdev
        self.ioctl = ioctl

    def map_region(self, region: VhostUserMemoryRegion, fd: int) -> RegionMapping:
        """Map one region; GuestMemoryError says what was wrong or missing."""
        flags = region.xen_mmap_flags or 0
        what = _describe(region)
        known = int(XenMmapFlag.FOREIGN | XenMmapFlag.GRANT | XenMmapFlag.NO_ADVANCE_MAP)
        unknown = flags & ~known  # as ints: ~ of an IntFlag keeps only the declared bits
        if unknown:
            raise GuestMemoryError(f"{what}: unknown xen_mmap_flags bits {unknown:#x}")
        kind = flags & (XenMmapFlag.FOREIGN | XenMmapFlag.GRANT)
        on_demand = bool(flags & XenMmapFlag.NO_ADVANCE_MAP)
        if kind == XenMmapFlag.FOREIGN | XenMmapFlag.GRANT:
            raise GuestMemoryError(f"{what}: both FOREIGN and GRANT set in xen_mmap_flags")
        if kind == 0:
            if on_demand:
                raise GuestMemoryError(
                    f"{what}: NO_ADVANCE_MAP needs FOREIGN or GRANT (a plain region is mapped"
                    " whole)"
                )
            return map_fd(fd, region.mmap_offset, region.memory_size, what=what)
        if region.mmap_offset:
            raise GuestMemoryError(f"{what}: a Xen mapping starts at offset 0 of its device")
        if region.memory_size % XEN_PAGE_SIZE:
            raise GuestMemoryError(f"{what}: size is not a multiple of {XEN_PAGE_SIZE}")
        domid = region.domid or 0
        count = region.memory_size // XEN_PAGE_SIZE
        if kind == XenMmapFlag.FOREIGN:
            dev, own = self._device_fd(fd, self.privcmd, what, "foreign", keep=on_demand)
            first = region.guest_phys_addr // XEN_PAGE_SIZE

            def pages(page: int, n: int) -> tuple[mmap.mmap, Release]:
                return self._foreign_pages(dev, domid, first + page, n, what), None

        else:
            dev, own = self._device_fd(fd, self.gntdev, what, "grant", keep=on_demand)
            first = (region.guest_phys_addr & ~GRANT_ADDR_BIT) // XEN_PAGE_SIZE

            def pages(page: int, n: int) -> tuple[mmap.mmap, Release]:
                return self._grant_pages(dev, domid, first + page, n, what)

        if on_demand:
            return OnDemandMapping(region.memory_size, pages, what=what, close=lambda: _close(own))
        try:
            mm, release = pages(0, count)
        except BaseException:
            _close(own)
            raise
        return XenMapping(mm, region.memory_size, release, own_fd=own)

    def _device_fd(
        self, fd: int, path: str, what: str, kind: str, *, keep: bool = False
    ) -> tuple[int, int | None]:
        """The front-end's fd when it is a Xen character device, else ``path`` opened.

        Returns (fd to use, fd this mapping owns and closes). ``keep``: the mapping
        outlives this call (on demand), so the front-end's fd is duplicated.
        """
        try:
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                if keep:
                    own = os.dup(fd)
                    return own, own
                return fd, None
        except OSError:
            pass
        try:
            own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise GuestMemoryError(
                f"{what}: Xen {kind} mapping needs {path}: {err.strerror} (no Xen device here:"
                " not a Xen domain, or its driver is not loaded)"
            ) from None
        return own, own

    def _foreign_pages(self, dev: int, domid: int, first: int, count: int, what: str) -> mmap.mmap:
        """``count`` frames of ``domid`` from guest frame ``first``: privcmd mmap + batch ioctl."""
        size = count * XEN_PAGE_SIZE
        try:
            mm = mmap.mmap(dev, size, flags=mmap.MAP_SHARED)
        except (OSError, ValueError) as err:
            raise GuestMemoryError(f"{what}: mmap of {self.privcmd} failed: {err}") from None
        frames = (ctypes.c_uint64 * count)(*range(first, first + count))
        errors = (ctypes.c_int * count)()
        anchor = ctypes.c_char.from_buffer(mm)
        arg = PrivcmdMmapbatchV2(count, domid, ctypes.addressof(anchor), frames, errors)
        del anchor
        try:
            self.ioctl(dev, IOCTL_PRIVCMD_MMAPBATCH_V2, arg)
        except OSError as err:
            mm.close()
            bad = next((i for i in range(count) if errors[i]), None)
            detail = f" (frame {first + bad}: error {errors[bad]})" if bad is not None else ""
            raise GuestMemoryError(
                f"{what}: IOCTL_PRIVCMD_MMAPBATCH_V2 for domain {domid} failed: "
                f"{err.strerror or err}{detail}"
            ) from None
        return mm

    def _grant_pages(
        self, dev: int, domid: int, first: int, count: int, what: str
    ) -> tuple[mmap.mmap, Release]:
        """``count`` grant references of ``domid`` from ``first``: gntdev ioctl, then mmap."""
        arg = map_grant_ref_arg(domid, first, count)
        try:
            self.ioctl(dev, IOCTL_GNTDEV_MAP_GRANT_REF, arg)
        except OSError as err:
            raise GuestMemoryError(
                f"{what}: IOCTL_GNTDEV_MAP_GRANT_REF of {count} references of domain {domid} "
                f"failed: {err.strerror or err}"
            ) from None
        index = GntdevMapGrantRef.from_buffer(arg).index

        def unmap() -> None:
            self.ioctl(dev, IOCTL_GNTDEV_UNMAP_GRANT_REF, GntdevUnmapGrantRef(index, count, 0))

        try:
            mm = mmap.mmap(dev, count * XEN_PAGE_SIZE, flags=mmap.MAP_SHARED, offset=index)
        except (OSError, ValueError, OverflowError) as err:
            with contextlib.suppress(OSError):
                unmap()
            raise GuestMemoryError(
                f"{what}: mmap of {self.gntdev} at {index:#x} failed: {err}"
            ) from None
        return mm, unmap


def require_privcmd(path: str = PRIVCMD_DEVICE) -> None:
    """Check that the privcmd device opens read/write (``vhsm serve --xen`` at start-up).

    Every Xen back-end needs privcmd (foreign mappings; Xen's front-ends map guests
    that way by default), so its absence stops the daemon before it listens. gntdev
    is needed only when a grant region arrives: that region is refused then.

    Raises:
        VhsmError: one line naming the device and why it cannot be used.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise VhsmError(
            f"--xen needs {path}: {err.strerror} (not a Xen domain, or its privcmd driver"
            " is not loaded)"
        ) from None
    os.close(fd)


def offer_xen_mmap(backend: VhostUserBackend) -> VhostUserBackend:
    """Make ``backend`` offer the XEN_MMAP protocol feature besides its own (``--xen``)."""
    offered = backend.protocol_features

    def protocol_features() -> int:
        return offered() | ProtocolFeature.XEN_MMAP

    backend.protocol_features = protocol_features  # type: ignore[method-assign]
    return backend


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _describe(region: VhostUserMemoryRegion) -> str:
    return (
        f"region gpa={region.guest_phys_addr:#x} size={region.memory_size:#x} "
        f"xen_mmap_flags={region.xen_mmap_flags or 0:#x} domid={region.domid or 0}"
    )


__all__ = [
    "GNTDEV_DEVICE",
    "IOCTL_GNTDEV_MAP_GRANT_REF",
    "IOCTL_GNTDEV_UNMAP_GRANT_REF",
    "IOCTL_PRIVCMD_MMAPBATCH_V2",
    "PRIVCMD_DEVICE",
    "GntdevGrantRef",
    "GntdevMapGrantRef",
    "GntdevUnmapGrantRef",
    "PrivcmdMmapbatchV2",
    "XenMapper",
    "XenMapping",
    "map_grant_ref_arg",
    "offer_xen_mmap",
    "require_privcmd",
]
