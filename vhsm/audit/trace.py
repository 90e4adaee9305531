"""`vhsm audit trace`: replay a transcript through the runtime's own machines.

The front-end's requests go through a `Session` in observer mode (findings
collected, never raised) whose back-end stub offers exactly what the recorded
back-end offered; the back-end's replies and back-end-channel requests are
checked against the catalogue and the state the session machine reached.
"""

from __future__ import annotations

from collections.abc import Sequence

from vhsm.audit.report import AuditFinding, Report
from vhsm.audit.transcript import TraceEntry, with_fds
from vhsm.backend import VhostUserBackend
from vhsm.session import Session, SessionState
from vhsm.session.connection import Connection
from vhsm.session.shadow import ShadowDataPlane
from vhsm.wire import (
    Channel,
    FrontendReq,
    ProtocolFeature,
    VhostUserConfig,
    request_spec,
)
from vhsm.wire.enums import ALL_PROTOCOL_FEATURES, DEFAULT_MAX_MEM_SLOTS, MAX_QUEUE_SIZE

_ALL_BITS = (1 << 64) - 1


class RecordedBackend(VhostUserBackend):
    """A back-end stub that offers what the recorded back-end answered."""

    def __init__(self, entries: Sequence[TraceEntry]) -> None:
        self._replies = {
            e.message.name: e.message
            for e in reversed(entries)
            if e.message is not None and e.direction == "B>F" and e.message.is_reply
        }
        rings = [
            int(getattr(e.message.payload, "index", 0))
            for e in entries
            if e.message is not None
            and e.direction == "F>B"
            and e.message.name.startswith(("SET_VRING_", "GET_VRING_"))
            and e.message.payload is not None
        ]
        self._queues = max(rings, default=0) + 1

    def _u64(self, name: str, default: int) -> int:
        reply = self._replies.get(name)
        return int(getattr(reply.payload, "value", default)) if reply is not None else default

    def num_queues(self) -> int:
        """Rings used in the transcript (or what GET_QUEUE_NUM answered, if more)."""
        return max(self._queues, self._u64("GET_QUEUE_NUM", 0))

    def queue_num(self) -> int:
        """The recorded GET_QUEUE_NUM answer."""
        return self._u64("GET_QUEUE_NUM", self._queues)

    def max_queue_size(self) -> int:
        """Any valid ring size is accepted: the recorded back-end decided."""
        return MAX_QUEUE_SIZE

    def max_mem_slots(self) -> int:
        """The recorded GET_MAX_MEM_SLOTS answer."""
        return self._u64("GET_MAX_MEM_SLOTS", DEFAULT_MAX_MEM_SLOTS)

    def features(self) -> int:
        """The recorded GET_FEATURES answer (every bit when none was recorded)."""
        return self._u64("GET_FEATURES", _ALL_BITS)

    def protocol_features(self) -> int:
        """The recorded GET_PROTOCOL_FEATURES answer (every bit when none was recorded)."""
        return self._u64("GET_PROTOCOL_FEATURES", ALL_PROTOCOL_FEATURES)

    def get_config(self, offset: int, size: int) -> bytes:
        """The recorded config space bytes (zeros where none were recorded)."""
        reply = self._replies.get("GET_CONFIG")
        payload = reply.payload if reply is not None else None
        data = bytes(payload.payload) if isinstance(payload, VhostUserConfig) else b""
        return (data + bytes(offset + size))[offset : offset + size]

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """Writes are the recorded back-end's business."""


def replay_session(entries: Sequence[TraceEntry]) -> Connection:
    """An observing session over the recorded back-end's answers and a shadow data plane.

    The shadow keeps the memory table's descriptors, so what the daemon's data plane
    refuses (overlapping or unknown regions, ring addresses outside the table) is
    flagged here with the same rule ids.
    """
    shadow = ShadowDataPlane(lambda: connection.session.acked_protocol_features)
    connection = Connection(RecordedBackend(entries), shadow, observer=True)
    return connection


class TraceAuditor:
    """Checks one transcript; `run()` returns the report."""

    def __init__(self, entries: Sequence[TraceEntry], title: str) -> None:
        self.entries = list(entries)
        self.report = Report(title)
        self.session: Session | None = None

    def run(self) -> Report:
        """Walk every entry, connection by connection."""
        conns = sorted({e.line.get("conn", 0) for e in self.entries if e.message is not None})
        for conn in conns:
            entries = [e for e in self.entries if e.line.get("conn", 0) == conn]
            self.connection = replay_session(entries)
            self.session = self.connection.session
            for position, entry in enumerate(entries):
                if entry.event == "raw" and entry.line.get("rule"):
                    side = "front-end" if entry.line.get("direction") == "F>B" else "back-end"
                    why = str(entry.line.get("why", "unframed bytes"))
                    self._add(entry, str(entry.line["rule"]), why, side)
                if entry.message is None:
                    continue
                if entry.direction == "F>B" and entry.channel is Channel.MAIN:
                    self._front_end_request(entry, entries[position + 1 :])
                elif entry.channel is Channel.BACKEND and not entry.message.is_reply:
                    self._back_end_request(entry)
                elif entry.direction == "B>F" and not entry.message.is_reply:
                    self._add(
                        entry,
                        "VU-FRAME-003",
                        "back-end sent a request on the main channel",
                        "back-end",
                    )
        return self.report

    # --- front-end side ---------------------------------------------------------------
    def _front_end_request(self, entry: TraceEntry, rest: Sequence[TraceEntry]) -> None:
        assert self.session is not None and entry.message is not None
        session, msg = self.session, entry.message
        state = session.state.name
        before = len(session.findings)
        self.connection.handle(with_fds(entry))
        for finding in session.findings[before:]:
            self.report.findings.append(
                AuditFinding(
                    finding.rule_id,
                    finding.detail,
                    "front-end",
                    entry.index,
                    entry.t,
                    finding.state,
                    msg.name,
                )
            )
        self._reply_to(entry, rest, state)

    def _reply_to(self, entry: TraceEntry, rest: Sequence[TraceEntry], state: str) -> None:
        assert self.session is not None and entry.message is not None
        msg = entry.message
        spec = request_spec(msg.request)
        if spec is None or msg.error is not None:
            return
        reply = next((e for e in rest if e.message is not None and e.channel is Channel.MAIN), None)
        paired = (
            reply is not None
            and reply.direction == "B>F"
            and reply.message is not None
            and reply.message.is_reply
            and reply.message.request == msg.request
        )
        if msg.request == FrontendReq.SET_LOG_BASE:
            required = bool(self.session.acked_protocol_features & ProtocolFeature.LOG_SHMFD)
        else:
            required = spec.reply == "always" or (msg.need_reply and self.session.reply_ack)
        optional = msg.need_reply and not required
        closed = reply is None
        if required and not paired and reply is not None and reply.direction == "F>B":
            late = self._late_reply(msg.request, rest)
            if spec.reply == "always" and late is not None:
                self._add(
                    reply,
                    "VU-REQ-003",
                    f"{msg.name} sent before the reply to the previous {msg.name} arrived",
                    "front-end",
                    state,
                )
                self._check_reply(entry, late, state)
                return
        if required and not paired and not closed:
            self._add(
                entry,
                "VU-FRAME-010",
                f"{msg.name} requires a reply; none was sent",
                "back-end",
                state,
            )
        if paired and not required and not optional:
            assert reply is not None
            self._add(
                reply, "VU-FRAME-010", f"{msg.name} takes no reply; one was sent", "back-end", state
            )
        if paired:
            assert reply is not None
            self._check_reply(entry, reply, state)

    @staticmethod
    def _late_reply(request: int, rest: Sequence[TraceEntry]) -> TraceEntry | None:
        """The first main-channel reply to `request` further on, if any."""
        for later in rest:
            msg = later.message
            if msg is not None and later.channel is Channel.MAIN and later.direction == "B>F":
                return later if msg.is_reply and msg.request == request else None
        return None

    def _check_reply(self, request: TraceEntry, reply: TraceEntry, state: str) -> None:
        assert request.message is not None and reply.message is not None
        answer = reply.message
        if answer.flags != 0x5:
            self._add(
                reply,
                "VU-FRAME-009",
                f"reply flags {answer.flags:#x}, expected 0x5",
                "back-end",
                state,
            )
        if answer.error is not None:
            self._add(reply, answer.error.rule_id, answer.error.detail, "back-end", state)
            return
        if request.message.request == FrontendReq.GET_CONFIG:
            asked = getattr(request.message.payload, "size", 0)
            got = getattr(answer.payload, "size", 0) if answer.payload is not None else 0
            if answer.payload is not None and got != asked:
                self._add(
                    reply,
                    "VU-PAY-009",
                    f"GET_CONFIG reply size {got}, asked {asked}",
                    "back-end",
                    state,
                )
        if request.message.request == FrontendReq.SET_DEVICE_STATE_FD:
            value = int(getattr(answer.payload, "value", 0))
            if value & 0xFF and reply.nfds:
                self._add(reply, "VU-PAY-008", "error reply carries an fd", "back-end", state)

    # --- back-end side ------------------------------------------------------------------
    def _back_end_request(self, entry: TraceEntry) -> None:
        assert self.session is not None and entry.message is not None
        msg = entry.message
        state = self.session.state.name
        if msg.error is not None:
            self._add(entry, msg.error.rule_id, msg.error.detail, "back-end", state)
            return
        spec = request_spec(msg.request, Channel.BACKEND)
        gate = spec.gate_protocol if spec is not None else None
        if gate is not None and not self.session.acked_protocol_features & gate:
            self._add(entry, "VU-NEG-002", f"needs protocol feature {gate.name}", "back-end", state)
        if self.session.state is not SessionState.RUNNING:
            self._add(
                entry, "VU-STATE-007", "back-end channel message while suspended", "back-end", state
            )

    def _add(
        self, entry: TraceEntry, rule_id: str, detail: str, side: str, state: str | None = None
    ) -> None:
        name = entry.message.name if entry.message is not None else "-"
        state = state or (self.session.state.name if self.session is not None else "-")
        self.report.findings.append(
            AuditFinding(rule_id, detail, side, entry.index, entry.t, state, name)
        )


def audit_trace(entries: Sequence[TraceEntry], title: str = "trace") -> Report:
    """Audit a parsed transcript."""
    return TraceAuditor(entries, title).run()
