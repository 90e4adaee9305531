"""What one 4 KiB block request costs `vhsm serve blk`'s device side, in CPU time.

The driver side (vhsm.virtq.driver) posts ``--depth`` requests at a time (header
alone, 4 KiB of data, status byte alone: the layout Linux and QEMU send), half
reads and half writes at random 4 KiB-aligned offsets of an image; only
`BlkBackend.handle_event` for the kick (pop, preadv/pwritev, status, used
element, signal) is timed, in CPU seconds of this thread, the best of
``--repeat`` measurements. No front-end process, no socket, no epoll wake-up:
this isolates the per-request Python and system-call cost that `vhsm bench blk`
adds to the worker's wake-ups, and machine load hardly moves it.

The image lives in /dev/shm by default (``--image-dir``), so the figure is the
device's own cost, not the file system's.

Run: .venv/bin/python benchmarks/blk_device.py [--depths 1,32] [--requests 20000]
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from vhsm import speedups
from vhsm.backend import EPOLLIN
from vhsm.devices.blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlkBackend
from vhsm.memory import GuestMemory, GuestMemoryAtomic
from vhsm.virtq import PackedDriver, SplitDriver
from vhsm.vring import VringMutex
from vhsm.wire.enums import VirtioFeature
from vhsm.wire.payloads import VhostUserMemoryRegion

MEM_SIZE = 8 << 20
RING_GPA = 0x1000
BUF_GPA = 0x100000
BLOCK = 4096
IMAGE_SIZE = 16 << 20
HEADER = struct.Struct("<IIQ")
RING_PACKED = int(VirtioFeature.RING_PACKED)


class Rig:
    """A blk device with queue 0 started over memfd guest memory, and its driver side."""

    def __init__(self, image: Path, depth: int, packed: bool) -> None:
        fd = os.memfd_create("blk-device-bench")
        os.ftruncate(fd, MEM_SIZE)
        self.memory = GuestMemory.from_table(
            [VhostUserMemoryRegion(0, MEM_SIZE, 0x7F0000000000, 0)], [fd]
        )
        self.backend = BlkBackend(str(image))
        features = (self.backend.features() & ~RING_PACKED) | (RING_PACKED if packed else 0)
        self.backend.acked_features(features)
        size = max(64, 4 * depth)
        self.vring = VringMutex(GuestMemoryAtomic(self.memory), size, index=0)
        self.vring.set_features(features)
        self.vring.set_queue_size(size)
        self.driver: SplitDriver | PackedDriver
        if packed:
            self.driver = PackedDriver.layout(self.memory, size, RING_GPA)
            d = self.driver
            self.vring.set_queue_info(d.desc_gpa, d.driver_event_gpa, d.device_event_gpa)
        else:
            self.driver = SplitDriver.layout(self.memory, size, RING_GPA)
            d = self.driver
            self.vring.set_queue_info(d.desc_gpa, d.avail_gpa, d.used_gpa)
        self.vring.set_call(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self.vring.set_err(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self.vring.started = self.vring.enabled = True
        stride = BLOCK + 64
        self.slots = [
            (BUF_GPA + i * stride + BLOCK, BUF_GPA + i * stride, BUF_GPA + i * stride + BLOCK + 16)
            for i in range(depth)
        ]  # (header, data, status) of each request in flight
        self.rng = random.Random(18)
        self.blocks = image.stat().st_size // BLOCK

    def post(self) -> None:
        """Post one request per slot: a random 4 KiB read or write."""
        for hdr, data, status in self.slots:
            write = self.rng.random() < 0.5
            kind = VIRTIO_BLK_T_OUT if write else VIRTIO_BLK_T_IN
            sector = self.rng.randrange(self.blocks) * (BLOCK // 512)
            self.memory.write(hdr, HEADER.pack(kind, 0, sector))
            if write:
                self.driver.add_chain([(hdr, HEADER.size), (data, BLOCK)], [(status, 1)])
            else:
                self.driver.add_chain([(hdr, HEADER.size)], [(data, BLOCK), (status, 1)])

    def round(self) -> float:
        """Post a round, time the device serving it; CPU seconds."""
        self.post()
        c0 = time.thread_time()
        self.vring.begin_pass()
        self.backend.handle_event(0, EPOLLIN, [self.vring], 0)
        cpu = time.thread_time() - c0
        done = 0
        while self.driver.get_used() is not None:
            done += 1
        if done != len(self.slots):
            raise RuntimeError(f"{done} of {len(self.slots)} requests completed")
        return cpu

    def close(self) -> None:
        """Drop the queue and close the image."""
        self.vring.reset()
        self.backend.close()


def per_request(image: Path, depth: int, packed: bool, requests: int, repeat: int) -> float:
    """Best CPU seconds per request over ``repeat`` measurements of ``requests`` requests."""
    rig = Rig(image, depth, packed)
    try:
        rounds = max(1, requests // depth)
        for _ in range(max(1, rounds // 10)):  # warm-up
            rig.round()
        return min(
            sum(rig.round() for _ in range(rounds)) / (rounds * depth) for _ in range(repeat)
        )
    finally:
        rig.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Print µs of device CPU per request for each ring layout and depth."""
    ap = argparse.ArgumentParser(prog="vhsm bench blk-device", description=__doc__)
    ap.add_argument(
        "--depths", type=lambda t: [int(x) for x in t.split(",")], default=[1, 32], help="QDs"
    )
    ap.add_argument("--requests", type=int, default=20000, help="requests per measurement")
    ap.add_argument("--repeat", type=int, default=3, help="measurements (the best is kept)")
    ap.add_argument("--image-dir", type=Path, default=Path("/dev/shm"), help="where the image is")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.repeat < 1 or min(args.depths) < 1:
        ap.error("--requests, --repeat and every depth must be >= 1")
    print(f"4 KiB random reads and writes, device side CPU time; data path: {speedups.data_path()}")
    print(f"{'ring':7s} {'depth':>5s} {'us/request':>11s}")
    with tempfile.NamedTemporaryFile(dir=args.image_dir, prefix="vhsm-blk-device-") as f:
        f.write(os.urandom(IMAGE_SIZE))
        f.flush()
        for ring in ("split", "packed"):
            for depth in args.depths:
                cost = per_request(
                    Path(f.name), depth, ring == "packed", args.requests, args.repeat
                )
                print(f"{ring:7s} {depth:5d} {cost * 1e6:11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
