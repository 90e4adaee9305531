"""virtio-net joined to a Linux TAP interface: the guest on a host network.

Teaching notes:

* Pair ``k`` (receive queue ``2k``, transmit queue ``2k + 1``) has its own TAP
  queue (`vhsm.devices.tap`, ``IFF_MULTI_QUEUE`` when there are several), watched
  by the pair's worker as a listener: kicks and TAP readiness meet on one thread.
* Frames cross with their 12-byte virtio-net header: the TAP reads and writes
  it too (``IFF_VNET_HDR``), so checksum and segmentation offloads pass through
  untouched. Offloads are offered only when the TAP accepts them, and the TAP
  is told (``TUNSETOFFLOAD``) which ones the guest acked for its receive side.
* Transmit: each chain is written to the TAP with one ``writev`` straight from
  guest memory.
* Receive: a frame read from the TAP is written into receive chains (several
  with MRG_RXBUF; ``num_buffers`` says how many). When the ring has too little
  room, the chains taken are put back (the ring's next index rewound: nothing
  was completed) and the frame waits in the device; the TAP is not read again
  until the guest posts buffers. Nothing is dropped for a full ring.
* Multiqueue: the TAP steers each flow to one of its attached queues. The queue
  of a pair the guest has not enabled (a Linux guest with fewer CPUs than
  pairs starts with one, ``ethtool -L`` adds the others) is detached so that
  its flows go to the pairs in use; enabling the pair attaches it again.
  Queue 0 stays attached: every front-end uses pair 0.
* Counters per pair (`TapStats`) are logged at INFO when the device closes.
* Split rings only (no RING_PACKED): putting chains back needs the split ring's
  free-running index.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vhsm.backend import CONFIG_DEVICE_PROTOCOL_FEATURES, SPLIT_RING_FEATURES
from vhsm.devices.net import MAX_QUEUE_SIZE, QueuePairBackend
from vhsm.devices.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    VNET_HDR_SIZE,
    Tap,
)
from vhsm.errors import BackendError, VhsmError, VirtqError
from vhsm.wire.enums import NET_MAX_QUEUE_PAIRS, NetFeature

if TYPE_CHECKING:
    from vhsm.virtq.chain import DescriptorChain
    from vhsm.vring import VringT
    from vhsm.worker import VringEpollHandler

log = logging.getLogger(__name__)

#: Largest frame the TAP can hand over: a 64 KiB GSO packet, its Ethernet and VLAN
#: headers, and the virtio-net header.
MAX_FRAME = 65536 + 18 + VNET_HDR_SIZE
#: Frames moved per readiness event before the worker looks at its other events.
RX_BURST = 256
#: Offered feature bits that each TAP offload enables (host side: the guest may send
#: such packets; guest side: the TAP may hand such packets to the guest).
OFFLOAD_FEATURES = {
    TUN_F_CSUM: NetFeature.CSUM | NetFeature.GUEST_CSUM,
    TUN_F_TSO4: NetFeature.HOST_TSO4 | NetFeature.GUEST_TSO4,
    TUN_F_TSO6: NetFeature.HOST_TSO6 | NetFeature.GUEST_TSO6,
    TUN_F_TSO_ECN: NetFeature.HOST_ECN | NetFeature.GUEST_ECN,
}
#: The acked guest feature that lets the TAP use each offload toward the guest.
GUEST_OFFLOADS = {
    NetFeature.GUEST_CSUM: TUN_F_CSUM,
    NetFeature.GUEST_TSO4: TUN_F_TSO4,
    NetFeature.GUEST_TSO6: TUN_F_TSO6,
    NetFeature.GUEST_ECN: TUN_F_TSO_ECN,
}
#: struct virtio_net_config up to mtu: mac[6], status, max_virtqueue_pairs, mtu.
NET_CONFIG = struct.Struct("<6sHHH")
_NUM_BUFFERS = struct.Struct("<H")


@dataclass
class TapStats:
    """Counters of one queue pair."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0  # frames larger than a receive chain without MRG_RXBUF
    rx_waits: int = 0  # times a frame waited for receive buffers


class TapNetBackend(QueuePairBackend):
    """virtio-net on the TAP interface ``ifname``, ``queue_pairs`` queue pairs.

    Args:
        ifname: the TAP interface (created when missing, else attached).
        queue_pairs: queue pairs; each gets its own TAP queue and worker.
        mac: the guest's MAC address in config space (default: a random local one).
        mtu: set on the TAP and reported in config space (default: the TAP's MTU).

    Raises:
        VhsmError: the TAP cannot be opened, or a bad MAC or MTU.
    """

    def __init__(
        self,
        ifname: str,
        queue_pairs: int = 1,
        *,
        mac: bytes | None = None,
        mtu: int | None = None,
    ) -> None:
        if not 1 <= queue_pairs <= NET_MAX_QUEUE_PAIRS:
            raise VhsmError(f"queue_pairs {queue_pairs} not in 1..{NET_MAX_QUEUE_PAIRS}")
        if mac is not None and (len(mac) != 6 or mac[0] & 1):
            raise VhsmError(f"MAC {mac.hex(':')} is not a 6-byte unicast address")
        if mtu is not None and not 68 <= mtu <= 65535:
            raise VhsmError(f"MTU {mtu} not in 68..65535")
        self.queue_pairs = queue_pairs
        self.tap = Tap(ifname, queue_pairs)
        try:
            if mtu is not None:
                self.tap.set_mtu(mtu)
            self.mtu = self.tap.mtu()
            for queue in range(1, queue_pairs):  # attached when the guest enables the pair
                self.tap.set_attached(queue, False)
        except OSError as err:
            self.tap.close()
            raise VhsmError(f"cannot set up TAP {ifname}: {err.strerror or err}") from None
        except VhsmError:
            self.tap.close()
            raise
        self.mac = mac if mac is not None else bytes([0x02]) + os.urandom(5)
        self.mrg_rxbuf = False
        self.pair_stats = [TapStats() for _ in range(queue_pairs)]
        self._workers: Sequence[VringEpollHandler] = ()
        self._held: list[bytes | None] = [None] * queue_pairs
        self._watched = [False] * queue_pairs
        self._attached = [pair == 0 for pair in range(queue_pairs)]
        self._enabled: set[int] = set()
        self._buffer = bytearray(MAX_FRAME)

    # --- wiring -------------------------------------------------------------------------
    def set_vring_workers(self, workers: Sequence[VringEpollHandler]) -> None:
        """The daemon's workers, one per pair: each watches its pair's TAP queue."""
        self._workers = workers

    def _tap_event(self, pair: int) -> int:
        return 2 * self.queue_pairs + pair

    # --- negotiation --------------------------------------------------------------------
    def features(self) -> int:
        """Split rings, MRG_RXBUF, MAC, MTU, MQ for several pairs, the TAP's offloads."""
        bits = SPLIT_RING_FEATURES | NetFeature.MRG_RXBUF | NetFeature.MAC | NetFeature.MTU
        for offload, offered in OFFLOAD_FEATURES.items():
            if self.tap.offloads & offload:
                bits |= offered
        if self.queue_pairs > 1:
            bits |= NetFeature.MQ | NetFeature.CTRL_VQ
        return int(bits)

    def acked_features(self, features: int) -> None:
        """Receive layout, and the offloads the TAP may use toward the guest."""
        self.mrg_rxbuf = bool(features & NetFeature.MRG_RXBUF)
        flags = 0
        for feature, offload in GUEST_OFFLOADS.items():
            if features & feature:
                flags |= offload
        if flags & ~TUN_F_CSUM and not flags & TUN_F_CSUM:
            flags = 0  # segmentation without checksum offload is not a TAP mode
        try:
            self.tap.set_offload(flags)
        except OSError as err:
            raise BackendError(f"TUNSETOFFLOAD {flags:#x} on {self.tap.name}: {err}") from None

    def protocol_features(self) -> int:
        """Multiqueue, acks, config space, memory slots (one pair), reset, status.

        CONFIG carries ``--mac`` and ``--mtu`` to front-ends that read the device's
        config space (vhsm's own, generic ones). QEMU's virtio-net keeps its own
        config (``-device virtio-net-pci,mac=...,host_mtu=...``): QEMU 7.2 warns once
        per pair that it does not use CONFIG and goes on without it.
        """
        return self.pair_protocol_features(CONFIG_DEVICE_PROTOCOL_FEATURES)

    def get_config(self, offset: int, size: int) -> bytes:
        """``struct virtio_net_config``: MAC, status, max_virtqueue_pairs, MTU."""
        config = NET_CONFIG.pack(self.mac, 1, self.queue_pairs, min(self.mtu, 0xFFFF))
        return config[offset : offset + size].ljust(size, b"\0")

    def queues_per_thread(self) -> Sequence[Sequence[int]]:
        """One worker per pair: its RX and TX queues and its TAP queue."""
        return [[2 * k, 2 * k + 1] for k in range(self.queue_pairs)]

    def reset_device(self) -> None:
        """Forget the receive layout, the offloads and any waiting frame."""
        self.mrg_rxbuf = False
        self.tap.set_offload(0)
        self._forget()

    def disconnected(self) -> None:
        """The TAP is no longer read; a waiting frame is dropped with the session."""
        self._forget()

    def ring_enabled(self, index: int) -> None:
        """The pair's TAP queue is attached once either of its rings is enabled."""
        self._enabled.add(index)
        self._attach(index // 2)

    def ring_disabled(self, index: int) -> None:
        """The pair's TAP queue is detached once both of its rings are disabled."""
        self._enabled.discard(index)
        self._attach(index // 2)

    def _attach(self, pair: int) -> None:
        wanted = pair == 0 or bool({2 * pair, 2 * pair + 1} & self._enabled)
        if wanted == self._attached[pair] or pair >= len(self.tap.fds):
            return
        try:
            self.tap.set_attached(pair, wanted)
        except OSError as err:  # the pair still works; only the TAP's steering is off
            verb = "attach" if wanted else "detach"
            log.warning("net-tap: cannot %s queue %d of %s: %s", verb, pair, self.tap.name, err)
            return
        self._attached[pair] = wanted

    def _forget(self) -> None:
        for pair in range(self.queue_pairs):
            with self._paused(pair):
                self._unwatch(pair)
                if self._held[pair] is not None:
                    self._held[pair] = None
                    self.pair_stats[pair].rx_dropped += 1

    def _paused(self, pair: int) -> contextlib.AbstractContextManager[None]:
        if pair < len(self._workers):
            return self._workers[pair].paused()
        return contextlib.nullcontext()

    def close(self) -> None:
        """Stop watching, log each pair's counters and close the TAP queues."""
        self._forget()
        for pair, stats in enumerate(self.pair_stats):
            log.info("net-tap %s pair %d: %s", self.tap.name, pair, stats)
        self.tap.close()

    # --- events -------------------------------------------------------------------------
    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        """TX kicks go to the TAP; RX kicks and TAP readiness move frames to the guest."""
        pairs = self.queue_pairs
        if 0 <= device_event < 2 * pairs:
            pair = device_event // 2
            if device_event % 2:
                self._transmit(vrings[device_event], pair)
                return
        elif 2 * pairs <= device_event < 3 * pairs:
            pair = device_event - 2 * pairs
        else:
            raise BackendError(f"net-tap: unexpected event {device_event} ({evset:#x})")
        self._receive(pair, vrings[2 * pair])

    def _transmit(self, tx: VringT, pair: int) -> None:
        """Write every available TX chain to the pair's TAP queue, a ring's worth per pass.

        The per-frame work is one ``pop`` and one ``writev``: lookups are hoisted, the
        counters kept in locals, and the pass's chains completed with one used-index
        update (before a bad chain's own completion, so the used ring keeps ring order).
        """
        fd, stats = self.tap.fds[pair], self.pair_stats[pair]
        pop, writev = tx.pop, os.writev
        hdr = VNET_HDR_SIZE
        while True:
            tx.disable_notification()
            done: list[int] = []
            packets = nbytes = errors = 0
            broken = False
            for _ in range(MAX_QUEUE_SIZE):  # one ring's worth per pass
                try:
                    chain = pop()
                except VirtqError as exc:
                    log.warning("net-tap: bad TX chain: %s", str(exc))
                    errors += 1
                    if done:
                        tx.add_used_batch(done, 0)
                        done = []
                    tx.complete_error(exc)
                    if exc.head is None:  # the ring is broken: nothing more to pop
                        broken = True
                        break
                    continue
                if chain is None:
                    break
                length = chain.readable_len
                if length <= hdr:
                    errors += 1
                else:
                    try:
                        writev(fd, chain.readable)
                    except OSError as err:
                        errors += 1
                        log.debug("net-tap: TAP write failed: %s", err)
                    else:
                        packets += 1
                        nbytes += length - hdr
                done.append(chain.head)
            if done:
                tx.add_used_batch(done, 0)
            stats.tx_packets += packets
            stats.tx_bytes += nbytes
            stats.tx_errors += errors
            tx.signal_used_queue()
            if broken or not tx.enable_notification():
                return

    # --- receive ------------------------------------------------------------------------
    def _receive(self, pair: int, rx: VringT) -> None:
        """Deliver the waiting frame, then read the TAP while the ring has room."""
        stats = self.pair_stats[pair]
        if not (rx.started and rx.enabled):
            self._unwatch(pair)
            return
        delivered = False
        for _ in range(RX_BURST):
            frame = self._held[pair]
            self._held[pair] = None
            if frame is None:
                frame = self._read_tap(pair)
                if frame is None:
                    break
            fit = self._deliver(rx, frame, stats)
            if fit is None:  # no room: the frame waits, the TAP is left alone
                self._held[pair] = frame
                stats.rx_waits += 1
                break
            delivered |= fit
        if delivered:
            rx.signal_used_queue()
        if self._held[pair] is None:
            self._watch(pair)
        else:
            self._unwatch(pair)  # read again once the guest's next buffers kick us

    def _read_tap(self, pair: int) -> bytes | None:
        try:
            n = os.readv(self.tap.fds[pair], [self._buffer])
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as err:
            log.warning("net-tap: reading %s failed: %s", self.tap.name, err)
            return None
        return bytes(self._buffer[:n]) if n > VNET_HDR_SIZE else None

    def _deliver(self, rx: VringT, frame: bytes, stats: TapStats) -> bool | None:
        """Write one frame into receive chains: True, False (dropped), None (no room yet).

        Without room the chains taken go back (the ring's next index rewound; nothing
        was completed), after kicks were asked for at the ring's end, so the guest's
        next buffer wakes the worker.
        """
        start = rx.queue_next_avail()
        chains: list[DescriptorChain] = []
        room = 0
        while room < len(frame) and (self.mrg_rxbuf or not chains):
            try:
                chain = rx.pop()
            except VirtqError as exc:  # a broken ring: reported once, the frame dropped
                log.warning("net-tap: bad RX chain: %s", str(exc))
                rx.complete_error(exc)
                for taken in chains:
                    rx.add_used(taken.head, 0)
                stats.rx_dropped += 1
                return False
            if chain is None:
                if rx.enable_notification():
                    continue  # buffers arrived meanwhile
                rx.set_queue_next_avail(start)
                return None
            chains.append(chain)
            room += chain.writable_len
        if room < len(frame):  # one chain, too small, no MRG_RXBUF: never deliverable
            rx.add_used(chains[0].head, 0)
            stats.rx_dropped += 1
            return False
        packet = bytearray(frame)
        _NUM_BUFFERS.pack_into(packet, VNET_HDR_SIZE - 2, len(chains))
        view = memoryview(packet)
        offset = 0
        for chain in chains:
            n = chain.write(view[offset:])
            rx.add_used(chain.head, n)
            offset += n
        stats.rx_packets += 1
        stats.rx_bytes += len(frame) - VNET_HDR_SIZE
        return True

    def _watch(self, pair: int) -> None:
        if self._watched[pair] or pair >= len(self._workers):
            return
        self._workers[pair].register_listener(
            self.tap.fds[pair], select.EPOLLIN, self._tap_event(pair)
        )
        self._watched[pair] = True

    def _unwatch(self, pair: int) -> None:
        if not self._watched[pair] or pair >= len(self._workers):
            return
        self._watched[pair] = False
        with contextlib.suppress(BackendError, ValueError, OSError):
            self._workers[pair].unregister_listener(self.tap.fds[pair])


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` as 6 bytes (VhsmError otherwise)."""
    parts = text.split(":")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        mac = b""
    if len(parts) != 6 or len(mac) != 6 or any(len(p) != 2 for p in parts):
        raise VhsmError(f"bad MAC address {text!r} (want aa:bb:cc:dd:ee:ff)")
    return mac


__all__ = ["MAX_FRAME", "TapNetBackend", "TapStats", "parse_mac"]
