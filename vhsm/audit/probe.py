"""The machinery of the active back-end suite: connections, set-up levels, and the judge.

`SuiteCore` opens connections with vhsm's front-end driver (retrying while a
back-end is still busy with the previous one), brings them to the state a case
needs, and judges what the back-end does with a bad input: a NACK or a clean
close is a rejection, an ack of 0 or a session that carries on is acceptance,
silence is a wedge, and a back-end that serves no new connection has crashed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from vhsm.audit.report import AuditFinding, CaseResult, Outcome
from vhsm.errors import FramingError, VhsmError
from vhsm.frontend import (
    Frontend,
    connect_unix,
)
from vhsm.transport import PeerClosed
from vhsm.wire import (
    FrontendReq,
    HeaderFlags,
    Message,
    Payload,
    ProtocolFeature,
    VhostUserU64,
    encode,
    make_request,
    request_spec,
)
from vhsm.wire.framing import HEADER

DEVICES = ("blk", "generic", "net", "rng", "vsock")
#: Rings each device type is started with.
DEVICE_QUEUES: dict[str, tuple[int, ...]] = {
    "blk": (0,),
    "generic": (0,),
    "net": (0, 1),
    "rng": (0,),
    "vsock": (0, 1),
}
RING_SIZE = 128
#: A ring index no reference device has (and the largest the fd requests can name).
BAD_INDEX = 255
#: A user address far from the driver's memory (vhsm.frontend.memory.UVA_BASE is low).
FOREIGN_UVA = 0x7F00_DEAD_0000
Progress = Callable[[int, int, CaseResult], None]


class Skip(Exception):
    """The back-end does not offer what the case needs."""


@attrs.frozen
class Case:
    """One scenario or bad input: the rule it judges, a readable title, and its code."""

    rule_id: str
    title: str
    run: Callable[[], tuple[Outcome, str]]

    @property
    def name(self) -> str:
        """The case's name in reports: its rule id, then its title."""
        return f"{self.rule_id} {self.title}"


class SuiteCore:
    """Connections to the back-end at `path` and the judge of its answers.

    Args:
        path: the back-end's socket.
        device: the device type (data round trip and ring set-up), or "generic".
        timeout: seconds to wait for an answer before calling the back-end wedged.
        progress: called after each case with (number, total, result).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "generic",
        *,
        timeout: float = 2.0,
        progress: Progress | None = None,
    ) -> None:
        if device not in DEVICES:
            raise VhsmError(f"unknown device type {device!r} (one of {', '.join(DEVICES)})")
        self.path = Path(path)
        self.device = device
        self.timeout = timeout
        self.progress = progress
        self.queues = DEVICE_QUEUES[device]
        self.offered = 0
        self.offered_protocol = 0
        self._open: list[Frontend] = []
        #: Rule breaches seen on the way that are not the case's own rule.
        self.findings: list[AuditFinding] = []

    def _close_all(self) -> None:
        for fe in self._open:
            with contextlib.suppress(Exception):
                fe.close()
        self._open.clear()

    # --- connections ----------------------------------------------------------------
    def _connect(self, deadline: float | None = None) -> Frontend:
        """A new connection whose GET_FEATURES was answered (retrying a busy back-end)."""
        end = time.monotonic() + (self.timeout if deadline is None else deadline)
        while True:
            fe = Frontend(
                connect_unix(self.path, retry_for=max(0.0, end - time.monotonic())),
                path=self.path,
                timeout=self.timeout,
            )
            try:
                fe.get_features()
            except (PeerClosed, ConnectionError) as exc:
                fe.close()
                if time.monotonic() >= end:
                    raise VhsmError(f"the back-end closes every new connection: {exc}") from None
                time.sleep(0.02)
                continue
            except BaseException:
                fe.close()
                raise
            self._open.append(fe)
            return fe

    def _alive(self) -> tuple[bool, str]:
        """Whether the back-end serves a new connection (GET_FEATURES answered)."""
        try:
            fe = self._connect(self.timeout * 2)
        except TimeoutError:
            return False, "a new connection got no answer to GET_FEATURES"
        except (OSError, VhsmError) as exc:
            return False, f"no new connection served: {exc}"
        with contextlib.suppress(Exception):
            fe.close()
        return True, ""

    def _after_close(self, what: str) -> tuple[Outcome, str]:
        ok, why = self._alive()
        if ok:
            return "rejected-cleanly", f"{what}; a new connection is served"
        return "crashed", f"{what}; {why}"

    def _negotiated(
        self,
        *,
        protocol: int | None = None,
        features: int | None = None,
        backend_req: bool = False,
        owner_first: bool = False,
    ) -> Frontend:
        fe = self._connect()
        fe.negotiate(
            features,
            protocol,
            backend_req=backend_req,
            owner_first=owner_first,
        )
        return fe

    def _with_memory(self, **kwargs: bool) -> Frontend:
        fe = self._negotiated(**kwargs)
        fe.set_mem_table()
        return fe

    def _started(self, **options: object) -> Frontend:
        fe = self._connect()
        fe.start(list(self.queues), RING_SIZE, **options)  # type: ignore[arg-type]
        fe.get_features()  # a barrier: everything before it was processed (QEMU does the same)
        return fe

    def _need_protocol(self, feature: ProtocolFeature) -> None:
        if not self.offered_protocol & feature:
            raise Skip(f"protocol feature {feature.name} not offered")

    # --- judging bad inputs ------------------------------------------------------------
    def _judge(
        self,
        fe: Frontend,
        msg: Message | bytes,
        fds: Sequence[int] = (),
        *,
        rejected: Callable[[Message], bool] | None = None,
    ) -> tuple[Outcome, str]:
        """Send a bad message and judge what the back-end does with it.

        A request with NEED_REPLY under REPLY_ACK must be answered (NACK = clean
        rejection); otherwise a GET_FEATURES probe follows and any answer means
        the bad input was taken. `rejected` recognises an explicit reply that
        signals an error (e.g. an empty GET_CONFIG reply).
        """
        data = msg if isinstance(msg, bytes) else encode(msg)
        request, flags, _ = HEADER.unpack_from(data) if len(data) >= 12 else (0, 0, 0)
        spec = request_spec(request)
        acked = (
            fe.reply_ack
            and bool(flags & HeaderFlags.NEED_REPLY)
            and spec is not None
            and spec.reply == "ack"
        )
        try:
            fe.send_raw(data, fds)
            if not acked:
                fe.send(make_request(FrontendReq.GET_FEATURES))
            answer = fe.recv(self.timeout)
        except TimeoutError:
            return "wedged", f"no answer within {self.timeout:g}s"
        except (PeerClosed, ConnectionError, FramingError):
            return self._after_close("connection closed")
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for fd in answer.fds:
            os.close(fd)
        if answer.is_reply and answer.request == request and request != FrontendReq.GET_FEATURES:
            if rejected is not None and rejected(answer):
                return "rejected-cleanly", "error reply"
            value = _ack_value(answer)
            ack_type = spec is None or spec.reply == "ack"
            if ack_type and value:
                return "rejected-cleanly", f"NACK ({value})"
            said = f"answered {answer.name} with {_describe(answer)}"
            lied = ack_type and value == 0
            return self._follow_up(fe, answer.name, said, probe_sent=not acked, lied=lied)
        if answer.is_reply and answer.request == FrontendReq.GET_FEATURES:
            return "fail", "accepted: the session carried on (probe answered)"
        return "fail", f"unexpected {answer.name} (flags {answer.flags:#x})"

    def _follow_up(
        self, fe: Frontend, name: str, said: str, *, probe_sent: bool, lied: bool
    ) -> tuple[Outcome, str]:
        """A bad input was answered as if valid: did the back-end carry on, or close after all?"""
        try:
            if not probe_sent:
                fe.send(make_request(FrontendReq.GET_FEATURES))
            probe = fe.recv(self.timeout)
        except TimeoutError:
            return "wedged", f"{said}, then no answer to GET_FEATURES"
        except (PeerClosed, ConnectionError, FramingError):
            if lied:
                self.findings.append(
                    AuditFinding(
                        "VU-REQ-002",
                        f"{said} (success) for a request it then rejected by closing "
                        "the connection",
                        side="back-end",
                        request=name,
                    )
                )
            return self._after_close(f"{said}, then closed")
        for fd in probe.fds:
            os.close(fd)
        return "fail", f"accepted: {said} and carried on"

    def _bad(
        self,
        fe: Frontend,
        req: FrontendReq,
        payload: Payload | bytes | None = None,
        fds: Sequence[int] = (),
        *,
        flags: int | None = None,
        rejected: Callable[[Message], bool] | None = None,
    ) -> tuple[Outcome, str]:
        """Send request `req` with a bad payload (or raw body bytes), NEED_REPLY when acked."""
        if flags is None:
            flags = HeaderFlags.VERSION_1 | (HeaderFlags.NEED_REPLY if fe.reply_ack else 0)
        body = payload if isinstance(payload, bytes) else b""
        if payload is not None and not isinstance(payload, bytes):
            body = payload.to_bytes()
        data = HEADER.pack(int(req), int(flags), len(body)) + body
        return self._judge(fe, data, fds, rejected=rejected)


def _ack_value(answer: Message) -> int | None:
    """The u64 of an ack (decoded by hand for request codes the catalogue does not know)."""
    if isinstance(answer.payload, VhostUserU64):
        return int(answer.payload.value)
    body = answer.raw[HEADER.size :]
    if answer.error is not None and answer.error.rule_id == "VU-FRAME-004" and len(body) == 8:
        return int.from_bytes(body, "little")
    return None


def _describe(answer: Message) -> str:
    if answer.error is not None:
        return f"a malformed reply ({answer.error.rule_id})"
    if isinstance(answer.payload, VhostUserU64):
        return f"u64 {answer.payload.value}"
    return type(answer.payload).__name__ if answer.payload is not None else "an empty payload"
