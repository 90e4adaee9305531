"""Types of the optional C accelerator (vhsm/_speedups.c); see vhsm.speedups."""

from collections.abc import Iterator
from typing import Any

source_sha256: str

def split_pop(
    avail: Any,
    desc: Any,
    bounds: Any,
    next_avail: int,
    size: int,
    n: int,
    heads: Any,
    words: Any,
    offsets: Any,
) -> tuple[int, int, int] | None: ...
def split_used(
    used: Any, size: int, next_used: int, ids: Any, lens: Any, trusted: bool
) -> bool: ...
def packed_run(
    desc: Any, size: int, pos: int, wrap: int, limit: int, out: Any
) -> tuple[int, int, int]: ...
def packed_take(
    seg: Any, counts: Any, waddr: Any, wlen: Any, bounds: Any, offsets: Any
) -> tuple[int, int, int, bool] | None: ...
def packed_used(
    desc: Any,
    size: int,
    next_used: int,
    used_wrap: int,
    ids: Any,
    lens: Any,
    counts: Any,
    scratch: Any,
    mode: int,
) -> int: ...
def gather_rows(region: Any, offsets: Any, n: int, skip: int, out: Any) -> bool: ...
def adler32_rows(rows: Any, k: int, width: int) -> int: ...
def read_frames(region: Any, offsets: Any, lens: Any, skip: int, checksum: bool) -> int | None: ...

class ChainRing:
    def pop(self, queue: Any, /) -> Any: ...
    def iter(self, queue: Any, /) -> Iterator[Any]: ...
    def add_used(self, queue: Any, id: int, length: int, /) -> bool: ...
    def release(self) -> None: ...

def chain_ring(
    queue: Any,
    slots: tuple[str, ...],
    chain_cls: type,
    chain_slots: tuple[str, ...],
    size: int,
    desc: Any,
    areas: tuple[Any, ...],
    regions: tuple[tuple[int, int, memoryview], ...],
    primary: int,
) -> ChainRing | None: ...
def sink_split(
    avail: Any,
    desc: Any,
    used: Any,
    bounds: Any,
    views: tuple[Any, ...],
    size: int,
    next_avail: int,
    next_used: int,
    signalled: int,
    left: int,
    event_idx: bool,
    notify_on_empty: bool,
    call_fd: int,
    skip: int,
    checksum: bool,
) -> tuple[int, int, int, int, int, int, int, int, int, int]: ...
def sink_packed(
    desc: Any,
    driver: Any,
    device: Any,
    counts: Any,
    scratch: Any,
    bounds: Any,
    views: tuple[Any, ...],
    size: int,
    next_avail: int,
    avail_wrap: int,
    next_used: int,
    used_wrap: int,
    since_signal: int,
    left: int,
    event_idx: bool,
    call_fd: int,
    skip: int,
    checksum: bool,
) -> tuple[int, int, int, int, int, int, int, int, int, int, int]: ...
def set_max_queue_size(size: int, /) -> None: ...
