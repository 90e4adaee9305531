"""The sink's numpy Adler-32 over a burst equals zlib's, frame by frame."""

from __future__ import annotations

import zlib

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vhsm.devices.net import _VEC_MAX_FRAME, NET_HDR_SIZE, _adler32_of_rows, _gather_rows


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=4096),
    n=st.integers(0, _VEC_MAX_FRAME - NET_HDR_SIZE),
    picks=st.lists(st.integers(0, 2**32), min_size=1, max_size=1100),  # up to a full ring
    fill=st.sampled_from([None, 0xFF]),
    skip=st.sampled_from([0, NET_HDR_SIZE]),
)
@example(data=b"", n=_VEC_MAX_FRAME - NET_HDR_SIZE, picks=list(range(1024)), fill=0xFF, skip=0)
def test_matches_zlib(data: bytes, n: int, picks: list[int], fill: int | None, skip: int) -> None:
    """Rows of the buffers at ``offsets`` past their first ``skip`` bytes, summed as zlib does."""
    raw = bytes([fill]) * 4096 if fill is not None else data.ljust(4096, b"\x5a")
    region = memoryview(raw)
    offsets = np.array([p % (len(raw) - skip - n + 1) for p in picks], dtype=np.int64)
    want = sum(zlib.adler32(raw[o + skip : o + skip + n]) for o in offsets.tolist())
    assert _adler32_of_rows(_gather_rows(region, offsets, skip + n, skip)) == want
