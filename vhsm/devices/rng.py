"""virtio-rng, the smallest useful device: the model every other device follows.

One queue. The driver posts device-writable buffers; the device fills each with
``os.urandom`` and hands it back with the number of bytes written. The part worth
copying is ``handle_event``: `vhsm.backend.drain` runs the loop every device
needs (kicks suppressed while draining, each chain completed with the length
``_fill`` returns, one event-idx-aware signal per pass, a re-check after kicks
are re-enabled, bad chains completed with length 0 and reported on the ring's
error fd), so the device itself only says what one request does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vhsm.backend import EPOLLIN, RING_FEATURES, VhostUserBackend, drain
from vhsm.errors import BackendError
from vhsm.wire.enums import ProtocolFeature

if TYPE_CHECKING:
    from vhsm.virtq import DescriptorChain
    from vhsm.vring import VringT


class RngBackend(VhostUserBackend):
    """Entropy source: one request queue of device-writable buffers."""

    def num_queues(self) -> int:
        """A single request queue."""
        return 1

    def max_queue_size(self) -> int:
        """Largest ring accepted."""
        return 1024

    def features(self) -> int:
        """Ring features only (QEMU acks INDIRECT_DESC and EVENT_IDX anyway: offer them)."""
        return RING_FEATURES

    def protocol_features(self) -> int:
        """No config space, so no CONFIG."""
        return int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        """Fill every available buffer with random bytes."""
        if device_event != 0 or evset != EPOLLIN:
            raise BackendError(f"rng: unexpected event {device_event} ({evset:#x})")
        drain(vrings[0], _fill)


def _fill(chain: DescriptorChain) -> int:
    """Fill one chain's writable buffers with random bytes; all of them count as used."""
    for view in chain.writable:
        view[:] = os.urandom(len(view))
    return chain.writable_len
