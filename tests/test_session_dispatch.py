"""The explicit dispatch table names exactly what the YAML machines declare."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhsm.session.dispatch import DISPATCH
from vhsm.session.machines import composition, load_machine_spec

MACHINES = composition().machines


def test_every_machine_of_the_session_has_its_table() -> None:
    assert set(DISPATCH) == set(MACHINES)


@pytest.mark.parametrize("machine", MACHINES)
def test_table_and_yaml_name_the_same_conditions_and_callbacks(machine: str) -> None:
    spec = load_machine_spec(machine)
    assert set(DISPATCH[machine].conditions) == set(spec.conditions)
    assert set(DISPATCH[machine].callbacks) == set(spec.callbacks)


@pytest.mark.parametrize("machine", MACHINES)
def test_every_declared_name_is_used_by_a_transition(machine: str) -> None:
    spec = load_machine_spec(machine)
    used = {c for t in spec.transitions for c in t.get("conditions", [])}
    used |= {c for t in spec.transitions for key in ("before", "after") for c in t.get(key, [])}
    assert set(spec.conditions) | set(spec.callbacks) == used


def test_no_name_is_resolved_by_getattr() -> None:
    session_dir = Path(__file__).resolve().parent.parent / "vhsm" / "session"
    for path in session_dir.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert 'f"_do_' not in text and 'f"_guard_' not in text, path.name
