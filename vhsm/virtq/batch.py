"""A burst of available buffers taken at once, as numpy arrays (no object per descriptor)."""

from __future__ import annotations

import numpy as np

from vhsm.errors import VirtqError
from vhsm.virtq.chain import DescriptorChain
from vhsm.virtq.common import AddressSpace

_EMPTY_U16 = np.zeros(0, dtype=np.uint16)
_EMPTY_U64 = np.zeros(0, dtype=np.uint64)
_EMPTY_U32 = np.zeros(0, dtype=np.uint32)
_EMPTY_BOOL = np.zeros(0, dtype=bool)
_EMPTY_I64 = np.zeros(0, dtype=np.int64)


class Batch:
    """Chains popped by ``pop_batch``.

    Single-descriptor chains (the common case) come as parallel arrays: ``heads``
    (the id for ``add_used``), ``addrs`` (guest-physical), ``lens``, ``writable``,
    and where each buffer lives: ``region`` (index into ``region_views``) and
    ``offsets`` (byte offset in that region). Longer or indirect chains come as
    ``chains`` (DescriptorChain objects); bad chains as ``errors`` (already consumed:
    complete ``err.head`` with length 0 when it is not None, then signal the err fd).
    The three groups are not in ring order relative to each other.
    """

    __slots__ = (
        "addrs",
        "chains",
        "errors",
        "heads",
        "lens",
        "offsets",
        "region",
        "region_views",
        "writable",
    )

    def __init__(
        self,
        space: AddressSpace,
        heads: np.ndarray = _EMPTY_U16,
        addrs: np.ndarray = _EMPTY_U64,
        lens: np.ndarray = _EMPTY_U32,
        writable: np.ndarray = _EMPTY_BOOL,
        region: np.ndarray = _EMPTY_I64,
        offsets: np.ndarray = _EMPTY_I64,
        chains: list[DescriptorChain] | None = None,
        errors: list[VirtqError] | None = None,
    ) -> None:
        self.heads = heads
        self.addrs = addrs
        self.lens = lens
        self.writable = writable
        self.region = region
        self.offsets = offsets
        self.region_views: tuple[memoryview, ...] = space.views
        self.chains: list[DescriptorChain] = chains if chains is not None else []
        self.errors: list[VirtqError] = errors if errors is not None else []

    def __len__(self) -> int:
        """Number of ring entries consumed (simple + chains + errors)."""
        return len(self.heads) + len(self.chains) + len(self.errors)

    def __repr__(self) -> str:
        return (
            f"Batch(simple={len(self.heads)}, chains={len(self.chains)}, errors={len(self.errors)})"
        )

    def buffer(self, i: int) -> memoryview:
        """Writable view of the i-th single-descriptor buffer."""
        off = int(self.offsets[i])
        return self.region_views[int(self.region[i])][off : off + int(self.lens[i])]

    def region_array(self, r: int = 0) -> np.ndarray:
        """Numpy uint8 array over region ``r`` (index buffers with ``offsets``/``lens``)."""
        return np.frombuffer(self.region_views[r], dtype=np.uint8)

    @staticmethod
    def concat(space: AddressSpace, parts: list[Batch]) -> Batch:
        """Join several batches taken from one queue."""
        if len(parts) == 1:
            return parts[0]
        out = Batch(space)
        if parts:
            out.heads = np.concatenate([p.heads for p in parts])
            out.addrs = np.concatenate([p.addrs for p in parts])
            out.lens = np.concatenate([p.lens for p in parts])
            out.writable = np.concatenate([p.writable for p in parts])
            out.region = np.concatenate([p.region for p in parts])
            out.offsets = np.concatenate([p.offsets for p in parts])
            for p in parts:
                out.chains.extend(p.chains)
                out.errors.extend(p.errors)
        return out
