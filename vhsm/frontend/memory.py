"""Front-end guest memory: memfd-backed regions, a buffer allocator, GPA/UVA lookups.

The front-end owns guest memory: each region is a memfd mapped
here and handed to the back-end in SET_MEM_TABLE / ADD_MEM_REG. User
addresses are made up (``UVA_BASE + gpa``), deliberately different from
guest addresses so a back-end that mixes the two is caught.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence

from vhsm.errors import GuestMemoryError
from vhsm.wire import VhostUserMemoryRegion

#: Made-up front-end user address of guest address 0.
UVA_BASE = 0x7F00_0000_0000


class GuestRegion:
    """One memfd-backed region of guest memory, mapped in this process.

    ``sealing``: the memfd allows seals, as QEMU's memory-backend-memfd does, so a
    back-end can forbid it to shrink while mapped (vhsm's back-end does); False makes
    one a back-end cannot seal (it must then watch the file's size).
    """

    def __init__(
        self, guest_phys_addr: int, memory_size: int, userspace_addr: int, *, sealing: bool = True
    ) -> None:
        self.guest_phys_addr = guest_phys_addr
        self.memory_size = memory_size
        self.userspace_addr = userspace_addr
        self.mmap_offset = 0
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0)
        self.fd = os.memfd_create(f"vhsm-guest-{guest_phys_addr:#x}", flags)
        os.ftruncate(self.fd, memory_size)
        self._mmap = mmap.mmap(self.fd, memory_size, mmap.MAP_SHARED)
        self.view = memoryview(self._mmap)
        self._free: list[tuple[int, int]] = [(0, memory_size)]  # (offset, length), sorted

    @property
    def end(self) -> int:
        """First guest address past the region."""
        return self.guest_phys_addr + self.memory_size

    def descriptor(self) -> VhostUserMemoryRegion:
        """The region descriptor sent in SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG."""
        return VhostUserMemoryRegion(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    def alloc(self, size: int, align: int) -> int | None:
        """First-fit allocation of ``size`` bytes; return the guest address or None."""
        size = max(size, 1)
        for i, (off, length) in enumerate(self._free):
            start = -(-(self.guest_phys_addr + off) // align) * align - self.guest_phys_addr
            pad = start - off
            if pad + size > length:
                continue
            pieces = []
            if pad:
                pieces.append((off, pad))
            if pad + size < length:
                pieces.append((start + size, length - pad - size))
            self._free[i : i + 1] = pieces
            return self.guest_phys_addr + start
        return None

    def free(self, gpa: int, size: int) -> None:
        """Return ``[gpa, gpa+size)`` to the free list (merging neighbours)."""
        extents = [*self._free, (gpa - self.guest_phys_addr, max(size, 1))]
        extents.sort()
        merged: list[tuple[int, int]] = []
        for off, length in extents:
            if merged and merged[-1][0] + merged[-1][1] >= off:
                last_off, last_len = merged[-1]
                merged[-1] = (last_off, max(last_len, off + length - last_off))
            else:
                merged.append((off, length))
        self._free = merged

    def close(self) -> None:
        """Unmap the region and close its memfd (the mapping outlives views still exported)."""
        try:
            self.view.release()
            self._mmap.close()
        except BufferError:
            pass  # a ring or buffer view is still alive; the mapping goes with it
        os.close(self.fd)


class FrontendMemory:
    """Guest memory as the front-end sees it: regions, allocation, reads and writes.

    It also satisfies the ``GuestMemoryLike`` protocol of ``vhsm.virtq`` (``regions``
    with ``guest_phys_addr`` / ``memory_size`` / ``view``, and ``translate``).
    """

    def __init__(
        self, layout: Sequence[tuple[int, int]] = ((0, 4 << 20),), *, sealing: bool = True
    ) -> None:
        """Create the regions of ``layout`` ((gpa, size) pairs); ``sealing`` as in GuestRegion."""
        self.sealing = sealing
        self._regions: list[GuestRegion] = []
        self._allocs: dict[int, tuple[GuestRegion, int]] = {}
        for gpa, size in layout:
            self.add_region(gpa, size)

    @property
    def regions(self) -> tuple[GuestRegion, ...]:
        """The current regions, by guest address."""
        return tuple(self._regions)

    def __iter__(self) -> Iterator[GuestRegion]:
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def add_region(self, gpa: int, size: int, uva: int | None = None) -> GuestRegion:
        """Create a memfd region at ``gpa`` (it is not sent to the back-end here)."""
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"region size {size:#x} must be a positive multiple of a page")
        for r in self._regions:
            if gpa < r.end and r.guest_phys_addr < gpa + size:
                raise ValueError(f"region {gpa:#x}+{size:#x} overlaps {r.guest_phys_addr:#x}")
        region = GuestRegion(
            gpa, size, UVA_BASE + gpa if uva is None else uva, sealing=self.sealing
        )
        if gpa == 0 and size > mmap.PAGESIZE:
            region.alloc(mmap.PAGESIZE, 1)  # keep guest address 0 out of every buffer
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.guest_phys_addr)
        return region

    def remove_region(self, gpa: int) -> GuestRegion:
        """Detach the region starting at ``gpa``; the caller closes it when done."""
        region = self.region_at(gpa)
        self._regions.remove(region)
        self._allocs = {a: v for a, v in self._allocs.items() if v[0] is not region}
        return region

    def region_at(self, gpa: int) -> GuestRegion:
        """The region containing guest address ``gpa``."""
        for r in self._regions:
            if r.guest_phys_addr <= gpa < r.end:
                return r
        raise GuestMemoryError(f"guest address {gpa:#x} is not in any region")

    def alloc(self, size: int, *, align: int = 16, region: int | None = None) -> int:
        """Allocate ``size`` zeroed bytes of guest memory; return the guest address."""
        candidates = self._regions if region is None else [self.region_at(region)]
        for r in candidates:
            gpa = r.alloc(size, align)
            if gpa is not None:
                self._allocs[gpa] = (r, max(size, 1))
                r.view[gpa - r.guest_phys_addr : gpa - r.guest_phys_addr + size] = bytes(size)
                return gpa
        raise GuestMemoryError(f"out of guest memory allocating {size} bytes")

    def free(self, gpa: int) -> None:
        """Free an allocation made by `alloc`."""
        entry = self._allocs.pop(gpa, None)
        if entry is not None:
            entry[0].free(gpa, entry[1])

    def translate(self, gpa: int, length: int) -> memoryview:
        """Writable view of ``[gpa, gpa+length)``, which must lie inside one region."""
        r = self.region_at(gpa)
        if gpa + length > r.end:
            raise GuestMemoryError(f"{gpa:#x}+{length:#x} crosses the end of its region")
        off = gpa - r.guest_phys_addr
        return r.view[off : off + length]

    def read(self, gpa: int, n: int) -> bytes:
        """Copy ``n`` bytes from guest address ``gpa``."""
        return bytes(self.translate(gpa, n))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``gpa``."""
        self.translate(gpa, len(data))[:] = data

    def gpa_to_uva(self, gpa: int) -> int:
        """The front-end user address of guest address ``gpa`` (used by SET_VRING_ADDR)."""
        r = self.region_at(gpa)
        return r.userspace_addr + gpa - r.guest_phys_addr

    def table(self) -> tuple[tuple[VhostUserMemoryRegion, ...], tuple[int, ...]]:
        """The region descriptors and their memfds, for SET_MEM_TABLE."""
        return tuple(r.descriptor() for r in self._regions), tuple(r.fd for r in self._regions)

    def close(self) -> None:
        """Unmap and close every region."""
        for r in self._regions:
            r.close()
        self._regions.clear()
        self._allocs.clear()
