"""`vhsm audit frontend`: be a permissive back-end for a real front-end and audit what it sends.

A `VhostUserDaemon` serves a reference device (rng, blk, net) or a generic
device that offers many features, on a private socket; a recording relay
(`vhsm.audit.record.Relay`) listens where the front-end connects and passes
everything through, back-end request channel included. When the audit ends
(the first connection closes with `once`, a timeout, or a signal) the
transcript goes through the trace auditor and the report says what the
front-end did wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vhsm.audit.record import Relay
from vhsm.audit.report import Report
from vhsm.audit.trace import audit_trace
from vhsm.audit.transcript import parse_lines
from vhsm.backend import (
    EPOLLIN,
    IMPLEMENTED_PROTOCOL_FEATURES,
    SPLIT_RING_FEATURES,
    VhostUserBackend,
    drain,
)
from vhsm.errors import BackendError
from vhsm.wire import BlkFeature, NetFeature, VirtioFeature
from vhsm.wire.enums import MAX_QUEUE_SIZE

if TYPE_CHECKING:
    from vhsm.daemon import VhostUserDaemon
    from vhsm.vring import VringT

FRONTEND_DEVICES = ("blk", "generic", "net", "rng")
#: Size of the scratch image `--device blk` serves when no file is named.
SCRATCH_IMAGE_SIZE = 64 << 20


class GenericBackend(VhostUserBackend):
    """A device of no particular type that accepts whatever a front-end sets up.

    It offers the ring features, logging and the protocol features a front-end
    may want, a zeroed config space, and completes every buffer it is given
    with length 0, so a front-end gets as far as it can.
    """

    def __init__(self, queues: int = 8, config_size: int = 256) -> None:
        self._queues = queues
        self._config = bytearray(config_size)

    def num_queues(self) -> int:
        """As many rings as a multi-queue front-end may use."""
        return self._queues

    def max_queue_size(self) -> int:
        """The largest split ring."""
        return MAX_QUEUE_SIZE

    def features(self) -> int:
        """Ring features, LOG_ALL and VHOST_USER_F_PROTOCOL_FEATURES."""
        return SPLIT_RING_FEATURES | int(VirtioFeature.LOG_ALL)

    def protocol_features(self) -> int:
        """Every protocol feature the vhsm runtime implements."""
        return IMPLEMENTED_PROTOCOL_FEATURES

    def get_config(self, offset: int, size: int) -> bytes:
        """Zeros (or what the front-end wrote)."""
        return bytes((self._config + bytes(offset + size))[offset : offset + size])

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """Keep what the front-end writes."""
        end = offset + len(data)
        if end > len(self._config):
            self._config += bytes(end - len(self._config))
        self._config[offset:end] = data

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        """Complete every available buffer with length 0."""
        if evset != EPOLLIN or not 0 <= device_event < len(vrings):
            raise BackendError(f"generic: unexpected event {device_event} ({evset:#x})")
        drain(vrings[device_event], lambda chain: 0)


def make_device(
    device: str, image: str | None = None
) -> tuple[VhostUserBackend, Callable[[], None]]:
    """The back-end for `device` and a function that releases what it holds."""
    if device == "rng":
        from vhsm.devices.rng import RngBackend

        return RngBackend(), lambda: None
    if device == "net":
        import importlib

        net = importlib.import_module("vhsm.devices.net")
        backend: VhostUserBackend = net.NetBackend(mode="loopback", queue_pairs=1)
        return backend, lambda: None
    if device == "blk":
        from vhsm.devices.blk import BlkBackend

        scratch: str | None = None
        if image is None:
            fd, scratch = tempfile.mkstemp(prefix="vhsm-audit-", suffix=".img")
            os.ftruncate(fd, SCRATCH_IMAGE_SIZE)
            os.close(fd)
            image = scratch
        blk = BlkBackend(image)

        def release() -> None:
            blk.close()
            if scratch is not None:
                with contextlib.suppress(OSError):
                    os.unlink(scratch)

        return blk, release
    if device == "generic":
        return GenericBackend(), lambda: None
    raise ValueError(f"unknown device {device!r}")


#: Requests that start a ring: a session without one never ran the device.
_RING_STARTS = frozenset({"SET_VRING_KICK", "VRING_KICK"})


def cut_short(records: Sequence[dict[str, Any]]) -> list[str]:
    """Why each connection the back-end (or the relay) ended is not a complete audit.

    In this mode the back-end is vhsm's own permissive device: when it closes a
    connection, it refused something, and what the front-end would have sent
    afterwards was never seen. A front-end closing its connection is a normal end.
    """
    out = []
    for line in records:
        if line.get("event") != "close" or "channel" in line:
            continue
        by, why = line.get("by"), str(line.get("why", ""))
        if by == "F" or (by == "relay" and why == "relay stopped"):
            continue
        conn = line.get("conn")
        sent = [r for r in records if r.get("conn") == conn and r.get("dir") == "F>B"]
        ran = any(r.get("name") in _RING_STARTS for r in sent)
        who = "the back-end" if by == "B" else "the relay"
        out.append(
            f"connection {conn}: {who} closed it ({why}) after {len(sent)} front-end "
            f"messages, {'while the device ran' if ran else 'before any ring started'}"
        )
    return out


DEVICE_FEATURE_ENUMS = {"blk": (BlkFeature,), "net": (NetFeature,)}


class FrontendAudit:
    """A daemon behind a recording relay at `listen`; `report()` audits the transcript.

    Args:
        listen: where the front-end connects.
        device: rng, blk, net or generic.
        image: the disk image for blk (default: a scratch file).
        once: end after the first front-end connection closes.
        record: also write the transcript to this file.
        on_event: called with each relay event line (open, close) as it happens.
    """

    def __init__(
        self,
        listen: str | os.PathLike[str],
        device: str = "generic",
        *,
        image: str | None = None,
        once: bool = False,
        record: str | os.PathLike[str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        from vhsm.daemon import Listener, VhostUserDaemon

        self.device = device
        self.listen = Path(listen)
        self.backend, self._release = make_device(device, image)
        self._dir = Path(tempfile.mkdtemp(prefix="vhsm-audit-"))
        self.daemon: VhostUserDaemon = VhostUserDaemon(f"audit-{device}", self.backend)
        self.daemon.start(Listener(self._dir / "backend.sock"))
        self.relay = Relay(
            self.listen,
            self._dir / "backend.sock",
            record,
            once=once,
            device_features=DEVICE_FEATURE_ENUMS.get(device, ()),
        )
        if on_event is not None:
            callback = on_event
            self.relay.recorder.listeners.append(
                lambda line: callback(line) if "event" in line else None
            )
        self._stopped = threading.Event()

    def start(self) -> None:
        """Start listening for the front-end."""
        self.relay.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the relay ended (with `once`); True if it did."""
        return self.relay.wait(timeout)

    def stop(self) -> None:
        """Stop relay and daemon, release the device (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.relay.stop("audit finished")
        self.daemon.stop()
        self._release()
        shutil.rmtree(self._dir, ignore_errors=True)

    def report(self) -> Report:
        """Audit everything recorded so far; a session its back-end cut short is no pass."""
        records = list(self.relay.records)
        lines = [json.dumps(line) for line in records]
        title = f"front-end connecting to {self.listen} (device {self.device})"
        report = audit_trace(parse_lines(lines, str(self.listen)), title)
        report.incomplete.extend(cut_short(records))
        return report

    def __enter__(self) -> FrontendAudit:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["FRONTEND_DEVICES", "FrontendAudit", "GenericBackend", "cut_short", "make_device"]
