"""The fused sink pass: a whole TX kick of a net sink in one compiled call.

On the pure path a TX kick costs a dozen Python and numpy calls per burst
(``pop_batch``, the batch arrays, the frame reads, ``add_used_batch``, the
notification decision, the eventfd write, re-enabling kicks); with small frames
they, not the bytes, set the pace. ``vhsm._speedups.sink_split`` (and
``sink_packed`` for packed rings) does all of it
in one call with the GIL released: it pops every available buffer up to the
pass budget, reads each frame (copy or Adler-32), completes them with length 0,
repeats while the ring has more, decides the used-buffer notification exactly
as the queue's ``needs_notification`` does and writes the call eventfd, then
re-enables kicks and re-checks the ring.

It answers "fall back" before consuming any burst the fast pure path would not
take the same way (a chain, a bad head, a short or empty buffer, a buffer
outside one region, an avail index too far ahead): the caller's pure loop then
goes on from where the pass stopped and does what it always does, so hostile
rings get the pure path's errors and the ring is marked broken by it
(VU-RING-009). Dirty logging, inflight tracking and in-band notifications are
never fused (the caller checks).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from vhsm.virtq.packed import PackedQueue
from vhsm.virtq.split import SplitQueue

#: The pass ended: ring empty (``DONE``) or budget used with work left (``YIELDED``).
DONE, YIELDED = 0, 1
#: The pass stopped before a burst it does not handle: the pure loop goes on.
FALLBACK = 2
#: Writing the call eventfd failed (errno in the result).
CALL_FAILED = 3


class SinkPass(NamedTuple):
    """What one fused pass did."""

    status: int
    left: int  # budget left in the worker pass
    packets: int
    bytes: int  # frame bytes after the skipped header
    checksum: int  # sum of the frames' Adler-32 values (mod 2^64; 0 when copying)
    errno: int  # CALL_FAILED's errno

    def check(self) -> None:
        """Raise the OSError of a failed call eventfd write (status CALL_FAILED).

        Raises:
            OSError: the call fd could not be written (as ``os.eventfd_write`` raises).
        """
        if self.status == CALL_FAILED:
            raise OSError(self.errno, os.strerror(self.errno))


def sink_pass_split(
    q: SplitQueue, left: int, call_fd: int, skip: int, checksum: bool
) -> SinkPass | None:
    """Run the fused pass over ``q`` (None: no accelerator or a dirty log: use the pure loop).

    ``left`` is the pass budget (chains), ``call_fd`` the eventfd to signal, ``skip``
    the header bytes not read. The queue's indices and notification state are
    updated with whatever the pass did, whatever its status.
    """
    accel = q._accel
    if accel is None or q._log is not None:
        return None
    signalled = q._signalled_used
    status, na, nu, shadow, signalled_now, left, packets, nbytes, total, err = accel.sink_split(
        q._avail,
        q._desc,
        q._used,
        q._space.bounds,
        q._space.views,
        q._size,
        q._next_avail,
        q._next_used,
        -1 if signalled is None else signalled,
        left,
        q._event_idx,
        q.notify_on_empty,
        call_fd,
        skip,
        checksum,
    )
    if shadow >= 0:
        q._avail_shadow = shadow
    if nu != q._next_used:
        q._fresh_heads = None  # the last burst's heads are no longer the pure path's
    q._next_avail = na
    q._next_used = nu
    q._signalled_used = None if signalled_now < 0 else signalled_now
    return SinkPass(status, left, packets, nbytes, total, err)


def sink_pass_packed(
    q: PackedQueue, left: int, call_fd: int, skip: int, checksum: bool
) -> SinkPass | None:
    """The same pass over a packed ring (None: no accelerator, a dirty log, buffers tracked).

    Buffers still in flight from an earlier pop (or tracked for the dirty log) leave
    the ring to the pure loop: the pass completes everything it takes before it
    returns, so it only reads the in-flight counts.
    """
    accel = q._accel
    if accel is None or q._log is not None or q._wlog:
        return None
    status, na, aw, nu, uw, since, left, packets, nbytes, total, err = accel.sink_packed(
        q._desc,
        q._driver_h,
        q._device_h,
        q._counts_np,
        q._scratch,
        q._space.bounds,
        q._space.views,
        q._size,
        q._next_avail,
        q._avail_wrap,
        q._next_used,
        q._used_wrap,
        q._since_signal,
        left,
        q._event_idx,
        call_fd,
        skip,
        checksum,
    )
    if nu != q._next_used or uw != q._used_wrap:
        q._fresh_heads = None  # the last burst's ids are no longer the pure path's
    q._next_avail, q._avail_wrap = na, aw
    q._next_used, q._used_wrap = nu, uw
    q._since_signal = since
    return SinkPass(status, left, packets, nbytes, total, err)


__all__ = [
    "CALL_FAILED",
    "DONE",
    "FALLBACK",
    "YIELDED",
    "SinkPass",
    "sink_pass_packed",
    "sink_pass_split",
]
