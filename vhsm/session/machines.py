"""Build `transitions` machines from the YAML declarations in ``specs/``.

The session is the composition of one flat machine per concern (ownership,
virtio features, protocol features, memory table, back-end channel, inflight
region, device status, device-state transfer, stateless device requests) and
one machine per vring; ``specs/session.yaml`` lists them in firing order.

The YAML names conditions and callbacks; a resolver supplied by the caller
turns each name into a callable, so the same declaration serves the runtime
(which acts), the auditor (which observes) and the diagrams (which only draw).
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs
from transitions import Machine

from vhsm.errors import VhsmError
from vhsm.specs import load_spec

# A trigger costs ~80 us at DEBUG level; keep the library quiet (STYLE.md).
logging.getLogger("transitions").setLevel(logging.WARNING)


class SessionState(enum.Enum):
    """The session's phase, derived from its machines (specs/session.yaml ``phase``)."""

    NEGOTIATING = "NEGOTIATING"
    SUSPENDED = "SUSPENDED"
    RUNNING = "RUNNING"


class FeaturesState(enum.Enum):
    """States of the virtio feature machine (specs/features.yaml)."""

    UNSET = "UNSET"
    ACKED = "ACKED"


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


#: Machines whose states Python code names; the others get an enum built from their YAML.
NAMED_STATES: dict[str, type[enum.Enum]] = {
    "features": FeaturesState,
    "vring": VringMachineState,
}

#: Resolver signature: (kind "condition" | "callback", name) -> callable taking EventData.
Resolver = Callable[[str, str], Callable[..., Any]]


@attrs.frozen
class MachineSpec:
    """One machine's declaration, checked against its state enum."""

    name: str
    states: type[enum.Enum]
    initial: enum.Enum
    transitions: tuple[dict[str, Any], ...]
    conditions: dict[str, dict[str, Any]]
    callbacks: dict[str, str]
    state_info: dict[str, dict[str, Any]]
    invalid_state_rules: dict[str, str]
    section: str
    description: str = ""
    broadcast: frozenset[str] = frozenset()

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


@attrs.frozen
class Composition:
    """``specs/session.yaml``: the machines of a session, in firing order, and its phase."""

    machines: tuple[str, ...]
    ring_machine: str
    setup: tuple[str, ...]

    @property
    def specs(self) -> tuple[MachineSpec, ...]:
        """Every machine's declaration, in firing order."""
        return tuple(load_machine_spec(name) for name in self.machines)

    def declaring(self, trigger: str) -> tuple[str, ...]:
        """The machines that declare `trigger`, in firing order."""
        return _declaring(self.machines).get(trigger, ())


@functools.cache
def _declaring(machines: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Trigger -> the machines declaring it, in firing order (computed once)."""
    table: dict[str, list[str]] = {}
    for name in machines:
        for trigger in load_machine_spec(name).triggers:
            table.setdefault(trigger, []).append(name)
    return {trigger: tuple(names) for trigger, names in table.items()}


@functools.cache
def composition() -> Composition:
    """Load ``specs/session.yaml`` (the composition) once."""
    doc = load_spec("session")
    machines = tuple(doc["machines"])
    if doc["ring_machine"] not in machines:
        raise VhsmError("specs/session.yaml: ring_machine must be one of the machines")
    return Composition(machines, doc["ring_machine"], tuple(doc.get("setup") or ()))


def _states_of(name: str, declared: list[str]) -> type[enum.Enum]:
    named = NAMED_STATES.get(name)
    if named is None:
        title = "".join(part.title() for part in name.split("_")) + "State"
        return cast(type[enum.Enum], enum.Enum(title, [(n, n) for n in declared]))
    if declared != [s.name for s in named]:
        raise VhsmError(f"specs/{name}.yaml states {declared} != {[s.name for s in named]}")
    return named


@functools.cache
def load_machine_spec(name: str) -> MachineSpec:
    """Load and check ``specs/<name>.yaml``: states, and every name a transition uses."""
    doc = load_spec(name)
    declared = [s["name"] for s in doc["states"]]
    states = _states_of(name, declared)
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
        section=str(doc.get("section", "")),
        description=_first_comment_line(name),
        broadcast=frozenset(doc.get("broadcast") or ()),
    )


def _first_comment_line(name: str) -> str:
    """The machine's one-line summary: the first comment line of its YAML file."""
    from vhsm.specs import specs_dir

    for line in (specs_dir() / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


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
