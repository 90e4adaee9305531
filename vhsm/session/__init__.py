"""The sans-IO protocol core: one `Session` per connection, driven by the specs/ machines."""

from vhsm.session.dataplane import DataPlane, NullDataPlane
from vhsm.session.machines import SessionState, VringMachineState
from vhsm.session.rules import Finding, Rule, all_rules, rule
from vhsm.session.session import Session, StateListener

__all__ = [
    "DataPlane",
    "Finding",
    "NullDataPlane",
    "Rule",
    "Session",
    "SessionState",
    "StateListener",
    "VringMachineState",
    "all_rules",
    "rule",
]
