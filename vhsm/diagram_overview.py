"""The overview diagram: the session as the composition of its machines.

One region per machine (mermaid concurrent regions, or a graphviz cluster per
machine), each with its states and the requests that move it; requests that
leave a machine where it is are only in that machine's own diagram. A note
gives the set-up order (the happy path) and how the phase is derived.
"""

from __future__ import annotations

import json

from vhsm.session.machines import Composition, MachineSpec, composition
from vhsm.specs import load_spec

#: Title of the overview, as mermaid front-matter and graphviz label.
TITLE = "vhsm session: one machine per concern, the phase derived from them"


def front_matter_title(title: str) -> str:
    """The ``title:`` line of a mermaid document's YAML front matter.

    The title is a quoted YAML string: mermaid rejects the whole document when a plain
    one holds ": " (as the overview's title does), and every diagram of vhsm goes
    through here.
    """
    return f"title: {json.dumps(title, ensure_ascii=False)}"


def _edges(spec: MachineSpec) -> dict[tuple[str, str], list[str]]:
    """(source, dest) -> request names moving the machine between them, declaration order."""
    edges: dict[tuple[str, str], list[str]] = {}
    for declared in spec.transitions:
        if declared.get("dest") is None:
            continue
        for source in spec.sources(declared):
            dest = spec.destination(declared, source)
            if dest is source:
                continue
            names = edges.setdefault((source.name, dest.name), [])
            if declared["trigger"].upper() not in names:
                names.append(declared["trigger"].upper())
    return edges


def _notes(comp: Composition) -> list[str]:
    phase = load_spec("session")["phase"]
    lines = ["Set-up order (happy path):", *comp.setup, "Phase, derived after every request:"]
    lines += [f"{name}: {info['description']}" for name, info in phase.items()]
    return lines


def _title(spec: MachineSpec) -> str:
    suffix = " (one per ring)" if spec.name == composition().ring_machine else ""
    return f"{spec.name}{suffix}"


def overview_mermaid() -> str:
    """The overview as a mermaid state diagram with one concurrent region per machine."""
    comp = composition()
    lines = ["---", front_matter_title(TITLE), "---", "stateDiagram-v2"]
    lines.append('  state "session: phase NEGOTIATING / SUSPENDED / RUNNING" as session {')
    for number, spec in enumerate(comp.specs):
        if number:
            lines.append("    --")
        lines.append(f'    state "{_title(spec)}" as {spec.name} {{')
        for state in spec.states:
            lines.append(f'      state "{state.name}" as {spec.name}_{state.name}')
        lines.append(f"      [*] --> {spec.name}_{spec.initial.name}")
        for (source, dest), names in _edges(spec).items():
            label = " | ".join(names)
            lines.append(f"      {spec.name}_{source} --> {spec.name}_{dest} : {label}")
        lines.append("    }")
    lines.append("  }")
    lines.append("  note right of session")
    lines.extend(f"    {line}" for line in _notes(comp))
    lines.append("  end note")
    return "\n".join(lines) + "\n"


def _dot(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def overview_dot() -> str:
    """The overview as graphviz source with one cluster per machine."""
    comp = composition()
    lines = [f"digraph {_dot('session')} {{", f"  label={_dot(TITLE)}", "  labelloc=t"]
    lines.append("  rankdir=LR compound=true")
    lines.append('  node [shape=rectangle style="rounded,filled" fillcolor=white]')
    for spec in comp.specs:
        lines.append(f"  subgraph {_dot('cluster_' + spec.name)} {{")
        lines.append(f"    label={_dot(_title(spec))}")
        start = f"{spec.name}.__initial__"
        lines.append(f'    {_dot(start)} [label="" shape=point width=0.15]')
        for state in spec.states:
            lines.append(f"    {_dot(spec.name + '.' + state.name)} [label={_dot(state.name)}]")
        lines.append(f"    {_dot(start)} -> {_dot(spec.name + '.' + spec.initial.name)}")
        for (source, dest), names in _edges(spec).items():
            a, b = _dot(f"{spec.name}.{source}"), _dot(f"{spec.name}.{dest}")
            lines.append(f"    {a} -> {b} [label={_dot(chr(10).join(names))}]")
        lines.append("  }")
    note = "\\l".join(line.replace('"', "'") for line in _notes(comp)) + "\\l"
    lines.append(f'  note [shape=note label="{note}"]')
    lines.append("}")
    return "\n".join(lines) + "\n"
