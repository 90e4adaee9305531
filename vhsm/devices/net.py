"""virtio-net without a host network: a ``sink`` and a ``loopback``, for tests and benchmarks.

Teaching notes:

* Queues come in pairs: pair ``k`` has its receive queue at ``2k`` and its transmit
  queue at ``2k + 1``. GET_QUEUE_NUM answers pairs (the ``queue_num`` hook).
* Every packet starts with the 12-byte ``virtio_net_hdr`` of VIRTIO_F_VERSION_1
  (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers).
  No checksum or segmentation offload is offered, so TX headers carry nothing the
  device must act on and RX headers are zero except ``num_buffers``.
* ``sink`` consumes every transmitted packet, counting packets and bytes and
  reading every byte as a real NIC's DMA would: an Adler-32 checksum of each frame
  (``tx_checksum``), or with ``sink_reads="copy"`` a copy of it, which is what
  DPDK's vhost back-end does into its mbufs. Its TX path takes whole bursts with the
  numpy batch API: one lock round trip pops every available packet, another
  completes them all; single-descriptor packets need no Python object each.
* ``loopback`` puts each transmitted frame back on the same pair's receive queue.
  With VIRTIO_NET_F_MRG_RXBUF a frame may fill several receive chains; the header
  in the first one says how many (``num_buffers``). Without receive buffers the
  frame is dropped and counted, as a NIC with a full ring would.
* A ring that is started but disabled is processed "without side effects" (VU-STATE-008):
  the device opts in to kicks on such rings (``process_disabled_rings``) and drops
  what a disabled TX ring carries (completed, counted in ``tx_dropped``, never sunk
  or looped back); a disabled RX ring gets no frames.
"""

from __future__ import annotations

import functools
import logging
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vhsm import speedups
from vhsm.backend import EPOLLIN, RING_FEATURES, VhostUserBackend
from vhsm.errors import BackendError, VirtqError
from vhsm.virtq.common import sum_of
from vhsm.virtq.sink_pass import FALLBACK
from vhsm.wire.enums import NET_MAX_QUEUE_PAIRS, NetFeature, ProtocolFeature

if TYPE_CHECKING:
    from vhsm.virtq.batch import Batch
    from vhsm.virtq.chain import DescriptorChain
    from vhsm.vring import VringT

log = logging.getLogger(__name__)

#: struct virtio_net_hdr (VERSION_1 form: always 12 bytes, num_buffers included).
NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size
MODES = ("sink", "loopback")
#: How the sink reads each frame: an Adler-32 checksum, or a copy (what DPDK's vhost
#: back-end does into its mbufs).
SINK_READS = ("checksum", "copy")
MAX_QUEUE_SIZE = 1024
_U64 = (1 << 64) - 1
#: Sink bursts read with one numpy gather (else frame by frame): at least this many
#: frames of one size, at most _VEC_MAX_FRAME bytes when checksummed (float32-exact sums).
_VEC_MIN_BURST = 64
_VEC_MAX_FRAME = 256 + NET_HDR_SIZE  # a = 1 + sum of bytes stays below 65521
_ADLER_MOD = 65521


@dataclass
class NetStats:
    """Counters of one queue pair (each pair is served by one worker thread)."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0  # packets of a started but disabled TX ring (VU-STATE-008)
    tx_checksum: int = 0  # sum of the frames' Adler-32 checksums (mod 2^64), sink only
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0


class QueuePairBackend(VhostUserBackend):
    """What every virtio-net back-end here shares: rings counted in RX/TX pairs.

    Subclasses set ``queue_pairs``; the control queue stays with the front-end.
    """

    queue_pairs: int

    def num_queues(self) -> int:
        """Two virtqueues per pair (the control queue stays with the front-end)."""
        return 2 * self.queue_pairs

    def queue_num(self) -> int:
        """GET_QUEUE_NUM counts pairs for net devices."""
        return self.queue_pairs

    def max_queue_size(self) -> int:
        """Largest ring accepted."""
        return MAX_QUEUE_SIZE

    def pair_protocol_features(self, bits: int) -> int:
        """``bits`` without CONFIGURE_MEM_SLOTS when there are several pairs.

        QEMU 7.2 runs one vhost device per pair on the one connection; with memory
        slots each sends the whole memory table as ADD_MEM_REG, over the regions the
        first added (refused as overlapping: QEMU then leaves the back-end out).
        SET_MEM_TABLE it sends once, for the first pair.
        """
        if self.queue_pairs > 1:
            bits &= ~ProtocolFeature.CONFIGURE_MEM_SLOTS
        return int(bits)


class NetBackend(QueuePairBackend):
    """virtio-net with ``queue_pairs`` RX/TX pairs, in ``sink`` or ``loopback`` mode."""

    #: Kicks on started but disabled rings reach ``handle_event``: their TX is dropped.
    process_disabled_rings = True
    #: After a TX burst the worker polls the TX ring this long before sleeping (µs).
    busy_poll_us = 50

    def __init__(
        self,
        mode: str = "sink",
        queue_pairs: int = 1,
        *,
        busy_poll_us: int | None = None,
        sink_reads: str = "checksum",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not one of {MODES}")
        if sink_reads not in SINK_READS:
            raise ValueError(f"sink_reads {sink_reads!r} not one of {SINK_READS}")
        self.checksum = sink_reads == "checksum"
        if not 1 <= queue_pairs <= NET_MAX_QUEUE_PAIRS:
            raise ValueError(f"queue_pairs {queue_pairs} not in 1..{NET_MAX_QUEUE_PAIRS}")
        self.mode = mode
        self.queue_pairs = queue_pairs
        if busy_poll_us is not None:
            self.busy_poll_us = busy_poll_us
        self.mrg_rxbuf = False
        self.pair_stats = [NetStats() for _ in range(queue_pairs)]

    @property
    def stats(self) -> NetStats:
        """Counters summed over every pair."""
        total = NetStats()
        for s in self.pair_stats:
            for name, value in vars(s).items():
                setattr(total, name, getattr(total, name) + value)
        total.tx_checksum &= _U64
        return total

    # --- negotiation -------------------------------------------------------------------
    def features(self) -> int:
        """Ring features, MRG_RXBUF, and MQ (with the CTRL_VQ it requires) for several pairs."""
        bits = RING_FEATURES | NetFeature.MRG_RXBUF
        if self.queue_pairs > 1:
            bits |= NetFeature.MQ | NetFeature.CTRL_VQ
        return int(bits)

    def acked_features(self, features: int) -> None:
        """Remember whether frames may span several receive chains."""
        self.mrg_rxbuf = bool(features & NetFeature.MRG_RXBUF)

    def protocol_features(self) -> int:
        """Multiqueue, acks, memory slots (one pair), the status byte DPDK's virtio-user uses."""
        return self.pair_protocol_features(
            ProtocolFeature.MQ
            | ProtocolFeature.REPLY_ACK
            | ProtocolFeature.CONFIGURE_MEM_SLOTS
            | ProtocolFeature.STATUS
        )

    def queues_per_thread(self) -> Sequence[Sequence[int]]:
        """One worker per pair: a pair's RX and TX queues are served together."""
        return [[2 * k, 2 * k + 1] for k in range(self.queue_pairs)]

    def busy_poll_queue(self, index: int) -> bool:
        """Only TX rings are polled (RX buffers wait for frames, not for the device)."""
        return index % 2 == 1

    def reset_device(self) -> None:
        """Forget the negotiated receive layout."""
        self.mrg_rxbuf = False

    # --- the data path -------------------------------------------------------------------
    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        """A kick: TX queues are drained; an RX kick only matters for loopback (more room)."""
        if evset != EPOLLIN or not 0 <= device_event < 2 * self.queue_pairs:
            raise BackendError(f"net: unexpected event {device_event} ({evset:#x})")
        pair = device_event // 2
        tx, rx = vrings[2 * pair + 1], vrings[2 * pair]
        if device_event % 2 == 0:
            if rx.enabled:  # RX buffers are taken when frames arrive, not on kicks
                rx.disable_notification()
            return
        stats = self.pair_stats[pair]
        fused = speedups.accel is not None and self.mode == "sink"  # pure Python: no call
        if fused and tx.enabled and self._sink_pass(tx, stats):
            return
        while True:
            tx.disable_notification()
            if not tx.enabled:
                self._drop(tx, stats)
            elif self.mode == "sink":
                self._sink(tx, stats)
            else:
                self._loopback(tx, rx, stats)
            tx.signal_used_queue()
            if not tx.enable_notification():
                break

    @staticmethod
    def _drop(tx: VringT, stats: NetStats) -> None:
        """A started but disabled TX ring (VU-STATE-008): complete every packet, send none."""
        while True:
            batch = tx.pop_batch()
            if not len(batch):
                return
            for exc in batch.errors:
                stats.tx_errors += 1
                tx.complete_error(exc)
            chain_ids = np.array([c.head for c in batch.chains], dtype=np.int64)
            ids = np.concatenate((batch.heads.astype(np.int64), chain_ids))
            if len(ids):
                stats.tx_dropped += len(ids)
                tx.add_used_batch(ids, 0)  # TX: the device writes nothing

    # --- sink ----------------------------------------------------------------------------
    def _sink_pass(self, tx: VringT, stats: NetStats) -> bool:
        """The whole kick in one compiled call when it applies; False: the pure loop goes on.

        The pure loop then takes the ring from where the fused pass stopped (a burst it
        leaves to the pure path, or no fused pass at all), with the same results.
        """
        done = tx.sink_pass(NET_HDR_SIZE, self.checksum)
        if done is None:
            return False
        stats.tx_packets += done.packets
        stats.tx_bytes += done.bytes
        if self.checksum:
            stats.tx_checksum = (stats.tx_checksum + done.checksum) & _U64
        done.check()
        return done.status != FALLBACK

    def _sink(self, tx: VringT, stats: NetStats) -> None:
        """Consume every available TX packet, one burst at a time."""
        while True:
            batch = tx.pop_batch()
            if not len(batch):
                return
            frames = self._sink_simple(batch, stats)
            ids = batch.heads
            if batch.chains or batch.errors:
                for chain in batch.chains:
                    self._sink_chain(chain, stats)
                chain_ids = np.array([c.head for c in batch.chains], dtype=np.int64)
                ids = np.concatenate((ids.astype(np.int64), chain_ids))
                for exc in batch.errors:
                    stats.tx_errors += 1
                    tx.complete_error(exc)
            if len(ids):
                tx.add_used_batch(ids, 0)  # TX: the device writes nothing
            if frames is not None:  # copied out before the buffers went back: sum the copy
                stats.tx_checksum = (stats.tx_checksum + _adler32_of_rows(frames)) & _U64
            if not tx.has_available():  # cheaper than popping an empty batch
                return

    def _sink_simple(self, batch: Batch, stats: NetStats) -> np.ndarray | None:
        """Count single-descriptor packets (header and frame in one buffer) and read them.

        A burst of equal frames in one region is copied out with one numpy gather; with
        checksums on (frames up to 256 bytes) the copy is returned, to be summed once
        the ring has its buffers back. Other bursts are read frame by frame in place.
        """
        k = len(batch.heads)
        if not k:
            return None
        lens = batch.lens
        shortest, longest = batch.lens_range
        region = batch.single_region
        views = batch.region_views
        checksum = self.checksum
        if shortest < NET_HDR_SIZE:  # runts: count them, keep the rest
            good = lens >= NET_HDR_SIZE
            stats.tx_errors += k - int(np.count_nonzero(good))
            kept = batch.region[good]
            _sink_frames(views, kept, batch.offsets[good], lens[good], stats, checksum)
            return None
        if (
            shortest == longest
            and (shortest <= _VEC_MAX_FRAME or not checksum)
            and region is not None
            and k >= _VEC_MIN_BURST
        ):
            stats.tx_packets += k
            stats.tx_bytes += k * (shortest - NET_HDR_SIZE)
            frames = _gather_rows(views[region], batch.offsets, shortest, NET_HDR_SIZE)
            return frames if checksum else None
        where: np.ndarray | int = region if region is not None else batch.region
        _sink_frames(views, where, batch.offsets, lens, stats, checksum)
        return None

    def _sink_chain(self, chain: DescriptorChain, stats: NetStats) -> None:
        """Count and read one multi-descriptor packet."""
        if chain.readable_len < NET_HDR_SIZE:
            stats.tx_errors += 1
            return
        stats.tx_packets += 1
        stats.tx_bytes += chain.readable_len - NET_HDR_SIZE
        if not self.checksum:
            chain.read(chain.readable_len - NET_HDR_SIZE, NET_HDR_SIZE)
            return
        adler = zlib.adler32(b"")
        skip = NET_HDR_SIZE
        for view in chain.readable:
            if skip < len(view):
                adler = zlib.adler32(view[skip:], adler)
            skip = max(0, skip - len(view))
        stats.tx_checksum = (stats.tx_checksum + adler) & _U64

    # --- loopback ------------------------------------------------------------------------
    def _loopback(self, tx: VringT, rx: VringT, stats: NetStats) -> None:
        """Move every available TX frame to the RX queue of the same pair."""
        delivered = False
        while True:
            try:
                chain = tx.pop()
            except VirtqError as exc:
                log.warning("net: bad TX chain: %s", str(exc))
                stats.tx_errors += 1
                tx.complete_error(exc)
                continue
            if chain is None:
                break
            if chain.readable_len < NET_HDR_SIZE:
                stats.tx_errors += 1
            else:
                stats.tx_packets += 1
                stats.tx_bytes += chain.readable_len - NET_HDR_SIZE
                frame = chain.read(chain.readable_len - NET_HDR_SIZE, NET_HDR_SIZE)
                delivered |= self._receive(rx, frame, stats)
            tx.add_used(chain.head, 0)
        if delivered:
            rx.signal_used_queue()

    def _receive(self, rx: VringT, frame: bytes, stats: NetStats) -> bool:
        """Write one frame into RX chains (several with MRG_RXBUF); False if dropped."""
        if not (rx.started and rx.enabled):
            stats.rx_dropped += 1
            return False
        need = NET_HDR_SIZE + len(frame)
        chains: list[DescriptorChain] = []
        room = 0
        while room < need and (self.mrg_rxbuf or not chains):
            chain = _pop_rx(rx)
            if chain is None:
                break
            chains.append(chain)
            room += chain.writable_len
        if room < need:
            # Out of RX buffers (or one too small without MRG_RXBUF): give the chains back
            # unused, since only the device may complete them, and drop the frame.
            for chain in chains:
                rx.add_used(chain.head, 0)
            stats.rx_dropped += 1
            return bool(chains)
        packet = NET_HDR.pack(0, 0, 0, 0, 0, 0, len(chains)) + frame
        offset = 0
        for chain in chains:
            n = chain.write(memoryview(packet)[offset:])
            rx.add_used(chain.head, n)
            offset += n
        stats.rx_packets += 1
        stats.rx_bytes += len(frame)
        return True


def _sink_frames(
    views: tuple[memoryview, ...],
    region: np.ndarray | int,
    offsets: np.ndarray,
    lens: np.ndarray,
    stats: NetStats,
    checksum: bool,
) -> None:
    """Count frames and read each in place: one ``zlib.adler32`` call, or one copy."""
    k = len(lens)
    if not k:
        return
    stats.tx_packets += k
    stats.tx_bytes += int(sum_of(lens, dtype=np.int64)) - NET_HDR_SIZE * k
    accel = speedups.accel
    if accel is not None and isinstance(region, int):
        read = accel.read_frames(views[region], offsets, lens, NET_HDR_SIZE, checksum)
        if read is not None:  # None: not all inside the region, the loop below reports it
            if checksum:
                stats.tx_checksum = (stats.tx_checksum + read) & _U64
            return
    starts = (offsets + NET_HDR_SIZE).tolist()
    ends = (offsets + lens).tolist()
    regions = [region] * k if isinstance(region, int) else region.tolist()
    frames = (views[r][start:end] for r, start, end in zip(regions, starts, ends, strict=True))
    if checksum:
        total = stats.tx_checksum + sum(map(zlib.adler32, frames))
        stats.tx_checksum = total & _U64
    else:
        for frame in frames:
            bytes(frame)


def _gather_rows(region: memoryview, offsets: np.ndarray, n: int, skip: int = 0) -> np.ndarray:
    """A copy of bytes ``skip..n`` of the ``n``-byte buffers at ``offsets``, one row each."""
    width = n - skip
    accel = speedups.accel
    if accel is not None:
        out = np.empty((len(offsets), width), dtype=np.uint8)
        if accel.gather_rows(region, offsets, n, skip, out):
            return out
    # every window of the region from byte `skip` on (a view), then one row per buffer
    windows = np.ndarray((len(region) - n + 1, width), np.uint8, region, skip, (1, 1))
    rows: np.ndarray = windows[offsets]
    return rows


@functools.lru_cache(maxsize=16)
def _adler_weights(n: int) -> np.ndarray:
    """Per-byte weights of an n-byte frame: 1 for the ``a`` sum, n - j for ``b``."""
    weights = np.empty((n, 2), dtype=np.float32)
    weights[:, 0] = 1
    weights[:, 1] = np.arange(n, 0, -1)
    weights.flags.writeable = False
    return weights


def _adler32_of_rows(frames: np.ndarray) -> int:
    """Sum of the Adler-32 checksums of the rows of ``frames`` (uint8, one frame each).

    Equal to summing ``zlib.adler32`` per frame, without a Python call per frame: for
    bytes d_0..d_{n-1}, a = 1 + sum d_j and b = n + sum (n - j) d_j, both mod 65521.
    One float32 matrix product gives both sums, exact while n <= 256 (b < 2^24); a
    then needs no reduction (it stays below 65521), b one integer remainder.
    """
    k, n = len(frames), int(frames.shape[1])
    if n == 0:
        return k  # adler32(b"") == 1
    accel = speedups.accel
    if accel is not None and frames.flags.c_contiguous:
        total: int = accel.adler32_rows(frames, k, n)
        return total
    sums = (frames.astype(np.float32) @ _adler_weights(n)).astype(np.int32)
    b = sums[:, 1]
    b += n
    b = np.remainder(b, _ADLER_MOD)
    # int32 totals: k * 65521 < 2^31 for any ring (k <= 32768)
    return int(sum_of(sums[:, 0])) + k + (int(sum_of(b)) << 16)


def _pop_rx(rx: VringT) -> DescriptorChain | None:
    """Next usable RX chain; bad ones are completed and reported."""
    while True:
        try:
            return rx.pop()
        except VirtqError as exc:
            log.warning("net: bad RX chain: %s", str(exc))
            rx.complete_error(exc)
