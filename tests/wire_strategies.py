"""Hypothesis strategies producing valid instances of every vhsm.wire payload class."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from hypothesis import strategies as st

from vhsm.wire import payloads as p

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
U64 = st.integers(0, (1 << 64) - 1)


@st.composite
def regions(draw: Any, xen: bool = False) -> p.VhostUserMemoryRegion:
    size = draw(st.integers(1, 1 << 40))
    limit = (1 << 64) - size - 1  # the end address (start + size) fits in 64 bits
    gpa, uaddr, off = (draw(st.integers(0, limit)) for _ in range(3))
    if xen:
        return p.VhostUserMemoryRegion(gpa, size, uaddr, off, draw(U32), draw(U32))
    return p.VhostUserMemoryRegion(gpa, size, uaddr, off)


@st.composite
def memories(draw: Any, xen: bool = False) -> p.VhostUserMemory:
    return p.VhostUserMemory(tuple(draw(st.lists(regions(xen), min_size=1, max_size=8))))


@st.composite
def vring_addrs(draw: Any) -> p.VhostUserVringAddr:
    return p.VhostUserVringAddr(
        draw(U32),
        draw(st.sampled_from([0, 1])),
        draw(U64) & ~0xF,
        draw(U64) & ~0x3,
        draw(U64) & ~0x1,
        draw(U64),
    )


@st.composite
def configs(draw: Any) -> p.VhostUserConfig:
    data = draw(st.binary(min_size=1, max_size=256))
    return p.VhostUserConfig(draw(U32), len(data), draw(st.sampled_from([0, 1])), data)


@st.composite
def logs(draw: Any) -> p.VhostUserLog:
    size = draw(st.integers(1, (1 << 64) - 1))
    return p.VhostUserLog(size, draw(st.integers(0, (1 << 64) - size)))


def uuids() -> st.SearchStrategy[UUID]:
    return st.integers(1, (1 << 128) - 2).map(lambda n: UUID(int=n))


STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    p.VhostUserU64: st.builds(p.VhostUserU64, U64),
    p.VhostUserVringState: st.builds(p.VhostUserVringState, U32, U32),
    p.VhostUserVringAddr: vring_addrs(),
    p.VhostUserMemoryRegion: regions(),
    p.VhostUserMemory: memories(),
    p.VhostUserSingleMemoryRegion: st.builds(p.VhostUserSingleMemoryRegion, regions(), U64),
    p.VhostUserConfig: configs(),
    p.VhostUserIotlb: st.builds(
        p.VhostUserIotlb, U64, U64, U64, st.integers(0, 3), st.integers(1, 4)
    ),
    p.VhostUserLog: logs(),
    p.VhostUserVringArea: st.builds(p.VhostUserVringArea, st.integers(0, 0x1FF), U64, U64),
    p.VhostUserInflight: st.builds(
        p.VhostUserInflight, U64, U64, st.integers(1, 0xFFFF), st.integers(1, 0xFFFF)
    ),
    p.VhostUserShared: st.builds(p.VhostUserShared, uuids()),
    p.VhostUserTransferDeviceState: st.builds(
        p.VhostUserTransferDeviceState, st.sampled_from([0, 1]), st.just(0)
    ),
    p.VhostUserMMap: st.builds(p.VhostUserMMap, U8, U64, U64, U64, U64),
    p.VhostUserShMemConfig: st.builds(
        p.VhostUserShMemConfig, U32, st.lists(U64, min_size=256, max_size=256).map(tuple)
    ),
    p.VhostUserVringFd: st.builds(p.VhostUserVringFd, U8, st.booleans()),
    p.VhostUserOpaque: st.builds(p.VhostUserOpaque, st.binary(max_size=1024)),
}

XEN_STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    p.VhostUserMemoryRegion: regions(xen=True),
    p.VhostUserMemory: memories(xen=True),
    p.VhostUserSingleMemoryRegion: st.builds(p.VhostUserSingleMemoryRegion, regions(xen=True)),
}


def example(cls: type[Any]) -> Any:
    """Return one fixed, valid instance of a payload class (for table tests)."""
    fixed: dict[type[Any], Any] = {
        p.VhostUserU64: p.VhostUserU64(0),
        p.VhostUserVringState: p.VhostUserVringState(0, 0),
        p.VhostUserVringAddr: p.VhostUserVringAddr(0, 0, 0x1000, 0x2000, 0x3000, 0x2000),
        p.VhostUserMemoryRegion: p.VhostUserMemoryRegion(0, 0x1000, 0x7F00_0000_0000, 0),
        p.VhostUserMemory: p.VhostUserMemory(
            (p.VhostUserMemoryRegion(0, 0x1000, 0x7F00_0000_0000, 0),)
        ),
        p.VhostUserSingleMemoryRegion: p.VhostUserSingleMemoryRegion(
            p.VhostUserMemoryRegion(0, 0x1000, 0x7F00_0000_0000, 0)
        ),
        p.VhostUserConfig: p.VhostUserConfig(0, 4, 0, b"\x01\x02\x03\x04"),
        p.VhostUserIotlb: p.VhostUserIotlb(0x1000, 0x1000, 0x7F00_0000_0000, 3, 2),
        p.VhostUserLog: p.VhostUserLog(0x1000, 0),
        p.VhostUserVringArea: p.VhostUserVringArea(0x100, 4096, 0),
        p.VhostUserInflight: p.VhostUserInflight(0, 0, 2, 128),
        p.VhostUserShared: p.VhostUserShared(UUID(int=0x1234)),
        p.VhostUserTransferDeviceState: p.VhostUserTransferDeviceState(0, 0),
        p.VhostUserMMap: p.VhostUserMMap(1, 0, 0, 4096, 1),
        p.VhostUserShMemConfig: p.VhostUserShMemConfig(1, (4096,) + (0,) * 255),
        p.VhostUserVringFd: p.VhostUserVringFd(0, True),
        p.VhostUserOpaque: p.VhostUserOpaque(b"\x00" * 16),
    }
    return fixed[cls]
