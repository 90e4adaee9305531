"""virtio-rng, the smallest useful device: the model every other device follows.

One queue. The driver posts device-writable buffers; the device fills each with
``os.urandom`` and hands it back with the number of bytes written. The part worth
copying is ``handle_event``: drain the ring with kicks suppressed, complete each
chain with ``add_used``, signal once per pass (event-idx aware), then re-enable
kicks and go round again if the driver added work meanwhile. A bad chain is
completed with length 0 and reported on the ring's error fd.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vhsm.backend import EPOLLIN, VhostUserBackend
from vhsm.errors import BackendError, VirtqError
from vhsm.wire.enums import ProtocolFeature, VirtioFeature

if TYPE_CHECKING:
    from vhsm.vring import VringT

log = logging.getLogger(__name__)


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
        return int(
            VirtioFeature.VERSION_1
            | VirtioFeature.RING_INDIRECT_DESC
            | VirtioFeature.RING_EVENT_IDX
            | VirtioFeature.RING_PACKED
            | VirtioFeature.PROTOCOL_FEATURES
        )

    def protocol_features(self) -> int:
        """No config space, so no CONFIG."""
        return int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        """Fill every available buffer with random bytes."""
        if device_event != 0 or evset != EPOLLIN:
            raise BackendError(f"rng: unexpected event {device_event} ({evset:#x})")
        vring = vrings[0]
        while True:
            vring.disable_notification()
            while True:
                try:
                    chain = vring.pop()
                except VirtqError as exc:
                    log.warning("rng: bad chain: %s", exc)
                    vring.complete_error(exc)
                    continue
                if chain is None:
                    break
                for view in chain.writable:
                    view[:] = os.urandom(len(view))
                vring.add_used(chain.head, chain.writable_len)
            vring.signal_used_queue()
            if not vring.enable_notification():
                break
