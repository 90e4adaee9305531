"""A burst of available buffers taken at once, as numpy arrays (no object per descriptor)."""

from __future__ import annotations

import numpy as np

from vhsm.errors import VirtqError
from vhsm.virtq.chain import DescriptorChain
from vhsm.virtq.common import VIRTQ_DESC_F_WRITE, AddressSpace, max_of, min_of

_EMPTY_U16 = np.zeros(0, dtype=np.uint16)
_EMPTY_U64 = np.zeros(0, dtype=np.uint64)
_EMPTY_U32 = np.zeros(0, dtype=np.uint32)
_EMPTY_BOOL = np.zeros(0, dtype=bool)
_EMPTY_I64 = np.zeros(0, dtype=np.int64)
_WRITE = VIRTQ_DESC_F_WRITE  # the same bit in split and packed descriptors


class Batch:
    """Chains popped by ``pop_batch``.

    Single-descriptor chains (the common case) come as parallel arrays: ``heads``
    (the id for ``add_used``), ``addrs`` (guest-physical), ``lens``, ``writable``,
    and where each buffer lives: ``region`` (index into ``region_views``) and
    ``offsets`` (byte offset in that region). Longer or indirect chains come as
    ``chains`` (DescriptorChain objects); bad chains as ``errors`` (already consumed:
    complete ``err.head`` with length 0 when it is not None, then signal the err fd).
    The three groups are not in ring order relative to each other.

    The fast paths build neither ``region`` nor ``writable`` up front: a burst in one
    region records only that index (``single_region``), the descriptors' flags and
    the lengths' range (``lens_range``); the arrays are made on first use.
    """

    __slots__ = (
        "_flags",
        "_lens_range",
        "_region",
        "_writable",
        "addrs",
        "chains",
        "errors",
        "heads",
        "lens",
        "offsets",
        "region_views",
    )

    def __init__(
        self,
        space: AddressSpace,
        heads: np.ndarray = _EMPTY_U16,
        addrs: np.ndarray = _EMPTY_U64,
        lens: np.ndarray = _EMPTY_U32,
        writable: np.ndarray | None = _EMPTY_BOOL,
        region: np.ndarray | int = _EMPTY_I64,
        offsets: np.ndarray = _EMPTY_I64,
        chains: list[DescriptorChain] | None = None,
        errors: list[VirtqError] | None = None,
        *,
        flags: np.ndarray | None = None,
        lens_range: tuple[int, int] | None = None,
    ) -> None:
        """A burst; fast paths pass one ``region`` index, ``flags``, and ``lens_range``.

        ``flags`` (any integer words with the descriptors' flags in their low bits)
        stands in for ``writable``; ``lens_range`` is the lengths' (min, max)
        when the caller's checks computed it.
        """
        if writable is None and flags is None:
            raise ValueError("a batch needs writable or the descriptors' flags")
        self.heads = heads
        self.addrs = addrs
        self.lens = lens
        self._writable = writable
        self._flags = flags
        self._region = region
        self.offsets = offsets
        self._lens_range = lens_range
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

    @property
    def single_region(self) -> int | None:
        """The region index of every single-descriptor buffer when they share one."""
        region = self._region
        if isinstance(region, int):
            return region
        if not len(region):
            return None
        first = int(region[0])
        return first if bool((region == first).all()) else None

    @property
    def region(self) -> np.ndarray:
        """Region index (into ``region_views``) of each single-descriptor buffer."""
        region = self._region
        if isinstance(region, int):
            region = self._region = np.full(len(self.heads), region, dtype=np.int64)
        return region

    @property
    def lens_range(self) -> tuple[int, int]:
        """(shortest, longest) length of the single-descriptor buffers; (0, 0) if none."""
        lens_range = self._lens_range
        if lens_range is None:
            lens = self.lens
            lens_range = (int(min_of(lens)), int(max_of(lens))) if len(lens) else (0, 0)
            self._lens_range = lens_range
        return lens_range

    @property
    def writable(self) -> np.ndarray:
        """Whether each single-descriptor buffer is device-writable (VRING_DESC_F_WRITE)."""
        writable = self._writable
        if writable is None:
            assert self._flags is not None
            writable = self._writable = (self._flags & _WRITE) != 0
        return writable

    def buffer(self, i: int) -> memoryview:
        """Writable view of the i-th single-descriptor buffer."""
        off = int(self.offsets[i])
        region = self._region
        r = region if isinstance(region, int) else int(region[i])
        return self.region_views[r][off : off + int(self.lens[i])]

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
            out._writable = np.concatenate([p.writable for p in parts])
            out._region = np.concatenate([p.region for p in parts])
            out.offsets = np.concatenate([p.offsets for p in parts])
            for p in parts:
                out.chains.extend(p.chains)
                out.errors.extend(p.errors)
        return out
