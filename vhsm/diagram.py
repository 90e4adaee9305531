"""Diagrams of the protocol machines and of recorded sessions.

State diagrams are drawn by `transitions.extensions.GraphMachine` over the
same YAML declaration the runtime uses (``specs/session.yaml``,
``specs/vring.yaml``): edges are labelled with the request name and its
named conditions, states carry their spec section, and the many internal
transitions (dest null) are listed inside their state instead of drawn as
self-loops. Output is deterministic: no active-state styling, declaration
order throughout.

`trace_sequence` draws a recorded session (a transcript, tests/data/README.md)
as a mermaid sequence diagram, replayed through `vhsm.session.Session` to
annotate each step with the state changes the machines make.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from transitions.extensions import GraphMachine, diagrams_mermaid

from vhsm.backend import DEFAULT_MAX_MEM_SLOTS, VhostUserBackend
from vhsm.errors import VhsmError
from vhsm.session import Session
from vhsm.session.machines import MachineSpec, load_machine_spec, transition_table
from vhsm.wire import (
    Message,
    VhostUserConfig,
    VhostUserMemory,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringFd,
    VhostUserVringState,
    VirtioFeature,
    decode_message,
)

#: Machines that can be drawn, in output order.
MACHINES: tuple[str, ...] = ("session", "vring")

#: Output formats and the file suffix each one is written with.
SUFFIXES: dict[str, str] = {"mermaid": "mmd", "dot": "dot", "svg": "svg", "png": "png"}

#: What ``--format all`` produces (what ``diagrams/`` holds).
ALL_FORMATS: tuple[str, ...] = ("mermaid", "dot", "svg")

#: Graph engines of `GraphMachine` we use; any other name would silently fall back to mermaid.
ENGINES: tuple[str, ...] = ("mermaid", "graphviz")

#: How to get Graphviz's `dot` program (svg/png rendering) on Debian and Ubuntu.
DOT_INSTALL_HINT = "apt-get install graphviz"

#: Marker carrying the digest of the dot source an SVG was rendered from.
SVG_SOURCE_MARKER = "vhsm-dot-source-sha256:"

#: Internal requests listed per line inside a state box (longer items get their own line).
_LINE_WIDTH = 56

# Only the default look: nothing marks an active or previous state.
_STYLE: dict[str, Any] = {
    "node": {
        "default": {
            "style": "rounded,filled",
            "shape": "rectangle",
            "fillcolor": "white",
            "color": "black",
            "peripheries": "1",
        }
    },
    "edge": {"default": {"color": "black"}},
    "graph": {"default": {"color": "black", "fillcolor": "white", "style": "solid"}},
}


def check_machine(name: str) -> list[str]:
    """Expand a machine name ("all" = every machine); a VhsmError names an unknown one."""
    if name == "all":
        return list(MACHINES)
    if name not in MACHINES:
        raise VhsmError(f"unknown machine {name!r} (choose {', '.join((*MACHINES, 'all'))})")
    return [name]


def check_format(name: str) -> list[str]:
    """Expand a format name ("all" = mermaid, dot, svg); a VhsmError names an unknown one."""
    if name == "all":
        return list(ALL_FORMATS)
    if name not in SUFFIXES:
        raise VhsmError(f"unknown format {name!r} (choose {', '.join((*SUFFIXES, 'all'))})")
    return [name]


def state_label(spec: MachineSpec, state: enum.Enum) -> str:
    """The state's title: its name and spec section, e.g. "RUNNING §7.4"."""
    section = spec.state_info[state.name].get("section")
    return f"{state.name} §{section}" if section else state.name


def request_label(trigger: str, conditions: Iterable[str] = ()) -> str:
    """A request as diagrams show it: upper-case name, then its named conditions."""
    names = list(conditions)
    return f"{trigger.upper()} [{' & '.join(names)}]" if names else trigger.upper()


def internal_requests(spec: MachineSpec) -> dict[str, list[str]]:
    """For each state, the requests it accepts without changing state, in declaration order.

    Only selector conditions (those without a rule id, which pick between
    transitions) are shown here; rule checks would bury the list.
    """
    inside: dict[str, list[str]] = {state.name: [] for state in spec.states}
    for declared in spec.transitions:
        if declared.get("dest") is not None:
            continue
        selectors = [
            name
            for name in declared.get("conditions", [])
            if spec.conditions[name].get("rule") is None
        ]
        label = request_label(declared["trigger"], selectors)
        for state in spec.sources(declared):
            if label not in inside[state.name]:
                inside[state.name].append(label)
    return inside


def wrap_items(items: Iterable[str], width: int = _LINE_WIDTH) -> list[str]:
    """Pack comma-separated items into lines of about `width` characters."""
    lines: list[str] = []
    current = ""
    for item in items:
        candidate = f"{current}, {item}" if current else item
        if current and len(candidate) > width:
            lines.append(current + ",")
            current = item
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def edge_table(spec: MachineSpec) -> list[dict[str, Any]]:
    """The state-changing transitions as `GraphMachine` keyword dicts, names kept as strings."""
    table = []
    for entry in transition_table(spec, None):
        if entry["dest"] is None:
            continue
        entry["label"] = entry["trigger"].upper()
        table.append(entry)
    return table


def machine_title(spec: MachineSpec) -> str:
    """The diagram title, e.g. "vhsm session machine (§7)"."""
    return f"vhsm {spec.name} machine (§{spec.section})" if spec.section else spec.name


class _MermaidGraph(diagrams_mermaid.Graph):
    """Mermaid engine: state titles plus description lines; a proper front-matter title."""

    def _add_nodes(self, states: list[dict[str, Any]], container: list[str]) -> None:
        details: dict[str, list[str]] = self.machine.vhsm_details
        for state in states:
            name = state["name"]
            container.append(f'state "{state.get("label", name)}" as {name}')
            container.extend(f"{name} : {line}" for line in details.get(name, []))

    def get_graph(self, title: str | None = None, roi_state: Any = None) -> Any:
        return super().get_graph(title=f"title: {title or self.machine.title}", roi_state=None)


class _DotGraph:
    """Graphviz engine mixin: internal requests in the state label, one edge label a line."""

    machine: Any

    if TYPE_CHECKING:

        def _transition_label(self, transition: dict[str, Any]) -> str: ...

    def _add_nodes(self, states: list[dict[str, Any]], container: Any) -> None:
        super()._add_nodes(states, container)  # type: ignore[misc]
        container.node("__initial__", label="", shape="point", width="0.15")
        container.edge("__initial__", self.machine.initial)

    def _add_edges(self, transitions: list[dict[str, Any]], container: Any) -> None:
        labels: dict[str, dict[str, list[str]]] = {}
        for transition in transitions:
            source = transition["source"]
            dest = transition.get("dest", source)
            labels.setdefault(source, {}).setdefault(dest, []).append(
                _dot_escape(self._transition_label(transition))
            )
        for source, dests in labels.items():
            for dest, lines in dests.items():
                container.edge(source, dest, label="\\n".join(lines))

    def _convert_state_attributes(self, state: dict[str, Any]) -> str:
        lines = self.machine.vhsm_details.get(state["name"], [])
        title = state.get("label", state["name"])
        if not lines:
            return str(title)
        body = "".join(f"{_dot_escape(line)}\\l" for line in lines)
        return f"{_dot_escape(title)}\\n\\n{body}"


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _graphviz_graph_cls() -> type:
    try:
        import graphviz  # noqa: F401
        from transitions.extensions import diagrams_graphviz
    except ImportError as exc:  # pragma: no cover - graphviz is a runtime dependency
        raise VhsmError(
            "the dot format needs the Python package 'graphviz': pip install graphviz"
        ) from exc
    return type("_VhsmDotGraph", (_DotGraph, diagrams_graphviz.Graph), {})


class DiagramMachine(GraphMachine):
    """A `GraphMachine` that only draws: no model, no callbacks, no active-state styling."""

    style_attributes = _STYLE
    machine_attributes = {"rankdir": "TB"}

    def __init__(self, spec: MachineSpec, engine: str) -> None:
        if engine not in ENGINES:
            raise VhsmError(f"unknown graph engine {engine!r} (choose {', '.join(ENGINES)})")
        self.vhsm_details = {
            state: wrap_items(items) for state, items in internal_requests(spec).items()
        }
        super().__init__(
            model=None,
            states=spec.states,
            initial=spec.initial,
            transitions=edge_table(spec),
            auto_transitions=False,
            send_event=True,
            title=machine_title(spec),
            show_conditions=True,
            graph_engine=cast(Literal["graphviz", "mermaid"], engine),
        )
        for state in spec.states:
            setattr(self.get_state(state), "label", state_label(spec, state))  # noqa: B010
        self._needs_update = True

    def _init_graphviz_engine(self, graph_engine: str) -> type:
        if graph_engine == "graphviz":
            return _graphviz_graph_cls()
        return _MermaidGraph

    def source(self) -> str:
        """The diagram text (mermaid or dot), ending with a newline."""
        graph = self.graph_cls(self)
        graph.reset_styling()
        drawn: Any = graph.get_graph()
        text: str = drawn.source
        lines = [line.rstrip() for line in text.splitlines()]
        return "\n".join(lines).rstrip("\n") + "\n"


def machine_source(name: str, engine: str) -> str:
    """Mermaid (`engine` "mermaid") or dot ("graphviz") text of one machine."""
    check_machine(name)
    return DiagramMachine(load_machine_spec(name), engine).source()


def dot_program() -> str:
    """Path of Graphviz's `dot`; a VhsmError says how to install it when missing."""
    path = shutil.which("dot")
    if path is None:
        raise VhsmError(
            "svg/png rendering needs Graphviz's `dot` program, not found on PATH: "
            f"install it with `{DOT_INSTALL_HINT}` (Debian/Ubuntu)"
        )
    return path


def dot_digest(dot_source: str) -> str:
    """SHA-256 of a dot source, recorded in the SVG rendered from it."""
    return hashlib.sha256(dot_source.encode("utf-8")).hexdigest()


def render_dot(dot_source: str, fmt: str) -> bytes:
    """Render dot text to "svg" or "png" with the `dot` program.

    SVG output gets a comment with the digest of its dot source, so a test can
    tell whether a committed SVG is current without depending on dot's version.
    """
    if fmt not in ("svg", "png"):
        raise VhsmError(f"dot renders svg or png, not {fmt!r}")
    result = subprocess.run(
        [dot_program(), f"-T{fmt}"],
        input=dot_source.encode("utf-8"),
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        detail = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise VhsmError(f"dot -T{fmt} failed: {detail[-1] if detail else result.returncode}")
    if fmt == "png":
        return result.stdout
    svg = result.stdout.decode("utf-8")
    marker = f"<!-- {SVG_SOURCE_MARKER} {dot_digest(dot_source)} -->\n"
    head, sep, rest = svg.partition("?>\n")
    svg = head + sep + marker + rest if sep else marker + svg
    return svg.encode("utf-8")


def svg_source_digest(svg: str) -> str | None:
    """The dot-source digest recorded in an SVG by `render_dot`, or None."""
    start = svg.find(SVG_SOURCE_MARKER)
    if start < 0:
        return None
    return svg[start + len(SVG_SOURCE_MARKER) :].split()[0]


def render(name: str, fmt: str) -> bytes:
    """One machine in one format ("mermaid", "dot", "svg" or "png") as file contents."""
    if fmt not in SUFFIXES:
        check_format(fmt)
        raise VhsmError(f"render one format at a time, not {fmt!r}")
    if fmt == "mermaid":
        return machine_source(name, "mermaid").encode("utf-8")
    dot = machine_source(name, "graphviz")
    if fmt == "dot":
        return dot.encode("utf-8")
    return render_dot(dot, fmt)


def file_name(machine: str, fmt: str) -> str:
    """The file a machine's diagram is written to, e.g. "session.mmd"."""
    return f"{machine}.{SUFFIXES[fmt]}"


# --- sequence diagrams of recorded sessions ------------------------------------------------

#: Requests whose fds are shared memory (a replay substitutes memfds; the rest get eventfds).
_MEMORY_FD_REQUESTS = frozenset(
    {"SET_MEM_TABLE", "ADD_MEM_REG", "REM_MEM_REG", "SET_LOG_BASE", "SET_INFLIGHT_FD"}
)


def load_transcript(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a transcript (one JSON object per line, tests/data/README.md)."""
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise VhsmError(f"{path}:{number}: not JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise VhsmError(f"{path}:{number}: not a JSON object")
                records.append(record)
    except OSError as exc:
        raise VhsmError(f"cannot read transcript {path}: {exc.strerror}") from None
    return records


def _record_message(record: dict[str, Any], fds: tuple[int, ...] = ()) -> Message:
    """Decode a transcript message line (with substitute fds) into a `Message`."""
    try:
        request = int(record["req"])
        flags = int(str(record["flags"]), 16)
        payload = bytes.fromhex(record.get("payload", ""))
        nfds = int(record.get("nfds", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise VhsmError(f"transcript line {record!r} is not a message: {exc}") from None
    raw = struct.pack("<III", request, flags, len(payload)) + payload
    return decode_message(request, flags, raw, fds=fds, nfds=None if fds else nfds)


def _fresh_fds(name: str, count: int) -> tuple[int, ...]:
    if name in _MEMORY_FD_REQUESTS:
        return tuple(os.memfd_create(f"vhsm-replay-{name}", os.MFD_CLOEXEC) for _ in range(count))
    return tuple(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(count))


def _u64(record: dict[str, Any]) -> int:
    return int.from_bytes(bytes.fromhex(record.get("payload", ""))[:8], "little")


class ReplayBackend(VhostUserBackend):
    """A back-end stub offering what the recorded back-end answered."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        replies: dict[str, int] = {}
        acked: dict[str, int] = {"SET_FEATURES": 0, "SET_PROTOCOL_FEATURES": 0}
        rings = 0
        for record in records:
            name = record.get("name", "")
            if record.get("dir") == "B>F" and name not in replies:
                replies[name] = _u64(record)
            elif record.get("dir") == "F>B":
                if name in acked:
                    acked[name] |= _u64(record)
                index = getattr(_record_message(record).payload, "index", None)
                if isinstance(index, int) and name.startswith(("SET_VRING", "GET_VRING")):
                    rings = max(rings, index + 1)
        protocol_bit = int(VirtioFeature.PROTOCOL_FEATURES)
        fallback = acked["SET_FEATURES"] | (protocol_bit if acked["SET_PROTOCOL_FEATURES"] else 0)
        self._features = replies.get("GET_FEATURES", fallback)
        self._protocol = replies.get("GET_PROTOCOL_FEATURES", acked["SET_PROTOCOL_FEATURES"])
        self._queue_num = replies.get("GET_QUEUE_NUM", 0)
        self._queues = max(self._queue_num, rings, 1)
        self._slots = replies.get("GET_MAX_MEM_SLOTS", DEFAULT_MAX_MEM_SLOTS)

    def num_queues(self) -> int:
        """Recorded GET_QUEUE_NUM, or enough rings for every index the front-end used."""
        return self._queues

    def queue_num(self) -> int:
        """The recorded GET_QUEUE_NUM answer."""
        return self._queue_num or self._queues

    def max_queue_size(self) -> int:
        """The protocol maximum: the replay checks the front-end, not a device."""
        return 32768

    def features(self) -> int:
        """The recorded GET_FEATURES answer."""
        return self._features

    def protocol_features(self) -> int:
        """The recorded GET_PROTOCOL_FEATURES answer."""
        return self._protocol

    def max_mem_slots(self) -> int:
        """The recorded GET_MAX_MEM_SLOTS answer."""
        return self._slots

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """Accept config writes (the recorded back-end answered them)."""

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[Any], thread_id: int
    ) -> None:
        """Never called: a replay has no data path."""


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
    if isinstance(payload, VhostUserU64):
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

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.session = Session(ReplayBackend(records), observer=True)
        self.changes: list[str] = []
        self.session.listeners.append(self._changed)

    def _changed(
        self, machine: str, index: int | None, old: object, new: object, trigger: str
    ) -> None:
        where = "session" if machine == "session" else f"ring {index}"
        self.changes.append(f"{where}: {_state_name(old)} → {_state_name(new)}")

    def initial(self) -> str:
        rings = self.session.num_queues
        ring_state = self.session.vring_state(0).name if rings else "-"
        plural = "s" if rings != 1 else ""
        return f"session {self.session.state.name}, {rings} ring{plural} {ring_state}"

    def feed(self, record: dict[str, Any]) -> tuple[Message, list[str]]:
        """Replay one front-end message; return it and the notes (state changes, findings)."""
        self.changes = []
        before = len(self.session.findings)
        nfds = int(record.get("nfds", 0))
        msg = _record_message(record, _fresh_fds(str(record.get("name", "")), nfds))
        notes: list[str] = []
        try:
            self.session.handle(msg)
        except VhsmError as exc:
            notes.append(f"replay stopped on this message: {exc}")
        notes.extend(
            f"{finding.rule_id}: {finding.detail}" for finding in self.session.findings[before:]
        )
        return msg, [*self.changes, *notes]


def trace_sequence(records: list[dict[str, Any]], title: str = "") -> str:
    """Render a transcript as a mermaid sequenceDiagram annotated with state changes."""
    lines = []
    if title:
        lines += ["---", f"title: {_text(title)}", "---"]
    lines += [
        "sequenceDiagram",
        "  participant F as front-end",
        "  participant B as back-end",
    ]
    replays: dict[object, _Replay] = {}
    for record in records:
        conn = record.get("conn")
        event = record.get("event")
        if event == "open":
            replay = replays[conn] = _Replay([r for r in records if r.get("conn") == conn])
            lines.append(f"  Note over F,B: connection {conn} opened")
            lines.append(f"  Note over B: {replay.initial()}")
        elif event == "close":
            by = {"F": "front-end", "B": "back-end"}.get(str(record.get("by")), "?")
            why = f" ({record['why']})" if record.get("why") else ""
            lines.append(_text(f"  Note over F,B: connection {conn} closed by {by}{why}"))
        elif record.get("dir") == "F>B":
            if conn not in replays:
                replays[conn] = _Replay([r for r in records if r.get("conn") == conn])
            msg, notes = replays[conn].feed(record)
            lines.append(f"  F->>B: {describe_message(msg, int(record.get('nfds', 0)))}")
            if notes:
                lines.append(f"  Note over B: {'<br/>'.join(_text(n) for n in notes)}")
        elif record.get("dir") == "B>F":
            msg = _record_message(record)
            lines.append(f"  B-->>F: {describe_message(msg, int(record.get('nfds', 0)))}")
    return "\n".join(lines) + "\n"
