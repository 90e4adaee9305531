"""Diagrams of the protocol machines and of recorded sessions.

State diagrams are drawn by `transitions.extensions.GraphMachine` over the
same YAML declaration the runtime uses (one ``specs/<machine>.yaml`` per
concern, ``specs/vring.yaml`` for a ring), plus an overview of the whole
session (`vhsm.diagram_overview`): edges are labelled with the request name and its
named conditions, states are titled by name, and the many internal
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
import shutil
import subprocess
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, cast

from transitions.extensions import GraphMachine, diagrams_mermaid

from vhsm.diagram_overview import front_matter_title, overview_dot, overview_mermaid
from vhsm.errors import VhsmError
from vhsm.session.machines import MachineSpec, composition, load_machine_spec, transition_table

#: Machines that can be drawn, in output order: "session" is the overview of the composition.
MACHINES: tuple[str, ...] = ("session", *composition().machines)

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
    return _expand("machine", name, MACHINES, list(MACHINES))


def check_format(name: str) -> list[str]:
    """Expand a format name ("all" = mermaid, dot, svg); a VhsmError names an unknown one."""
    return _expand("format", name, SUFFIXES, list(ALL_FORMATS))


def _expand(what: str, name: str, known: Iterable[str], every: list[str]) -> list[str]:
    """``name`` as a list, or ``every`` for "all"; a VhsmError lists the ``known`` names."""
    choices = (*known, "all")
    if name not in choices:
        raise VhsmError(f"unknown {what} {name!r} (choose {', '.join(choices)})")
    return every if name == "all" else [name]


def state_label(spec: MachineSpec, state: enum.Enum) -> str:
    """The state's title: its name (rule pages, not diagrams, link the upstream sections)."""
    return state.name


def request_label(trigger: str, conditions: Iterable[str] = ()) -> str:
    """A request as diagrams show it: upper-case name, then its named conditions."""
    names = list(conditions)
    return f"{trigger.upper()} [{' & '.join(names)}]" if names else trigger.upper()


def internal_requests(spec: MachineSpec) -> dict[str, list[str]]:
    """For each state, the requests it accepts without changing state, in declaration order.

    That is the internal transitions, and a transition from "*" (or a list) seen from
    the state it lands in: drawn as an edge it would be a loop whose label mermaid lays
    over its neighbours'. Only selector conditions (those without a rule id, which pick
    between transitions) are shown here; rule checks would bury the list.
    """
    inside: dict[str, list[str]] = {state.name: [] for state in spec.states}
    for declared in spec.transitions:
        selectors = [
            name
            for name in declared.get("conditions", [])
            if spec.conditions[name].get("rule") is None
        ]
        label = request_label(declared["trigger"], selectors)
        for state in spec.sources(declared):
            if spec.destination(declared, state) is not state:
                continue
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
    """The state-changing transitions as `GraphMachine` keyword dicts, names kept as strings.

    Sources are listed explicitly, without the state a transition lands in (that state
    lists the request inside, see `internal_requests`).
    """
    table = []
    for declared, entry in zip(spec.transitions, transition_table(spec, None), strict=True):
        moving = [s.name for s in spec.sources(declared) if spec.destination(declared, s) is not s]
        if not moving:
            continue
        entry["source"] = moving
        entry["label"] = entry["trigger"].upper()
        table.append(entry)
    return table


def machine_title(spec: MachineSpec) -> str:
    """The diagram title, e.g. "vhsm session machine"."""
    return f"vhsm {spec.name} machine"


class _MermaidGraph(diagrams_mermaid.Graph):
    """Mermaid engine: state titles plus description lines; a proper front-matter title."""

    def _add_nodes(self, states: list[dict[str, Any]], container: list[str]) -> None:
        details: dict[str, list[str]] = self.machine.vhsm_details
        for state in states:
            name = state["name"]
            container.append(f'state "{state.get("label", name)}" as {name}')
            container.extend(f"{name} : {line}" for line in details.get(name, []))

    def get_graph(self, title: str | None = None, roi_state: Any = None) -> Any:
        return super().get_graph(
            title=front_matter_title(title or self.machine.title), roi_state=None
        )


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
    if engine not in ENGINES:
        raise VhsmError(f"unknown graph engine {engine!r} (choose {', '.join(ENGINES)})")
    if name == "session":
        return overview_mermaid() if engine == "mermaid" else overview_dot()
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
