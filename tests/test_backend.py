"""The back-end base classes: defaults, VhostUserBackendMut's lock, and `drain`."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from devices_support import Bench, eventfd_count

from vhsm.backend import (
    HOOK_NAMES,
    VhostUserBackend,
    VhostUserBackendMut,
    drain,
)
from vhsm.errors import BackendError
from vhsm.wire import DEFAULT_MAX_MEM_SLOTS, ProtocolFeature, VirtioFeature


class Echo(VhostUserBackend):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def num_queues(self) -> int:
        return 1

    def max_queue_size(self) -> int:
        return 64

    def features(self) -> int:
        return int(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX)

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[Any], thread_id: int
    ) -> None:
        drain(vrings[device_event], self.complete)

    def complete(self, chain: Any) -> int:
        self.seen.append(chain.head)
        return chain.writable_len


def test_defaults_match_the_rust_trait() -> None:
    backend = Echo()
    assert backend.protocol_features() == 0
    assert backend.queue_num() == 1 and backend.max_mem_slots() == DEFAULT_MAX_MEM_SLOTS
    assert backend.queues_per_thread() == [[0]]
    assert backend.get_config(4, 3) == bytes(3)
    with pytest.raises(BackendError, match="read-only"):
        backend.set_config(0, b"x", 0)
    assert backend.get_shared_object(__import__("uuid").uuid4()) is None
    assert backend.exit_event(0) is None


def test_required_hooks_name_the_class() -> None:
    with pytest.raises(BackendError, match="Bare must override num_queues"):
        type("Bare", (VhostUserBackend,), {})().num_queues()


@pytest.mark.parametrize("event_idx", [True, False])
def test_drain_completes_everything_and_signals(event_idx: bool) -> None:
    backend = Echo()
    features = int(VirtioFeature.VERSION_1) | (
        int(VirtioFeature.RING_EVENT_IDX) if event_idx else 0
    )
    bench = Bench(backend, features=features)
    heads = [bench.post(0, [], [(bench.alloc(8), 8)]) for _ in range(5)]
    bench.kick(0)
    assert backend.seen == heads
    assert sorted(bench.used(0)) == sorted((h, 8) for h in heads)
    assert eventfd_count(bench.calls[0]) == 1  # one signal per pass
    bench.close()


def test_drain_completes_a_bad_chain_with_zero_and_signals_err() -> None:
    backend = Echo()
    bench = Bench(backend)
    good = bench.post(0, [], [(bench.alloc(8), 8)])
    bad = bench.post(0, [], [(1 << 50, 8)])  # outside guest memory
    bench.kick(0)
    assert backend.seen == [good]
    assert sorted(bench.used(0)) == sorted([(good, 8), (bad, 0)])
    assert eventfd_count(bench.errs[0]) == 1
    bench.close()


class Counter(VhostUserBackendMut):
    """Hooks that would race without the framework's lock."""

    def __init__(self) -> None:
        self.value = 0

    def num_queues(self) -> int:
        return 1

    def max_queue_size(self) -> int:
        return 8

    def features(self) -> int:
        value = self.value
        time.sleep(0.0005)  # widen the read-modify-write window
        self.value = value + 1
        return value


def test_mut_backend_serialises_every_hook() -> None:
    counter = Counter()
    threads = [
        threading.Thread(target=lambda: [counter.features() for _ in range(20)]) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.value == 80
    assert getattr(Counter.features, "_vhsm_locked", False)
    assert "handle_event" in HOOK_NAMES and "ring_started" in HOOK_NAMES


class RustVmmConfig(VhostUserBackend):
    """Config hooks written the rust-vmm way: no flags on set_config."""

    def __init__(self) -> None:
        self.space = bytearray(b"0123456789abcdef")

    def num_queues(self) -> int:
        return 1

    def max_queue_size(self) -> int:
        return 64

    def features(self) -> int:
        return int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)

    def protocol_features(self) -> int:
        return int(ProtocolFeature.CONFIG | ProtocolFeature.REPLY_ACK)

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(self.space[offset : offset + size])

    def set_config(self, offset: int, buf: bytes) -> None:  # type: ignore[override]
        self.space[offset : offset + len(buf)] = buf

    def handle_event(self, device_event: int, evset: int, vrings: Any, thread_id: int) -> None:
        drain(vrings[device_event], lambda chain: 0)


class FlagsConfig(RustVmmConfig):
    """Config hooks that want the flags, on both sides."""

    def __init__(self) -> None:
        super().__init__()
        self.flags: list[int] = []

    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:  # type: ignore[override]
        self.flags.append(flags)
        return super().get_config(offset, size)

    def set_config(self, offset: int, data: bytes, flags: int) -> None:  # type: ignore[override]
        self.flags.append(flags)
        super().set_config(offset, data)


def test_config_hooks_without_flags_are_called_without_them(frontend: Any) -> None:
    fe = frontend(RustVmmConfig(), size=64)
    fe.set_config(4, b"XY")
    assert fe.get_config(2, 6) == b"23XY67"


def test_config_hooks_with_flags_receive_them(frontend: Any) -> None:
    backend = FlagsConfig()
    fe = frontend(backend, size=64)
    fe.set_config(0, b"Z", flags=1)
    assert fe.get_config(0, 2) == b"Z1"
    assert backend.flags == [1, 0]
