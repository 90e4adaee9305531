"""Build `transitions` machines from the YAML declarations in ``specs/``.

The YAML names conditions and callbacks; a resolver supplied by the caller
turns each name into a callable, so the same declaration serves the runtime
(which acts), the auditor (which observes) and the diagrams (which only draw).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from transitions import Machine

from vhsm.errors import VhsmError
from vhsm.specs import load_spec

# A trigger costs ~80 us at DEBUG level; keep the library quiet (STYLE.md).
logging.getLogger("transitions").setLevel(logging.WARNING)


class SessionState(enum.Enum):
    """States of the session machine (specs/session.yaml)."""

    NEGOTIATING = "NEGOTIATING"
    SUSPENDED = "SUSPENDED"
    RUNNING = "RUNNING"


class VringMachineState(enum.Enum):
    """States of the per-vring machine (specs/vring.yaml): started/stopped x enabled/disabled."""

    STOPPED_DISABLED = "STOPPED_DISABLED"
    STOPPED_ENABLED = "STOPPED_ENABLED"
    STARTED_DISABLED = "STARTED_DISABLED"
    STARTED_ENABLED = "STARTED_ENABLED"

    @property
    def started(self) -> bool:
        """True in the two started states."""
        return self.name.startswith("STARTED")

    @property
    def enabled(self) -> bool:
        """True in the two enabled states."""
        return self.name.endswith("_ENABLED")


MACHINE_STATES: dict[str, type[enum.Enum]] = {
    "session": SessionState,
    "vring": VringMachineState,
}

#: Resolver signature: (kind "condition" | "callback", name) -> callable taking EventData.
Resolver = Callable[[str, str], Callable[..., Any]]


@attrs.frozen
class MachineSpec:
    """One machine's declaration, checked against its Python state enum."""

    name: str
    states: type[enum.Enum]
    initial: enum.Enum
    transitions: tuple[dict[str, Any], ...]
    conditions: dict[str, dict[str, Any]]
    callbacks: dict[str, str]
    state_info: dict[str, dict[str, Any]]
    invalid_state_rules: dict[str, str]
    selector_rules: dict[str, str]
    section: str

    @property
    def triggers(self) -> tuple[str, ...]:
        """Every trigger name, in declaration order."""
        return tuple(dict.fromkeys(t["trigger"] for t in self.transitions))

    def sources(self, transition: dict[str, Any]) -> list[enum.Enum]:
        """Expand a transition's source ("*", one name or a list) into states."""
        source = transition["source"]
        if source == "*":
            return list(self.states)
        names = [source] if isinstance(source, str) else list(source)
        return [self.states[name] for name in names]

    def destination(self, transition: dict[str, Any], source: enum.Enum) -> enum.Enum:
        """The state a transition lands in from `source` (internal ones stay)."""
        dest = transition.get("dest")
        return source if dest is None else self.states[dest]


def load_machine_spec(name: str) -> MachineSpec:
    """Load and check ``specs/<name>.yaml``: states must match the enum, names must resolve."""
    doc = load_spec(name)
    states = MACHINE_STATES[name]
    declared = [s["name"] for s in doc["states"]]
    if declared != [s.name for s in states]:
        raise VhsmError(f"specs/{name}.yaml states {declared} != {[s.name for s in states]}")
    conditions = doc.get("conditions") or {}
    callbacks = doc.get("callbacks") or {}
    for transition in doc["transitions"]:
        for cond in transition.get("conditions", []):
            if cond not in conditions:
                raise VhsmError(f"specs/{name}.yaml: undeclared condition {cond!r}")
        for key in ("before", "after"):
            for callback in transition.get(key, []):
                if callback not in callbacks:
                    raise VhsmError(f"specs/{name}.yaml: undeclared callback {callback!r}")
    return MachineSpec(
        name=name,
        states=states,
        initial=states[doc["initial"]],
        transitions=tuple(doc["transitions"]),
        conditions=conditions,
        callbacks=callbacks,
        state_info={s["name"]: s for s in doc["states"]},
        invalid_state_rules=doc.get("invalid_state_rules") or {},
        selector_rules=doc.get("selector_rules") or {},
        section=str(doc.get("section", "")),
    )


def transition_table(spec: MachineSpec, resolve: Resolver | None) -> list[dict[str, Any]]:
    """Turn the declaration into `transitions` keyword dicts, resolving names when asked."""
    table = []
    for declared in spec.transitions:
        entry: dict[str, Any] = {
            "trigger": declared["trigger"],
            "source": "*" if declared["source"] == "*" else _state_names(declared["source"]),
            "dest": declared.get("dest"),
        }
        for key, kind in (
            ("conditions", "condition"),
            ("before", "callback"),
            ("after", "callback"),
        ):
            names = declared.get(key, [])
            if names:
                entry[key] = [resolve(kind, n) for n in names] if resolve else list(names)
        table.append(entry)
    return table


def build_machine(
    spec: MachineSpec, models: Sequence[object], resolve: Resolver, **options: Any
) -> Machine:
    """Build a flat machine for `models` (one machine may drive several vring models)."""
    return Machine(
        model=list(models),
        states=spec.states,
        initial=spec.initial,
        transitions=transition_table(spec, resolve),
        auto_transitions=False,
        send_event=True,
        ignore_invalid_triggers=False,
        model_override=False,
        **options,
    )


def _state_names(source: str | list[str]) -> str | list[str]:
    return source if isinstance(source, str) else list(source)
