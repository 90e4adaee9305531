"""Payload layouts of vhost-user messages, one frozen attrs class each.

Every class has a precompiled little-endian ``STRUCT``, ``to_bytes()`` and a
``from_bytes(data, request, xen=False)`` class method that checks the size and
the payload's own rules and raises :class:`~vhsm.errors.WireError` naming the
request, the field, the value, the allowed range and the rule id. Construction
never validates, so tests and the auditor can build bad payloads on purpose.
``from_bytes`` reads from a ``memoryview`` without copying it.
"""

from __future__ import annotations

import operator
import struct
import sys
from collections.abc import Callable
from typing import Any, ClassVar, Self, TypeAlias
from uuid import UUID

import attrs

from vhsm.errors import WireError
from vhsm.wire.enums import (
    MAX_MEM_REGIONS,
    VRING_ALIGN,
    VRING_F_LOG,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
)

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI host
    raise ImportError("vhsm.wire supports little-endian hosts only (the protocol uses host order)")

Buffer: TypeAlias = bytes | bytearray | memoryview

U64_LIMIT = 1 << 64
MAX_REGIONS = MAX_MEM_REGIONS
MAX_CONFIG_SIZE = 256
SHMEM_REGIONS = 256

_FRAME_SIZE = "VU-FRAME-006"


def _check_size(data: Buffer, size: int, request: str, rule: str = _FRAME_SIZE) -> None:
    if len(data) != size:
        raise WireError(request, "size", len(data), f"exactly {size} bytes", rule)


def _check_u64_sum(request: str, field: str, base: int, size: int, rule: str) -> None:
    if base + size > U64_LIMIT:
        raise WireError(request, field, base, f"{field} + size <= 2**64", rule)


@attrs.frozen
class _FixedPayload:
    """A fixed-size payload whose attrs fields are the items of its ``STRUCT``, in order.

    ``from_bytes`` checks the size (against ``SIZE``, breaking ``SIZE_RULE``),
    unpacks every field and runs the class's ``_check``; ``to_bytes`` packs the
    fields back. A payload with another layout overrides both.
    """

    STRUCT: ClassVar[struct.Struct]
    SIZE: ClassVar[int]
    SIZE_RULE: ClassVar[str] = _FRAME_SIZE

    @classmethod
    def from_bytes(cls, data: Buffer, request: str = "-", xen: bool = False) -> Self:
        """Decode and check the payload (size, then the class's own rules)."""
        _check_size(data, cls.SIZE, request, cls.SIZE_RULE)
        payload = cls(*cls.STRUCT.unpack_from(data))
        payload._check(request)
        return payload

    def _check(self, request: str) -> None:
        """Raise a WireError naming the field when the payload breaks its own rules."""

    def to_bytes(self) -> bytes:
        """Encode the payload."""
        get = _FIELD_GETTERS.get(type(self)) or _field_getter(type(self))
        return self.STRUCT.pack(*get(self))


_FIELD_GETTERS: dict[type[_FixedPayload], Callable[[_FixedPayload], tuple[Any, ...]]] = {}


def _field_getter(cls: type[_FixedPayload]) -> Callable[[_FixedPayload], tuple[Any, ...]]:
    """Build (once per class) a getter of the fields of ``cls`` in STRUCT order, as a tuple.

    ``attrs.astuple`` would walk the fields on every call, several times slower.
    """
    names = [field.name for field in attrs.fields(cls)]
    get = operator.attrgetter(*names)
    getter = get if len(names) > 1 else lambda payload: (get(payload),)
    _FIELD_GETTERS[cls] = getter
    return getter


@attrs.frozen
class VhostUserU64(_FixedPayload):
    """A single u64: feature words, acks, status, queue counts."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    SIZE: ClassVar[int] = 8

    value: int


@attrs.frozen
class VhostUserVringState(_FixedPayload):
    """``struct vhost_vring_state``: a ring index and a number."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    SIZE: ClassVar[int] = 8

    index: int
    num: int


@attrs.frozen
class VhostUserVringAddr(_FixedPayload):
    """``struct vhost_vring_addr``; note the order desc, used, avail."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")
    SIZE: ClassVar[int] = 40
    ALIGN: ClassVar[tuple[tuple[str, int], ...]] = tuple(VRING_ALIGN.items())

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    @property
    def log(self) -> bool:
        """Whether used-ring writes must be logged (``VHOST_VRING_F_LOG``)."""
        return bool(self.flags & VRING_F_LOG)

    def _check(self, request: str) -> None:
        """VU-RING-003: flag bits and alignment."""
        if self.flags & ~VRING_F_LOG:
            raise WireError(
                request, "flags", self.flags, "0 or 0x1 (VHOST_VRING_F_LOG)", "VU-RING-003"
            )
        for name, align in self.ALIGN:
            value = getattr(self, name)
            if value % align:
                raise WireError(request, name, value, f"a multiple of {align}", "VU-RING-003")


@attrs.frozen
class VhostUserMemoryRegion:
    """A memory region descriptor: 32 bytes, 40 with the XEN_MMAP fields set."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")
    XEN_STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQQII")
    SIZE: ClassVar[int] = 32
    XEN_SIZE: ClassVar[int] = 40

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    xen_mmap_flags: int | None = None
    domid: int | None = None

    @property
    def is_xen(self) -> bool:
        """Whether this is the 40-byte XEN_MMAP form."""
        return self.xen_mmap_flags is not None or self.domid is not None

    @classmethod
    def size_for(cls, xen: bool) -> int:
        """Return the descriptor size with or without XEN_MMAP."""
        return cls.XEN_SIZE if xen else cls.SIZE

    @classmethod
    def from_bytes(cls, data: Buffer, request: str = "-", xen: bool = False) -> Self:
        """Decode and check one descriptor (VU-MEM-004)."""
        _check_size(data, cls.size_for(xen), request)
        return cls._unpack(data, 0, request, xen, "")

    @classmethod
    def _unpack(cls, data: Buffer, offset: int, request: str, xen: bool, where: str) -> Self:
        if xen:
            region = cls(*cls.XEN_STRUCT.unpack_from(data, offset))
        else:
            region = cls(*cls.STRUCT.unpack_from(data, offset))
        region._check(request, where)
        return region

    def _check(self, request: str, where: str) -> None:
        """VU-MEM-004, the one place it is checked: a size, and ends that fit in 64 bits.

        The end address (start + size) of each range must itself be a u64, so a
        region cannot end exactly at 2**64 either (ring set-up computes ends).
        """
        size = self.memory_size
        if size == 0:
            raise WireError(request, f"{where}memory_size", 0, ">= 1", "VU-MEM-004")
        for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
            start = getattr(self, name)
            if start + size >= U64_LIMIT:
                expected = f"{name} + memory_size ({size:#x}) < 2**64"
                raise WireError(request, where + name, start, expected, "VU-MEM-004")

    def to_bytes(self) -> bytes:
        """Encode the descriptor (40-byte form when a Xen field is set)."""
        if self.is_xen:
            return self.XEN_STRUCT.pack(
                self.guest_phys_addr,
                self.memory_size,
                self.userspace_addr,
                self.mmap_offset,
                self.xen_mmap_flags or 0,
                self.domid or 0,
            )
        return self.STRUCT.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )


@attrs.frozen
class VhostUserMemory:
    """The SET_MEM_TABLE payload: nregions, padding, then the regions."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    HEADER_SIZE: ClassVar[int] = 8

    regions: tuple[VhostUserMemoryRegion, ...]
    padding: int = 0

    @classmethod
    def from_bytes(cls, data: Buffer, request: str = "-", xen: bool = False) -> Self:
        """Decode and check the table (VU-MEM-001, VU-MEM-003, VU-MEM-004)."""
        if len(data) < cls.HEADER_SIZE:
            raise WireError(request, "size", len(data), "8 + 32 x nregions bytes", _FRAME_SIZE)
        nregions, padding = cls.STRUCT.unpack_from(data)
        if not 1 <= nregions <= MAX_REGIONS:
            raise WireError(request, "nregions", nregions, f"1..{MAX_REGIONS}", "VU-MEM-001")
        region_size = VhostUserMemoryRegion.size_for(xen)
        expected = cls.HEADER_SIZE + region_size * nregions
        if len(data) != expected:
            allowed = f"8 + {region_size} x nregions = {expected} bytes"
            raise WireError(request, "size", len(data), allowed, "VU-MEM-003")
        if padding:
            raise WireError(request, "padding", padding, "0", "VU-MEM-003")
        regions = tuple(
            VhostUserMemoryRegion._unpack(
                data, cls.HEADER_SIZE + i * region_size, request, xen, f"regions[{i}]."
            )
            for i in range(nregions)
        )
        return cls(regions, padding)

    def to_bytes(self) -> bytes:
        """Encode the table (nregions from the tuple's length)."""
        head = self.STRUCT.pack(len(self.regions), self.padding)
        return head + b"".join(region.to_bytes() for region in self.regions)


@attrs.frozen
class VhostUserSingleMemoryRegion:
    """The ADD_MEM_REG / REM_MEM_REG payload: 8 bytes of padding and one region."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    SIZE: ClassVar[int] = 40
    XEN_SIZE: ClassVar[int] = 48

    region: VhostUserMemoryRegion
    padding: int = 0

    @classmethod
    def size_for(cls, xen: bool) -> int:
        """Return the payload size with or without XEN_MMAP."""
        return cls.XEN_SIZE if xen else cls.SIZE

    @classmethod
    def from_bytes(cls, data: Buffer, request: str = "-", xen: bool = False) -> Self:
        """Decode and check the payload (VU-MEM-004)."""
        _check_size(data, cls.size_for(xen), request)
        (padding,) = cls.STRUCT.unpack_from(data)
        region = VhostUserMemoryRegion._unpack(data, 8, request, xen, "region.")
        return cls(region, padding)

    def to_bytes(self) -> bytes:
        """Encode the payload."""
        return self.STRUCT.pack(self.padding) + self.region.to_bytes()


@attrs.frozen
class VhostUserConfig:
    """The GET_CONFIG / SET_CONFIG payload: offset, size, flags, then config bytes."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<III")
    HEADER_SIZE: ClassVar[int] = 12

    offset: int
    size: int
    flags: int
    payload: bytes

    @classmethod
    def from_bytes(cls, data: Buffer, request: str = "-", xen: bool = False) -> Self:
        """Decode and check the payload (VU-PAY-001)."""
        if len(data) < cls.HEADER_SIZE:
            raise WireError(request, "size", len(data), "12 + config size bytes", _FRAME_SIZE)
        offset, size, flags = cls.STRUCT.unpack_from(data)
        rule = "VU-PAY-001"
        if not 1 <= size <= MAX_CONFIG_SIZE:
            raise WireError(request, "config.size", size, f"1..{MAX_CONFIG_SIZE}", rule)
        if len(data) != cls.HEADER_SIZE + size:
            allowed = f"12 + config.size = {cls.HEADER_SIZE + size} bytes"
            raise WireError(request, "size", len(data), allowed, rule)
        if flags not in (0, 1):
            raise WireError(request, "flags", flags, "0 (front-end) or 1 (migration)", rule)
        return cls(offset, size, flags, bytes(data[cls.HEADER_SIZE :]))

    def to_bytes(self) -> bytes:
        """Encode the payload (the ``size`` field is written as given)."""
        return self.STRUCT.pack(self.offset, self.size, self.flags) + self.payload


@attrs.frozen
class VhostUserIotlb(_FixedPayload):
    """``struct vhost_iotlb_msg``; the 6 tail padding bytes are not kept."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQBB6x")
    SIZE: ClassVar[int] = 32

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    def _check(self, request: str) -> None:
        """Permissions 0..3, message type 1..4."""
        if self.perm > 3:
            raise WireError(request, "perm", self.perm, "0..3", "VU-PAY-007")
        if not 1 <= self.type <= 4:
            raise WireError(request, "type", self.type, "1..4", "VU-PAY-007")


@attrs.frozen
class VhostUserLog(_FixedPayload):
    """The SET_LOG_BASE log description."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQ")
    SIZE: ClassVar[int] = 16

    mmap_size: int
    mmap_offset: int

    def _check(self, request: str) -> None:
        """VU-MEM-010: a size, and no wrap past 2**64."""
        if self.mmap_size == 0:
            raise WireError(request, "mmap_size", 0, ">= 1", "VU-MEM-010")
        _check_u64_sum(request, "mmap_offset", self.mmap_offset, self.mmap_size, "VU-MEM-010")


@attrs.frozen
class VhostUserVringArea(_FixedPayload):
    """The BACKEND_VRING_HOST_NOTIFIER_MSG payload."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQ")
    SIZE: ClassVar[int] = 24

    u64: int
    size: int
    offset: int

    @property
    def index(self) -> int:
        """The queue index (bits 0-7)."""
        return self.u64 & VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        """True when no fd is attached (bit 8)."""
        return bool(self.u64 & VRING_NOFD_MASK)

    def _check(self, request: str) -> None:
        """Bits 9-63 of the u64 are zero."""
        if self.u64 & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise WireError(request, "u64", self.u64, "bits 0-8 only", "VU-RING-005")


@attrs.frozen
class VhostUserInflight(_FixedPayload):
    """The GET/SET_INFLIGHT_FD description, 24 bytes with tail padding."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQHH4x")
    SIZE: ClassVar[int] = 24
    SIZE_RULE: ClassVar[str] = "VU-PAY-003"

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def _check(self, request: str) -> None:
        """VU-PAY-003: at least one queue of at least one entry."""
        if self.num_queues == 0:
            raise WireError(request, "num_queues", 0, "1..65535", "VU-PAY-003")
        if self.queue_size == 0:
            raise WireError(request, "queue_size", 0, "1..65535", "VU-PAY-003")


@attrs.frozen
class VhostUserShared:
    """A shared-object UUID, RFC-4122 byte order on the wire."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("16s")
    SIZE: ClassVar[int] = 16

    uuid: UUID

    @classmethod
    def from_bytes(cls, data: Buffer, request: str = "-", xen: bool = False) -> Self:
        """Decode and check the payload (VU-PAY-006: neither nil nor all-ones)."""
        _check_size(data, cls.SIZE, request)
        value = UUID(bytes=bytes(data))
        if value.int in (0, (1 << 128) - 1):
            raise WireError(request, "uuid", str(value), "neither nil nor all-ones", "VU-PAY-006")
        return cls(value)

    def to_bytes(self) -> bytes:
        """Encode the payload."""
        return self.uuid.bytes


@attrs.frozen
class VhostUserTransferDeviceState(_FixedPayload):
    """The SET_DEVICE_STATE_FD transfer parameters."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    SIZE: ClassVar[int] = 8

    direction: int
    phase: int

    def _check(self, request: str) -> None:
        """VU-PAY-005: a known direction, the stopped phase."""
        if self.direction not in (0, 1):
            raise WireError(
                request, "direction", self.direction, "0 (save) or 1 (load)", "VU-PAY-005"
            )
        if self.phase != 0:
            raise WireError(request, "phase", self.phase, "0 (stopped)", "VU-PAY-005")


@attrs.frozen
class VhostUserMMap(_FixedPayload):
    """The BACKEND_SHMEM_MAP / UNMAP payload; padding bytes are not kept."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<B7xQQQQ")
    SIZE: ClassVar[int] = 40

    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int


@attrs.frozen
class VhostUserShMemConfig:
    """The GET_SHMEM_CONFIG reply: region count and 256 sizes indexed by shmid."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct(f"<II{SHMEM_REGIONS}Q")
    SIZE: ClassVar[int] = 8 + 8 * SHMEM_REGIONS

    nregions: int
    memory_sizes: tuple[int, ...]

    @classmethod
    def from_bytes(cls, data: Buffer, request: str = "-", xen: bool = False) -> Self:
        """Decode the payload (the 4 padding bytes are not kept)."""
        _check_size(data, cls.SIZE, request)
        fields = cls.STRUCT.unpack_from(data)
        return cls(fields[0], tuple(fields[2:]))

    def to_bytes(self) -> bytes:
        """Encode the payload; missing trailing sizes are written as 0."""
        sizes = tuple(self.memory_sizes) + (0,) * (SHMEM_REGIONS - len(self.memory_sizes))
        return self.STRUCT.pack(self.nregions, 0, *sizes)


@attrs.frozen
class VhostUserVringFd:
    """The u64 of SET_VRING_KICK / CALL / ERR: ring index and the no-fd bit."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    SIZE: ClassVar[int] = 8

    index: int
    nofd: bool = False

    @classmethod
    def from_bytes(cls, data: Buffer, request: str = "-", xen: bool = False) -> Self:
        """Decode and check the payload (bits 9-63 are zero)."""
        _check_size(data, cls.SIZE, request)
        (value,) = cls.STRUCT.unpack_from(data)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise WireError(request, "u64", value, "bits 0-8 only", "VU-RING-005")
        return cls(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK))

    def to_bytes(self) -> bytes:
        """Encode the payload (an out-of-range index is written as given)."""
        return self.STRUCT.pack(self.index | (VRING_NOFD_MASK if self.nofd else 0))


@attrs.frozen
class VhostUserOpaque:
    """A body the spec leaves undefined or QEMU-internal (crypto sessions), kept as bytes."""

    data: bytes

    @classmethod
    def from_bytes(cls, data: Buffer, request: str = "-", xen: bool = False) -> Self:
        """Keep the bytes as they are."""
        return cls(bytes(data))

    def to_bytes(self) -> bytes:
        """Return the bytes as they are."""
        return self.data


Payload: TypeAlias = (
    VhostUserU64
    | VhostUserVringState
    | VhostUserVringAddr
    | VhostUserMemoryRegion
    | VhostUserMemory
    | VhostUserSingleMemoryRegion
    | VhostUserConfig
    | VhostUserIotlb
    | VhostUserLog
    | VhostUserVringArea
    | VhostUserInflight
    | VhostUserShared
    | VhostUserTransferDeviceState
    | VhostUserMMap
    | VhostUserShMemConfig
    | VhostUserVringFd
    | VhostUserOpaque
)

PAYLOAD_CLASSES: dict[str, type[Payload]] = {
    cls.__name__: cls
    for cls in (
        VhostUserU64,
        VhostUserVringState,
        VhostUserVringAddr,
        VhostUserMemoryRegion,
        VhostUserMemory,
        VhostUserSingleMemoryRegion,
        VhostUserConfig,
        VhostUserIotlb,
        VhostUserLog,
        VhostUserVringArea,
        VhostUserInflight,
        VhostUserShared,
        VhostUserTransferDeviceState,
        VhostUserMMap,
        VhostUserShMemConfig,
        VhostUserVringFd,
        VhostUserOpaque,
    )
}
