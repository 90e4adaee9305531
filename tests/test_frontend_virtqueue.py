"""The test front-end's rings are strict: a device that never signals fails the wait."""

from __future__ import annotations

from typing import Any

import pytest

from vhsm.backend import VhostUserBackend, drain
from vhsm.errors import VhsmError
from vhsm.frontend.virtqueue import MissedNotification
from vhsm.wire import ProtocolFeature, VirtioFeature

RING_BITS = VirtioFeature.RING_EVENT_IDX | VirtioFeature.RING_PACKED


class Echo(VhostUserBackend):
    """Copies what it reads into the writable part; `signal` says when it calls the driver."""

    def __init__(self, signal: str = "always", queues: int = 1) -> None:
        self.signal = signal
        self.queues = queues
        self.passes = 0

    def num_queues(self) -> int:
        return self.queues

    def max_queue_size(self) -> int:
        return 256

    def features(self) -> int:
        return int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES | RING_BITS)

    def protocol_features(self) -> int:
        return int(ProtocolFeature.REPLY_ACK)

    def handle_event(self, device_event: int, evset: int, vrings: Any, thread_id: int) -> None:
        vring = vrings[device_event]
        if self.signal == "always":
            drain(vring, lambda chain: chain.write(chain.read_all()))
            return
        while (chain := vring.pop()) is not None:
            vring.add_used(chain.head, chain.write(chain.read_all()))
        self.passes += 1
        if self.signal == "every-other" and self.passes % 2 == 0:
            vring.signal_used_queue()


def features(event_idx: bool, packed: bool) -> int:
    bits = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
    if event_idx:
        bits |= VirtioFeature.RING_EVENT_IDX
    if packed:
        bits |= VirtioFeature.RING_PACKED
    return int(bits)


def round_trip(fe: Any, data: bytes, timeout: float = 1.0) -> bytes:
    vq, mem = fe.vring(0), fe.memory
    src, dst = mem.alloc(len(data)), mem.alloc(len(data))
    mem.write(src, data)
    vq.post([(src, len(data))], [(dst, len(data))])
    vq.kick()
    _, length = vq.wait_used(timeout)
    out = mem.read(dst, length)
    mem.free(src)
    mem.free(dst)
    return out


LAYOUTS = [
    pytest.param(event_idx, packed, id=f"{'event-idx' if event_idx else 'flags'}-"
                 f"{'packed' if packed else 'split'}")
    for event_idx in (False, True)
    for packed in (False, True)
]  # fmt: skip


@pytest.mark.parametrize(("event_idx", "packed"), LAYOUTS)
def test_a_device_that_never_signals_fails_the_wait(frontend: Any, event_idx, packed) -> None:
    fe = frontend(Echo(signal="never"), features=features(event_idx, packed), packed=packed)
    with pytest.raises(MissedNotification, match=r"ring 0: used element \d+ arrived") as exc:
        round_trip(fe, b"hello")
    assert "signal_used_queue" in str(exc.value)
    assert isinstance(exc.value, TimeoutError)


@pytest.mark.parametrize(("event_idx", "packed"), LAYOUTS)
def test_strict_false_polls_like_before(frontend: Any, event_idx, packed) -> None:
    fe = frontend(
        Echo(signal="never"), features=features(event_idx, packed), packed=packed, strict=False
    )
    assert round_trip(fe, b"hello") == b"hello"


@pytest.mark.parametrize(("event_idx", "packed"), LAYOUTS)
def test_a_device_that_signals_as_owed_passes_many_rounds(frontend: Any, event_idx, packed) -> None:
    fe = frontend(Echo(), features=features(event_idx, packed), packed=packed, size=16)
    vq, mem = fe.vring(0), fe.memory
    for burst in range(20):
        bufs = []
        for i in range(1 + burst % 7):
            src, dst = mem.alloc(4), mem.alloc(4)
            mem.write(src, bytes([burst, i, 0, 1]))
            vq.post([(src, 4)], [(dst, 4)])
            bufs.append(dst)
        vq.kick()
        for _ in bufs:
            assert vq.wait_used(5.0)[1] == 4
        assert [mem.read(dst, 4)[:2] for dst in bufs] == [
            bytes([burst, i]) for i in range(len(bufs))
        ]


def test_a_device_that_signals_only_some_passes_fails(frontend: Any) -> None:
    fe = frontend(Echo(signal="every-other"), features=features(False, False))
    with pytest.raises(MissedNotification):
        for _ in range(4):
            round_trip(fe, b"x")


def test_a_ring_not_set_up_says_how_to_set_it_up(frontend: Any) -> None:
    fe = frontend(Echo(), queues=1)
    with pytest.raises(VhsmError, match=r"ring 2 is not set up \(rings set up: 0\)") as exc:
        fe.vring(2)
    assert "start(queues=3)" in str(exc.value) and "setup_vring(2" in str(exc.value)


def test_start_sets_up_every_ring_the_device_has(frontend: Any) -> None:
    fe = frontend(Echo(queues=3))  # no MQ: only the fixture knows the count
    assert sorted(fe.vrings) == [0, 1, 2]
    for index in range(3):
        vq, mem = fe.vring(index), fe.memory
        src, dst = mem.alloc(2), mem.alloc(2)
        mem.write(src, b"ok")
        vq.post([(src, 2)], [(dst, 2)])
        vq.kick()
        assert vq.wait_used()[1] == 2


@pytest.mark.parametrize(("event_idx", "packed"), LAYOUTS)
def test_heads_stay_the_callers_until_handed_out(frontend: Any, event_idx, packed) -> None:
    """A head is freed only when wait_used returns it, so reposting cannot reuse a pending one."""
    fe = frontend(Echo(), features=features(event_idx, packed), packed=packed, size=8)
    vq, mem = fe.vring(0), fe.memory
    buffers: dict[int, tuple[int, bytes]] = {}

    def post(tag: bytes) -> None:
        src, dst = mem.alloc(4), mem.alloc(4)
        mem.write(src, tag)
        buffers[vq.post([(src, 4)], [(dst, 4)])] = (dst, tag)

    for i in range(4):
        post(b"a%03d" % i)
    vq.kick()
    for round_ in range(12):
        head, _ = vq.wait_used(5.0)
        dst, tag = buffers.pop(head)
        assert mem.read(dst, 4) == tag
        post(b"b%03d" % round_)
        vq.kick()
    assert vq.driver.pending_used() <= len(buffers)
