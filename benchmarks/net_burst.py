"""What one burst costs the net sink: fixed cost per burst and cost per packet.

The driver side (vhsm.virtq.driver) posts bursts of k single-descriptor 64-byte
packets on a 256-entry TX ring over memfd guest memory; only the device side
(`NetBackend.handle_event` for the TX kick: pop, read every frame, complete,
signal) is timed, in CPU seconds of this thread. From two burst sizes the line
cost = fixed + k * per_packet is fitted: the fixed part is what larger bursts
(larger rings) amortise. No front-end process and no socket: this isolates the
Python side of `vhsm bench net`.

Run: .venv/bin/python benchmarks/net_burst.py [--bursts 3000] [--frame 64]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import numpy as np

from vhsm import speedups
from vhsm.backend import EPOLLIN
from vhsm.devices.net import NET_HDR_SIZE, SINK_READS, NetBackend
from vhsm.memory import GuestMemory, GuestMemoryAtomic
from vhsm.virtq import PackedDriver, SplitDriver
from vhsm.vring import VringMutex
from vhsm.wire import VirtioFeature
from vhsm.wire.payloads import VhostUserMemoryRegion

MEM_SIZE = 16 << 20
RING_GPA = 0x1000
BUF_GPA = 0x100000
BUF_STRIDE = 2048  # one mbuf-like slot per packet
RING_SIZE = 256
RING_PACKED = int(VirtioFeature.RING_PACKED)
BURSTS = (16, 64, 256)


def make_tx(
    backend: NetBackend, packed: bool
) -> tuple[list[VringMutex], SplitDriver | PackedDriver]:
    """Vrings 0 (RX, unused) and 1 (TX, started and enabled) and the TX driver side."""
    fd = os.memfd_create("net-burst")
    os.ftruncate(fd, MEM_SIZE)
    memory = GuestMemory.from_table([VhostUserMemoryRegion(0, MEM_SIZE, 0x7F0000000000, 0)], [fd])
    features = (backend.features() & ~RING_PACKED) | (RING_PACKED if packed else 0)
    backend.acked_features(features)
    atomic = GuestMemoryAtomic(memory)
    vrings = [VringMutex(atomic, RING_SIZE, index=i) for i in range(2)]
    tx = vrings[1]
    tx.set_features(features)
    tx.set_queue_size(RING_SIZE)
    drv: SplitDriver | PackedDriver
    if packed:
        drv = PackedDriver.layout(memory, RING_SIZE, RING_GPA)
        tx.set_queue_info(drv.desc_gpa, drv.driver_event_gpa, drv.device_event_gpa)
    else:
        drv = SplitDriver.layout(memory, RING_SIZE, RING_GPA)
        tx.set_queue_info(drv.desc_gpa, drv.avail_gpa, drv.used_gpa)
    tx.set_call(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    tx.set_err(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    tx.started = tx.enabled = True
    return vrings, drv


def burst_cost(reads: str, packed: bool, k: int, frame: int, bursts: int) -> float:
    """CPU seconds of the device side per burst of ``k`` packets."""
    backend = NetBackend("sink", sink_reads=reads)
    vrings, drv = make_tx(backend, packed)
    addrs = BUF_GPA + BUF_STRIDE * np.arange(k, dtype=np.uint64)
    lens = np.full(k, NET_HDR_SIZE + frame, dtype=np.uint32)
    device_readable = np.zeros(k, dtype=bool)
    cpu = 0.0
    try:
        for _ in range(bursts):
            drv.add_simple_batch(addrs, lens, device_readable)
            c0 = time.thread_time()
            for vring in vrings:  # what the worker does before each dispatch (bounded pass)
                vring.begin_pass()
            backend.handle_event(1, EPOLLIN, vrings, 0)
            cpu += time.thread_time() - c0
            drv.get_used_batch()
        assert backend.stats.tx_packets == bursts * k
    finally:
        for vring in vrings:
            vring.reset()
    return cpu / bursts


def main(argv: Sequence[str] | None = None) -> int:
    """Print µs per burst and ns per packet, then the fitted fixed and per-packet costs."""
    ap = argparse.ArgumentParser(prog="vhsm bench burst", description=__doc__)
    ap.add_argument("--bursts", type=int, default=3000, help="bursts per measurement")
    ap.add_argument("--frame", type=int, default=64, help="frame bytes after the header")
    args = ap.parse_args(argv)
    if args.bursts < 1 or not 0 <= args.frame <= BUF_STRIDE - NET_HDR_SIZE:
        ap.error(f"--bursts >= 1 and --frame in 0..{BUF_STRIDE - NET_HDR_SIZE}")
    print(
        f"TX ring of {RING_SIZE}, {args.frame}-byte frames, device side CPU time;"
        f" data path: {speedups.data_path()}"
    )
    print(f"{'ring':7s} {'reads':9s} {'burst':>5s} {'us/burst':>9s} {'ns/packet':>10s}")
    for ring in ("split", "packed"):
        for reads in SINK_READS:
            cost = {
                k: burst_cost(reads, ring == "packed", k, args.frame, args.bursts) for k in BURSTS
            }
            for k, c in cost.items():
                print(f"{ring:7s} {reads:9s} {k:5d} {c * 1e6:9.1f} {c / k * 1e9:10.0f}")
            lo, hi = BURSTS[-2], BURSTS[-1]
            per_packet = (cost[hi] - cost[lo]) / (hi - lo)
            fixed = cost[hi] - hi * per_packet
            fit = f"{fixed * 1e6:.1f} us per burst + {per_packet * 1e9:.0f} ns per packet"
            print(f"{ring:7s} {reads:9s} fit: {fit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
