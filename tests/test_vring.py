from __future__ import annotations

import os
import threading

import pytest
from virtq_support import BUF_GPA, MEM_SIZE, make_memory

from vhsm.backend import drain
from vhsm.dirtylog import DirtyLog
from vhsm.errors import GuestMemoryError, VhsmError, VirtqError
from vhsm.memory import GuestMemory, GuestMemoryAtomic
from vhsm.virtq import PackedDriver, SplitDriver
from vhsm.vring import RwLock, VringMutex, VringRwLock, VringState, VringT

EVENT_IDX = 1 << 29
LOG_ALL = 1 << 26
PACKED = 1 << 34
INDIRECT = 1 << 28


def eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def configured(
    mem: GuestMemory | GuestMemoryAtomic, features: int = 0, cls: type = VringMutex
) -> tuple[SplitDriver | PackedDriver, VringMutex]:
    snap = mem.memory() if isinstance(mem, GuestMemoryAtomic) else mem
    drv: SplitDriver | PackedDriver
    vring = cls(mem, 256, index=3)
    vring.set_features(features)
    vring.set_queue_size(8)
    if features & PACKED:
        drv = PackedDriver.layout(snap, 8, 0x1000, event_idx=bool(features & EVENT_IDX))
        vring.set_queue_info(drv.desc_gpa, drv.driver_event_gpa, drv.device_event_gpa)
    else:
        drv = SplitDriver.layout(snap, 8, 0x1000, event_idx=bool(features & EVENT_IDX))
        vring.set_queue_info(drv.desc_gpa, drv.avail_gpa, drv.used_gpa)
    return drv, vring


@pytest.mark.parametrize("features", [0, EVENT_IDX, PACKED, PACKED | EVENT_IDX])
@pytest.mark.parametrize("cls", [VringMutex, VringRwLock])
def test_pop_add_used_signal(features: int, cls: type) -> None:
    mem = make_memory()
    drv, vring = configured(mem, features, cls)
    call = new_eventfd()
    vring.set_call(call)
    drv.add_chain([(BUF_GPA, 8)], [(BUF_GPA + 64, 8)])
    chain = vring.pop()
    assert chain is not None and vring.pop() is None
    vring.add_used(chain.head, 8)
    assert vring.signal_used_queue() is True and eventfd_count(call) == 1
    assert vring.signal_used_queue() is False and eventfd_count(call) == 0  # nothing new
    assert drv.get_used() == (chain.head, 8)
    with vring.get_mut() as state:
        assert isinstance(state, VringState) and state.queue is not None
    vring.reset()
    with pytest.raises(OSError):
        os.fstat(call)  # reset closed the call fd


def test_notification_flags_suppress_call() -> None:
    mem = make_memory()
    drv, vring = configured(mem)
    call = new_eventfd()
    vring.set_call(call)
    drv.disable_interrupts()
    drv.add_chain([(BUF_GPA, 8)])
    chain = vring.pop()
    assert chain is not None
    vring.add_used(chain.head, 0)
    assert vring.signal_used_queue() is False and eventfd_count(call) == 0
    vring.disable_notification()
    drv.add_chain([(BUF_GPA, 8)])
    assert not drv.kick_needed()
    assert vring.enable_notification() is True
    vring.reset()


def test_fds_are_owned_and_replaced() -> None:
    mem = make_memory()
    vring = VringMutex(mem, 256)
    fds = [new_eventfd() for _ in range(4)]
    vring.set_kick(fds[0])
    vring.set_kick(fds[1])
    vring.set_err(fds[2])
    vring.set_call(fds[3])
    with pytest.raises(OSError):
        os.fstat(fds[0])
    os.eventfd_write(fds[1], 1)
    vring.enabled = True
    assert vring.read_kick() is True and eventfd_count(fds[1]) == 0
    vring.signal_err()
    assert eventfd_count(fds[2]) == 1
    assert vring.get_err() == fds[2]
    vring.reset()
    for fd in fds[1:]:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert vring.enabled is False and vring.started is False


def test_bad_chain_completed_and_err_signalled() -> None:
    mem = make_memory()
    drv, vring = configured(mem)  # no INDIRECT feature
    err = new_eventfd()
    vring.set_err(err)
    drv.add_chain([(BUF_GPA, 8)], indirect_gpa=0x8000, memory=mem)
    drv.add_chain([(BUF_GPA, 8)])
    with pytest.raises(VirtqError) as info:
        vring.pop()
    vring.complete_error(info.value)
    assert eventfd_count(err) == 1
    assert drv.get_used() == (info.value.head, 0)
    assert vring.pop() is not None
    vring.reset()


@pytest.mark.parametrize("features", [0, PACKED])
def test_a_guest_toggling_its_avail_index_cannot_keep_a_drain_turning(
    features: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every re-check that reports work costs the pass budget, so drain ends and yields.

    The guest is modelled by a queue whose re-check always sees work that the next
    pop does not find (an avail index moved forward and back again).
    """
    mem = make_memory()
    _, vring = configured(mem, features)
    with vring.get_mut() as state:
        queue_class = type(state.queue)
    rechecks = 0

    def sees_work(queue: object) -> bool:
        nonlocal rechecks
        rechecks += 1
        assert rechecks < 100, "the drain loop keeps re-checking: it spins"
        return True

    monkeypatch.setattr(queue_class, "enable_notification", sees_work)
    vring.begin_pass()
    assert drain(vring, lambda chain: 0) == 0  # returns instead of spinning
    assert vring.yielded  # the worker comes back to it with the lock released between
    assert rechecks == 8 + 1  # the pass budget is the ring size (8)
    vring.reset()


@pytest.mark.parametrize("features", [0, PACKED])
def test_base_round_trip(features: int) -> None:
    mem = make_memory()
    drv, vring = configured(mem, features)
    for _ in range(3):
        drv.add_chain([(BUF_GPA, 8)])
        chain = vring.pop()
        assert chain is not None
        vring.add_used(chain.head, 0)
    base = vring.get_queue_base()
    assert base & 0x7FFF == 3
    other = VringMutex(mem, 256)
    other.set_features(features)
    other.set_queue_base(base)
    assert other.get_queue_base() == base
    other.set_queue_size(8)
    other.set_queue_info(0x1000, 0x1000 + 128, 0x1000 + 128 + 24)
    assert other.get_queue_base() == base
    if not features:
        with pytest.raises(ValueError, match="reserved"):
            other.set_queue_base(1 << 16)
        assert other.queue_used_idx() == 3  # split: the used index came from guest memory
    vring.reset()


def test_memory_update_retranslates_and_keeps_indices() -> None:
    atomic = GuestMemoryAtomic(make_memory())
    drv, vring = configured(atomic, EVENT_IDX, VringRwLock)
    drv.add_chain([(BUF_GPA, 8)])
    chain = vring.pop()
    assert chain is not None
    vring.add_used(chain.head, 1)
    # the "new table" maps the same memfd: re-translate and carry on from the same indices
    snap = atomic.memory()
    atomic.replace(GuestMemory(snap.regions))
    assert vring.update_memory() is True
    assert vring.queue_next_avail() == 1
    drv.add_chain([(BUF_GPA, 8)])
    chain = vring.pop()
    assert chain is not None
    vring.add_used(chain.head, 2)
    assert drv.get_used() == (0, 1)
    assert drv.get_used() is not None
    with pytest.raises(GuestMemoryError):
        vring.set_queue_info(MEM_SIZE, MEM_SIZE, MEM_SIZE)
    vring.reset()


def test_dirty_log_only_with_log_all() -> None:
    mem = make_memory()
    drv, vring = configured(mem)
    assert isinstance(drv, SplitDriver)
    bitmap = bytearray(MEM_SIZE // 4096 // 8)
    vring.set_log(DirtyLog(memoryview(bitmap), atomic=False))
    vring.set_queue_info(drv.desc_gpa, drv.avail_gpa, drv.used_gpa, drv.used_gpa)
    drv.add_chain([], [(0x200000, 8)])
    chain = vring.pop()
    assert chain is not None
    vring.add_used(chain.head, 8)
    assert not any(bitmap)  # LOG_ALL not acked
    vring.set_features(LOG_ALL)
    drv.add_chain([], [(0x200000, 8)])
    chain = vring.pop()
    assert chain is not None
    vring.add_used(chain.head, 8)
    assert bitmap[0x200000 // 4096 // 8] and bitmap[drv.used_gpa // 4096 // 8]
    vring.reset()


def test_lock_context_and_protocol() -> None:
    mem = make_memory()
    vring = VringMutex(mem, 256)
    with vring.lock() as state:
        state.set_queue_size(16)
        assert state.size == 16
    ring: VringT = vring
    assert ring.get_queue_base() == 0
    rw = VringRwLock(mem, 256)
    with rw.read_lock() as s1, rw.get_ref() as s2:
        assert s1 is s2  # readers share
    with rw.write_lock() as s3:
        assert s3.size == 0


def test_rwlock_excludes_writers() -> None:
    lock = RwLock()
    seen: list[str] = []
    lock.acquire_read()
    t = threading.Thread(
        target=lambda: (lock.acquire_write(), seen.append("w"), lock.release_write())
    )
    t.start()
    t.join(0.05)
    assert seen == []  # the writer waits for the reader
    lock.release_read()
    t.join()
    assert seen == ["w"]


@pytest.mark.parametrize("features", [0, EVENT_IDX, PACKED | EVENT_IDX])
def test_needs_notification_then_signal_notifies_once(features: int) -> None:
    """rust-vmm's pattern `if needs_notification(): signal_used_queue()` must not lose the call."""
    drv, vring = configured(make_memory(), features)
    call = new_eventfd()
    vring.set_call(call)
    drv.add_chain([], [(BUF_GPA, 16)])
    chain = vring.pop()
    assert chain is not None
    vring.add_used(chain.head, 0)
    assert vring.needs_notification() is True
    assert vring.needs_notification() is True  # asking again does not use it up
    assert vring.signal_used_queue() is True and eventfd_count(call) == 1
    assert vring.needs_notification() is False  # nothing new since the signal


@pytest.mark.parametrize("cls", [VringMutex, VringRwLock])
def test_rust_vmm_forms_reach_the_queue(cls: type) -> None:
    """`get_ref()/get_mut()` then `get_queue()/get_queue_mut()`, and `set_queue_ready()`."""
    mem = make_memory()
    drv, vring = configured(mem, 0, cls)
    drv.add_chain([(BUF_GPA, 8)], [])
    with vring.get_ref() as state:
        assert state.get_queue() is state.queue
    with vring.get_mut() as state:
        queue = state.get_queue_mut()
        assert queue is state.queue and queue.has_available()
    vring.set_queue_ready(True)
    with vring.get_ref() as state:
        assert state.queue_ready() and state.started
    vring.set_queue_ready(False)
    assert not vring.started
    empty = VringState(mem, 256, index=5)
    with pytest.raises(VhsmError, match="ring 5 has no queue yet"):
        empty.get_queue()
