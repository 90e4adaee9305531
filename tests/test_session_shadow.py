"""`ShadowDataPlane`: the auditor checks the memory table as the runtime does, mapping nothing."""

from __future__ import annotations

import os

import pytest

from vhsm.errors import GuestMemoryError, WireError
from vhsm.session.shadow import ShadowDataPlane
from vhsm.wire import ProtocolFeature, VhostUserMemoryRegion, VhostUserVringAddr

UVA = 0x7F00_0000_0000
SIZE = 1 << 30  # never mapped: a shadow table may describe any size


def region(gpa: int, uva: int = UVA) -> VhostUserMemoryRegion:
    return VhostUserMemoryRegion(gpa, SIZE, uva, 0)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_table_is_kept_and_fds_are_closed() -> None:
    before = fd_count()
    shadow = ShadowDataPlane()
    shadow.set_mem_table([region(0)], [os.eventfd(0)])
    shadow.add_mem_region(region(SIZE, UVA + SIZE), os.eventfd(0))
    assert shadow.regions == (region(0), region(SIZE, UVA + SIZE))
    shadow.remove_mem_region(region(0))
    assert shadow.regions == (region(SIZE, UVA + SIZE),)
    assert fd_count() == before


@pytest.mark.parametrize(
    ("regions", "rule_id"),
    [
        ([region(0), region(SIZE // 2, UVA + SIZE)], "VU-MEM-005"),
        ([region(0)] * 2, "VU-MEM-005"),
    ],
)
def test_bad_tables_break_the_runtime_s_rules(
    regions: list[VhostUserMemoryRegion], rule_id: str
) -> None:
    before = fd_count()
    with pytest.raises(WireError) as info:
        ShadowDataPlane().set_mem_table(regions, [os.eventfd(0) for _ in regions])
    assert info.value.rule_id == rule_id
    assert fd_count() == before


def test_overlaps_unknown_regions_and_ring_addresses() -> None:
    shadow = ShadowDataPlane()
    shadow.set_mem_table([region(0)], [os.eventfd(0)])
    with pytest.raises(WireError) as info:
        shadow.add_mem_region(region(SIZE // 2, UVA + 4 * SIZE), os.eventfd(0))
    assert info.value.rule_id == "VU-MEM-005"
    with pytest.raises(WireError) as info:
        shadow.remove_mem_region(region(4 * SIZE, UVA + 4 * SIZE))
    assert info.value.rule_id == "VU-MEM-008"
    shadow.set_vring_addr(0, VhostUserVringAddr(0, 0, UVA, UVA + 0x2000, UVA + 0x1000, 0))
    with pytest.raises(GuestMemoryError):
        shadow.set_vring_addr(0, VhostUserVringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0))


def test_guest_physical_ring_addresses_are_not_translated() -> None:
    shadow = ShadowDataPlane(lambda: int(ProtocolFeature.GPA_ADDRESSES))
    shadow.set_vring_addr(0, VhostUserVringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0))
