"""`Session`: one vhost-user connection's protocol state, sans-IO.

The session is the composition declared in ``specs/session.yaml``: one flat
machine per concern (ownership, features, protocol features, memory table,
back-end channel, inflight region, device-state transfer, device status,
stateless device requests) and one machine per ring. `handle(message)` checks
the request's gate (``specs/requests.yaml``), then fires the trigger of the
same name on every machine that declares it, in the declared order; a ring
request fires on the machine of the ring its payload names. The phase
(NEGOTIATING / SUSPENDED / RUNNING) is derived from the machines, never stored.

Failure policy (rule VU-REQ-001): a violation of a `reject` rule
answers a NACK (u64 1) when the request asked for an ack (NEED_REPLY) and its
reply is an ack or a u64 status; otherwise `handle` raises `ProtocolViolation`
and the daemon closes the connection. `warn` rules are logged and recorded in
`findings`. In observer mode (the auditor) nothing is raised: every violation
becomes a finding.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import Callable
from typing import Any

from transitions import EventData, Machine, MachineError

from vhsm.backend import VhostUserBackend
from vhsm.errors import GuestMemoryError, ProtocolViolation
from vhsm.session.dataplane import DataPlane, NullDataPlane
from vhsm.session.dispatch import DISPATCH
from vhsm.session.gates import gate_violation
from vhsm.session.machines import (
    FeaturesState,
    MachineSpec,
    SessionState,
    VringMachineState,
    build_machine,
    composition,
    load_machine_spec,
)
from vhsm.session.rules import Finding, rule
from vhsm.wire import (
    FrontendReq,
    Message,
    ProtocolFeature,
    RequestSpec,
    VhostUserU64,
    make_reply,
    request_spec,
)

log = logging.getLogger(__name__)

#: Called on every state change: (machine name, ring index or None, old state, new state,
#: trigger). The derived phase is announced as machine "session".
StateListener = Callable[[str, int | None, str, str, str], None]


class _Model:
    """The object a machine drives; `trigger` is added by transitions."""

    state: Any
    trigger: Callable[..., bool]

    def __init__(self, index: int | None = None) -> None:
        self.index = index


class Session:
    """The protocol state of one connection: the composition of its machines."""

    def __init__(
        self,
        backend: VhostUserBackend,
        dataplane: DataPlane | None = None,
        *,
        observer: bool = False,
    ) -> None:
        self.backend = backend
        self.dataplane: DataPlane = dataplane if dataplane is not None else NullDataPlane()
        self.observer = observer
        self.findings: list[Finding] = []
        self.listeners: list[StateListener] = []
        self.offered_features = backend.features()
        self.offered_protocol_features = backend.protocol_features()
        self.num_queues = backend.num_queues()
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.mapped_regions = 0
        self.status = 0
        self.mtu: int | None = None
        self.rarp_mac: bytes | None = None
        self._reply: Message | None = None
        self._pending: ProtocolViolation | None = None
        self._fds_taken = False
        self._current: Message | None = None
        #: What a failing condition found, added to its violation's detail.
        self.guard_detail: str | None = None
        self.composition = composition()
        self.specs: dict[str, MachineSpec] = {
            name: load_machine_spec(name) for name in self.composition.machines
        }
        ring = self.composition.ring_machine
        self._models: dict[str, _Model] = {name: _Model() for name in self.specs if name != ring}
        self._vrings = [_Model(i) for i in range(self.num_queues)]
        self.machines: dict[str, Machine] = {}
        for name, spec in self.specs.items():
            models = self._vrings if name == ring else [self._models[name]]
            self.machines[name] = build_machine(
                spec, models, self._resolver(spec), after_state_change=self._announce(name)
            )

    # --- public state ------------------------------------------------------------
    @property
    def state(self) -> SessionState:
        """The phase, derived: NEGOTIATING until features are acked, RUNNING while a ring runs."""
        if self._models["features"].state is FeaturesState.UNSET:
            return SessionState.NEGOTIATING
        if any(model.state.started for model in self._vrings):
            return SessionState.RUNNING
        return SessionState.SUSPENDED

    def machine_state(self, name: str) -> enum.Enum:
        """The state of one concern's machine (see ``specs/session.yaml``)."""
        state: enum.Enum = self._models[name].state
        return state

    def vring_state(self, index: int) -> VringMachineState:
        """The state of ring `index`'s machine."""
        state: VringMachineState = self._vrings[index].state
        return state

    @property
    def reply_ack(self) -> bool:
        """True once REPLY_ACK was negotiated."""
        return bool(self.acked_protocol_features & ProtocolFeature.REPLY_ACK)

    @property
    def protocol_features_in_use(self) -> bool:
        """SET_PROTOCOL_FEATURES received (the protocol-feature machine is SET)."""
        return self.machine_state("protocol_features").name == "SET"

    @property
    def owned(self) -> bool:
        """True once SET_OWNER was received (the ownership machine is OWNED)."""
        return self.machine_state("ownership").name == "OWNED"

    def started_rings(self) -> list[int]:
        """Indices of the rings currently started."""
        return [m.index for m in self._vrings if m.state.started and m.index is not None]

    # --- the one entry point -----------------------------------------------------------
    def handle(self, msg: Message) -> Message | None:
        """Process one front-end request; return the reply to send, if any."""
        info = request_spec(msg.request)
        self._reply, self._pending, self._fds_taken, self._current = None, None, False, msg
        phase = self.state
        try:
            if msg.is_reply:
                raise self.violation("VU-FRAME-003", "a request must not carry the REPLY flag")
            if msg.error is not None:
                raise msg.error
            if info is None:
                raise self.violation("VU-FRAME-004", f"unknown request code {msg.request}")
            gate = gate_violation(self, info)
            if gate is not None:
                raise self.violation(*gate)
            if msg.need_reply and not self.reply_ack and info.reply != "always":
                self.note("VU-NEG-012", "NEED_REPLY set without REPLY_ACK negotiated")
            self._fire_all(info.name.lower(), msg)
            reply = self._reply
            if reply is None and msg.need_reply and info.reply == "ack":
                reply = make_reply(msg.request, VhostUserU64(0))
            return reply
        except ProtocolViolation as violation:
            return self._fail(msg, info, violation)
        finally:
            if not self._fds_taken:
                _close_all(msg.fds)
            self._current = None
            self._announce_phase(phase, msg)

    # --- helpers for the handlers --------------------------------------------------
    def violation(self, rule_id: str, detail: str) -> ProtocolViolation:
        """Build a violation of `rule_id` for the message being handled."""
        name = self._current.name if self._current is not None else "-"
        return ProtocolViolation(rule_id, name, self.state.name, detail)

    def note(self, rule_id: str, detail: str) -> None:
        """Record a finding for a rule that is only warned about (or any rule, observing)."""
        finding = Finding.from_violation(self.violation(rule_id, detail))
        self.findings.append(finding)
        if not self.observer:  # an auditor reports its findings itself: no second line
            known = rule(rule_id)
            # INTEROP: what real peers do and vhsm accepts; recorded, no warning every boot
            level = logging.INFO if known.severity == "INTEROP" else logging.WARNING
            log.log(level, "%s: %s (%s)", rule_id, detail, known.statement)

    def take_fds(self, msg: Message) -> tuple[int, ...]:
        """Take ownership of the message's fds (they will not be closed by `handle`)."""
        self._fds_taken = True
        return msg.fds

    def reply_with(self, msg: Message, payload: object, fds: tuple[int, ...] = ()) -> None:
        """Set the reply to the message being handled."""
        self._reply = make_reply(msg.request, payload, fds=fds)  # type: ignore[arg-type]

    def memory_violation(self, err: GuestMemoryError, default_rule: str) -> ProtocolViolation:
        """Turn a data-path memory error into the violation of the rule it names."""
        return self.violation(err.rule_id or default_rule, str(err))

    def ring_index(self, msg: Message) -> int:
        """The ring index the payload names, checked against the queue count (VU-RING-001)."""
        index = int(getattr(msg.payload, "index", -1))
        if not 0 <= index < self.num_queues:
            raise self.violation(
                "VU-RING-001", f"ring index {index} out of range (allowed 0..{self.num_queues - 1})"
            )
        return index

    # --- machinery -------------------------------------------------------------------
    def _fire_all(self, trigger: str, msg: Message) -> None:
        """Fire `trigger` on every machine that declares it, in the declared order."""
        declaring = self.composition.declaring(trigger)
        if not declaring:
            raise self.violation("VU-STATE-001", f"{trigger.upper()}: no machine declares it")
        for name in declaring:
            spec = self.specs[name]
            if name != self.composition.ring_machine:
                self._fire(self._models[name], spec, trigger, msg)
            elif trigger in spec.broadcast:
                for model in self._vrings:
                    self._fire(model, spec, trigger, msg)
            else:
                self._fire(self._vrings[self.ring_index(msg)], spec, trigger, msg)

    def _fire(self, model: _Model, spec: MachineSpec, trigger: str, msg: Message) -> None:
        state = model.state
        self._pending = None
        try:
            moved = model.trigger(trigger, msg=msg)
        except MachineError:
            rule_id = spec.invalid_state_rules.get(trigger, "VU-STATE-001")
            where = "" if model.index is None else f"ring {model.index} "
            raise self.violation(
                rule_id, f"{trigger.upper()} not allowed in {spec.name} {where}state {state.name}"
            ) from None
        if not moved:
            pending, self._pending = self._pending, None
            if pending is not None:
                raise pending
            raise self.violation(
                "VU-STATE-001", f"{trigger.upper()}: payload selects no transition"
            )

    def _resolver(self, spec: MachineSpec) -> Callable[[str, str], Callable[..., Any]]:
        handlers = DISPATCH[spec.name]

        def resolve(kind: str, name: str) -> Callable[..., Any]:
            if kind == "callback":
                callback = handlers.callbacks[name]
                return lambda event: callback(self, event)
            return self._guard(spec, name)

        return resolve

    def _guard(self, spec: MachineSpec, name: str) -> Callable[[EventData], bool]:
        predicate = DISPATCH[spec.name].conditions[name]
        rule_id = spec.conditions[name].get("rule")
        statement = spec.conditions[name].get("description", name)

        def check(event: EventData) -> bool:
            self.guard_detail = None
            if predicate(self, event):
                return True
            if rule_id is None:
                return False
            detail = f"expected: {statement}"
            if self.guard_detail:
                detail += f" ({self.guard_detail})"
            if self.observer or rule(rule_id).action == "warn":
                self.note(rule_id, detail)
                return True
            self._pending = self.violation(rule_id, detail)
            return False

        return check

    def _announce(self, machine: str) -> Callable[[EventData], None]:
        def after_change(event: EventData) -> None:
            if event.transition is None:
                return
            old, new = event.transition.source, event.transition.dest
            if new is None or old == new or not self.listeners:
                return
            index = getattr(event.model, "index", None)
            for listener in self.listeners:
                listener(machine, index, old, new, event.event.name)

        return after_change

    def _announce_phase(self, before: SessionState, msg: Message) -> None:
        after = self.state
        if after is before or not self.listeners:
            return
        trigger = msg.name.lower()
        for listener in self.listeners:
            listener("session", None, before.name, after.name, trigger)

    def _fail(
        self, msg: Message, info: RequestSpec | None, violation: ProtocolViolation
    ) -> Message | None:
        self.findings.append(Finding.from_violation(violation))
        if self.observer:  # an auditor reports its findings itself: no second line
            return None
        # the text, not the violation: a record kept by a handler (a test's log capture,
        # a MemoryHandler) must not pin the raising frames and the guest memory they view
        log.warning("%s", str(violation))
        if msg.need_reply and (
            info is None or info.reply == "ack" or info.reply_payload is VhostUserU64
        ):
            return make_reply(msg.request, VhostUserU64(1))
        raise violation


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


__all__ = ["FrontendReq", "Session", "SessionState", "StateListener", "VringMachineState"]
