"""Transcripts: the JSON-lines recordings of vhost-user sessions (tests/data/README.md).

Reading a transcript back gives `TraceEntry` objects; `replay_fds` makes fresh
file descriptors for a recorded message (the fds themselves are never
recorded), so the message can go through the same `Session` as a live one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs

from vhsm.errors import VhsmError
from vhsm.wire import Channel, FrontendReq, Message
from vhsm.wire.jsonconv import RecordError, record_to_message

#: Requests whose recorded fds are shared memory (the rest are eventfds or sockets).
_MEMORY_FDS = {
    FrontendReq.SET_MEM_TABLE,
    FrontendReq.ADD_MEM_REG,
    FrontendReq.SET_LOG_BASE,
    FrontendReq.SET_INFLIGHT_FD,
}


@attrs.frozen
class TraceEntry:
    """One line of a transcript: a message (with its direction) or a relay event."""

    index: int
    t: float
    line: dict[str, Any]
    message: Message | None = None

    @property
    def direction(self) -> str:
        """``F>B`` (front-end to back-end), ``B>F``, or ``""`` for relay events."""
        return str(self.line.get("dir", ""))

    @property
    def event(self) -> str | None:
        """The relay event (listen, open, close, exit) or None for messages."""
        return self.line.get("event")

    @property
    def nfds(self) -> int:
        """How many fds travelled with the message."""
        return int(self.line.get("nfds", 0))

    @property
    def channel(self) -> Channel:
        """The socket the message travelled on."""
        return Channel(self.line.get("channel", "main"))


def parse_lines(lines: Iterable[str], source: str = "<transcript>") -> list[TraceEntry]:
    """Parse transcript lines; a line that is not a valid record is a one-line error."""
    entries: list[TraceEntry] = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VhsmError(f"{source}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(line, dict):
            raise VhsmError(f"{source}:{number}: a record must be a JSON object")
        message = None
        if "dir" in line:
            try:
                message = record_to_message(line)
            except RecordError as exc:
                raise VhsmError(f"{source}:{number}: {exc}") from None
        entries.append(TraceEntry(len(entries), float(line.get("t", 0.0)), line, message))
    return entries


def load_transcript(path: str | Path) -> list[TraceEntry]:
    """Read a transcript file."""
    try:
        with Path(path).open(encoding="utf-8") as handle:
            return parse_lines(handle, str(path))
    except OSError as exc:
        raise VhsmError(f"cannot read transcript {path}: {exc.strerror}") from None


def replay_fds(entry: TraceEntry) -> tuple[int, ...]:
    """Fresh stand-in fds for a recorded message: memfds for memory, eventfds otherwise."""
    if entry.message is None:
        return ()
    memory = entry.message.request in _MEMORY_FDS and entry.channel is Channel.MAIN
    return tuple(
        os.memfd_create("vhsm-replay", os.MFD_CLOEXEC) if memory else os.eventfd(0, os.EFD_CLOEXEC)
        for _ in range(entry.nfds)
    )


def with_fds(entry: TraceEntry) -> Message:
    """The entry's message carrying fresh fds (the caller owns them)."""
    if entry.message is None:
        raise VhsmError(f"transcript entry {entry.index} is not a message")
    if entry.message.error is not None:
        return entry.message
    return attrs.evolve(entry.message, fds=replay_fds(entry))


def messages(entries: Iterable[TraceEntry], direction: str) -> Iterator[TraceEntry]:
    """The message entries travelling in `direction`."""
    return (e for e in entries if e.message is not None and e.direction == direction)
