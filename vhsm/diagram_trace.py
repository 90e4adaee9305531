"""A recorded session drawn as a mermaid sequence diagram.

The transcript (tests/data/README.md) is replayed through `Session` in
observer mode, as the trace auditor does, so each front-end message is
annotated with the state changes it makes and the rules it breaks.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence

from vhsm.audit.trace import replay_session
from vhsm.audit.transcript import TraceEntry, with_fds
from vhsm.diagram_overview import front_matter_title
from vhsm.errors import VhsmError
from vhsm.wire import (
    Message,
    ProtocolFeature,
    VhostUserConfig,
    VhostUserMemory,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringFd,
    VhostUserVringState,
    VirtioFeature,
    feature_names,
)

#: Requests whose u64 (or reply u64) is a feature word, and the bits it names.
FEATURE_WORDS: dict[str, type[VirtioFeature] | type[ProtocolFeature]] = {
    "GET_FEATURES": VirtioFeature,
    "SET_FEATURES": VirtioFeature,
    "GET_PROTOCOL_FEATURES": ProtocolFeature,
    "SET_PROTOCOL_FEATURES": ProtocolFeature,
}


def _text(value: str) -> str:
    """Make text safe inside a mermaid message or note (no statement breaks or markup)."""
    for old, new in (("\n", " "), (";", ","), ("#", "no."), ("<", "\u2039"), (">", "\u203a")):
        value = value.replace(old, new)
    return value


def _number(value: int) -> str:
    return str(value) if value < 4096 else hex(value)


def describe_message(msg: Message, nfds: int) -> str:
    """A message as a sequence-diagram arrow label: name, key payload fields, fds, flags."""
    payload = msg.payload
    parts = [msg.name]
    if isinstance(payload, VhostUserU64) and msg.name in FEATURE_WORDS:
        names = feature_names(payload.value, FEATURE_WORDS[msg.name])
        parts.append(" | ".join(names) if names else "0")
    elif isinstance(payload, VhostUserU64):
        parts.append(_number(payload.value))
    elif isinstance(payload, VhostUserVringState):
        parts.append(f"ring {payload.index} num {payload.num}")
    elif isinstance(payload, VhostUserVringFd):
        parts.append(f"ring {payload.index}" + (" no fd" if payload.nofd else ""))
    elif isinstance(payload, VhostUserVringAddr):
        parts.append(f"ring {payload.index}")
    elif isinstance(payload, VhostUserMemory):
        count = len(payload.regions)
        parts.append(f"{count} region{'s' if count != 1 else ''}")
    elif isinstance(payload, VhostUserConfig):
        parts.append(f"offset {payload.offset} size {payload.size}")
    if nfds:
        parts.append(f"+{nfds} fd{'s' if nfds != 1 else ''}")
    if msg.need_reply:
        parts.append("(need reply)")
    if msg.error is not None:
        parts.append(f"(malformed, {msg.error.rule_id})")
    return _text(" ".join(parts))


def _state_name(state: object) -> str:
    return state.name if isinstance(state, enum.Enum) else str(state)


class _Replay:
    """One connection's replay: a Session in observer mode and the notes it produces."""

    def __init__(self, entries: Sequence[TraceEntry]) -> None:
        self.connection = replay_session(entries)
        self.session = self.connection.session
        self.changes: list[str] = []
        self.session.listeners.append(self._changed)

    def _changed(
        self, machine: str, index: int | None, old: object, new: object, trigger: str
    ) -> None:
        where = machine if index is None else f"ring {index}"
        self.changes.append(f"{where}: {_state_name(old)} → {_state_name(new)}")

    def initial(self) -> str:
        rings = self.session.num_queues
        ring_state = self.session.vring_state(0).name if rings else "-"
        plural = "s" if rings != 1 else ""
        return f"session {self.session.state.name}, {rings} ring{plural} {ring_state}"

    def feed(self, entry: TraceEntry) -> list[str]:
        """Replay one front-end message; return the notes (state changes, findings)."""
        self.changes = []
        before = len(self.session.findings)
        notes: list[str] = []
        try:
            self.connection.handle(with_fds(entry))
        except VhsmError as exc:
            notes.append(f"replay stopped on this message: {exc}")
        notes.extend(f"{f.rule_id}: {f.detail}" for f in self.session.findings[before:])
        return [*self.changes, *notes]


def trace_sequence(entries: Sequence[TraceEntry], title: str = "") -> str:
    """Render a transcript as a mermaid sequenceDiagram annotated with state changes."""
    lines = ["---", front_matter_title(_text(title)), "---"] if title else []
    lines += ["sequenceDiagram", "  participant F as front-end", "  participant B as back-end"]
    replays: dict[object, _Replay] = {}
    session_log = logging.getLogger("vhsm.session")
    level, session_log.level = session_log.level, logging.ERROR  # findings become notes
    try:
        for entry in entries:
            conn = entry.line.get("conn")
            if conn not in replays and (entry.event == "open" or entry.direction == "F>B"):
                replays[conn] = _Replay([e for e in entries if e.line.get("conn") == conn])
                lines.append(f"  Note over F,B: connection {conn} opened")
                lines.append(f"  Note over B: {replays[conn].initial()}")
            if entry.event == "close":
                by = {"F": "front-end", "B": "back-end"}.get(str(entry.line.get("by")), "?")
                why = f" ({entry.line['why']})" if entry.line.get("why") else ""
                lines.append(_text(f"  Note over F,B: connection {conn} closed by {by}{why}"))
            elif entry.message is not None and entry.direction in ("F>B", "B>F"):
                arrow = "->>" if entry.direction == "F>B" else "-->>"
                src, dst = ("F", "B") if entry.direction == "F>B" else ("B", "F")
                lines.append(f"  {src}{arrow}{dst}: {describe_message(entry.message, entry.nfds)}")
                if entry.direction == "F>B":
                    notes = replays[conn].feed(entry)
                    if notes:
                        lines.append(f"  Note over B: {'<br/>'.join(_text(n) for n in notes)}")
    finally:
        session_log.level = level
    return "\n".join(lines) + "\n"
