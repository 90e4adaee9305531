from __future__ import annotations

import numpy as np
import pytest
from virtq_support import BUF_GPA, make_memory

from vhsm.virtq import PackedDriver, RingFull, SplitDriver


@pytest.mark.parametrize("cls", [SplitDriver, PackedDriver])
def test_ring_full_and_free_accounting(cls: type[SplitDriver] | type[PackedDriver]) -> None:
    mem = make_memory()
    drv = cls.layout(mem, 4, 0x1001)
    assert drv.desc_gpa % 16 == 0
    drv.add_chain([(BUF_GPA, 8)] * 3)
    with pytest.raises(RingFull):
        drv.add_chain([(BUF_GPA, 8)] * 2)
    with pytest.raises(RingFull):
        drv.add_simple_batch(np.zeros(2, np.uint64), np.ones(2, np.uint32), np.zeros(2, bool))
    drv.add_chain([(BUF_GPA, 8)])
    assert drv.num_free == 0
    assert drv.get_used() is None


def test_split_layout_alignment_and_footprint() -> None:
    mem = make_memory()
    drv = SplitDriver.layout(mem, 8, 0x2000)
    assert drv.avail_gpa == drv.desc_gpa + 128
    assert drv.used_gpa % 4 == 0
    assert drv.used_gpa + 6 + 64 - drv.desc_gpa == SplitDriver.footprint(8)
    assert PackedDriver.footprint(8) == 136


def test_indirect_needs_memory() -> None:
    mem = make_memory()
    drv = SplitDriver.layout(mem, 8, 0x2000)
    with pytest.raises(ValueError, match="memory"):
        drv.add_chain([(BUF_GPA, 8)], indirect_gpa=0x8000)
