"""`vhsm audit backend`: an active conformance suite run against a live back-end.

Each case opens a fresh connection with vhsm's front-end driver, brings the
session to the state the case needs, then either runs a legal scenario
(negotiation orders, renegotiation, memory replacement, ring cycles, reset,
reconnect, a data round trip) or puts one bad input on the wire. The
back-end's answer is judged:

* ``pass`` -- the scenario worked;
* ``rejected-cleanly`` -- a bad input was NACKed, or the connection was closed
  and the back-end then accepted a new one;
* ``fail`` -- the bad input was accepted (acked 0, or the session carried on);
* ``wedged`` -- no answer within the timeout;
* ``crashed`` -- the connection ended and no new connection is served;
* ``skipped`` -- the back-end does not offer what the case needs.

A bad input without a reply of its own is followed by a GET_FEATURES probe:
its answer means the back-end carried on as if nothing was wrong.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import attrs

from vhsm.audit.backend_cases import BadInputs, Scenarios
from vhsm.audit.probe import DEVICES, Case, Progress, Skip
from vhsm.audit.report import CaseResult, Outcome, Report
from vhsm.errors import BackendError, FramingError, VhsmError
from vhsm.session.rules import rule_for_alias
from vhsm.transport import PeerClosed
from vhsm.wire import (
    VirtioFeature,
)


class BackendSuite(Scenarios, BadInputs):
    """The active suite against the back-end listening at `path` (see `SuiteCore` for args)."""

    # --- running ------------------------------------------------------------------------
    def run(self, only: str | None = None) -> Report:
        """Run every case (or those `only` selects: see `selects`); return the report.

        The first case asks GET_FEATURES and GET_PROTOCOL_FEATURES: if the
        back-end wedges or crashes there, nothing else can be judged and the
        suite stops.
        """
        report = Report(f"back-end at {self.path} (device {self.device})")
        cases = [case for case in self.cases() if only is None or selects(case, only)]
        if only is not None and not cases:
            raise VhsmError(
                f"--only {only!r} matches no case (give a rule id such as VU-RING-002, the start"
                " of one such as VU-MEM, or words of a case title)"
            )
        first = self._run_case(Case("VU-FRAME-010", "GET_FEATURES is answered", self.s_discover))
        report.cases.append(first)
        total = len(cases) + 1
        if self.progress is not None:
            self.progress(1, total, first)
        if first.outcome != "pass":
            return report
        for number, case in enumerate(cases, 2):
            result = self._run_case(case)
            report.cases.append(result)
            if self.progress is not None:
                self.progress(number, total, result)
        report.findings.extend(self.findings)
        return report

    def s_discover(self) -> tuple[Outcome, str]:
        """What the back-end offers (every later case depends on it)."""
        fe = self._connect()
        self.offered = fe.offered_features
        if self.offered & VirtioFeature.PROTOCOL_FEATURES:
            self.offered_protocol = fe.get_protocol_features()
        return "pass", f"features {self.offered:#x}, protocol features {self.offered_protocol:#x}"

    def _run_case(self, case: Case) -> CaseResult:
        start = time.monotonic()
        found = len(self.findings)
        try:
            outcome, detail = case.run()
        except Skip as skip:
            outcome, detail = "skipped", str(skip)
        except TimeoutError as exc:
            outcome, detail = "wedged", str(exc)
        except (PeerClosed, ConnectionError, FramingError):
            outcome, detail = self._after_close("the back-end closed the connection")
            if outcome == "rejected-cleanly":
                outcome = "fail"
        except (BackendError, VhsmError, OSError) as exc:
            outcome, detail = "fail", str(exc)
        finally:
            self._close_all()
            # Every finding made during the case names it.
            self.findings[found:] = [
                attrs.evolve(finding, case=case.name) for finding in self.findings[found:]
            ]
        return CaseResult(case.rule_id, case.title, outcome, detail, time.monotonic() - start)

    # --- the case list ---------------------------------------------------------------------
    def cases(self) -> list[Case]:
        """Every case, scenarios first."""
        c = Case
        return [
            # scenarios
            c("VU-STATE-001", "negotiation, QEMU's order", self.s_qemu_order),
            c("VU-STATE-001", "negotiation, SET_OWNER first", self.s_owner_first),
            c("VU-NEG-001", "protocol features before SET_OWNER", self.s_protocol_first),
            c("VU-STATE-001", "renegotiation after stopping the rings", self.s_renegotiate),
            c("VU-STATE-001", "memory table replaced while running", self.s_mem_replace),
            c("VU-STATE-001", "ADD_MEM_REG / REM_MEM_REG", self.s_add_rem),
            c("VU-STATE-009", "ring stop/start cycles", self.s_ring_cycles),
            c("VU-STATE-008", "disabled ring has no side effects", self.s_disabled_ring),
            c("VU-STATE-001", "enable/disable cycles", self.s_enable_cycles),
            c("VU-STATE-001", "RESET_DEVICE and re-initialisation", self.s_reset),
            c("VU-STATE-001", "status byte round trip", self.s_status),
            c("VU-PAY-009", "config space read", self.s_config),
            c("VU-STATE-011", "reconnect and resume", self.s_reconnect),
            c("VU-STATE-011", f"data round trip ({self.device})", self.s_data),
            c("VU-REQ-002", "acks every NEED_REPLY request", self.s_acks),
            # framing
            c("VU-FRAME-001", "header version bits 0", lambda: self.b_flags(0x0)),
            c("VU-FRAME-001", "header version bits 2", lambda: self.b_flags(0x2)),
            c("VU-FRAME-002", "reserved header flag bits set", lambda: self.b_flags(0x11)),
            c("VU-FRAME-003", "REPLY flag on a request", lambda: self.b_flags(0x5)),
            c("VU-FRAME-004", "unknown request code (99)", self.b_unknown),
            c("VU-FRAME-004", "request code 0", self.b_code_zero),
            c("VU-REQ-001", "unknown request without NEED_REPLY", self.b_unknown_silent),
            c("VU-FRAME-005", "payload size field 64 KiB", lambda: self.b_oversized(1 << 16)),
            c("VU-FRAME-005", "payload size field 4 GiB-16", lambda: self.b_oversized(-16)),
            c("VU-FRAME-006", "SET_FEATURES with 4 bytes", self.b_short_u64),
            c("VU-FRAME-006", "SET_VRING_NUM with 16 bytes", self.b_long_state),
            c("VU-FRAME-006", "GET_FEATURES with a payload", self.b_payload_on_get),
            c("VU-FRAME-007", "connection cut inside a header", self.b_truncated),
            c("VU-FRAME-008", "fd on GET_FEATURES", self.b_fd_on_get),
            c("VU-FRAME-008", "fd on SET_VRING_NUM", self.b_fd_on_num),
            # negotiation
            c("VU-NEG-001", "protocol features not offered", self.b_no_vf30),
            c("VU-NEG-002", "GET_QUEUE_NUM without MQ", self.b_gate_queue_num),
            c("VU-NEG-002", "RESET_DEVICE without RESET_DEVICE", self.b_gate_reset),
            c("VU-NEG-002", "GET_CONFIG without CONFIG", self.b_gate_config),
            c("VU-NEG-003", "SET_VRING_ENABLE without PROTOCOL_FEATURES", self.b_enable_no_vf30),
            c("VU-NEG-004", "SET_FEATURES with an un-offered bit", self.b_unoffered),
            c("VU-NEG-005", "SET_PROTOCOL_FEATURES un-offered bit", self.b_unoffered_pf),
            c("VU-NEG-006", "INBAND_NOTIFICATIONS alone", self.b_inband),
            # rings
            c("VU-RING-001", "SET_VRING_NUM ring 255", self.b_index_num),
            c("VU-RING-001", "SET_VRING_CALL ring 255", self.b_index_call),
            c("VU-RING-002", "ring size 0", lambda: self.b_ring_size(0)),
            c("VU-RING-002", "ring size 3 (split)", lambda: self.b_ring_size(3)),
            c("VU-RING-002", "ring size 65536", lambda: self.b_ring_size(65536)),
            c("VU-RING-003", "misaligned descriptor table", self.b_misaligned),
            c("VU-RING-003", "unknown SET_VRING_ADDR flag", self.b_addr_flags),
            c("VU-RING-004", "ring addresses outside memory", self.b_addr_outside),
            c("VU-RING-004", "ring addresses before any table", self.b_addr_no_table),
            c("VU-RING-005", "SET_VRING_BASE reserved bits", self.b_base_reserved),
            c("VU-RING-006", "SET_VRING_ENABLE num 2", self.b_enable_two),
            c("VU-RING-007", "SET_VRING_ENDIAN num 2", self.b_endian),
            c("VU-RING-008", "SET_VRING_KICK without fd or no-fd bit", self.b_kick_nofd),
            c("VU-RING-008", "SET_VRING_CALL fd and no-fd bit", self.b_call_both),
            c("VU-RING-008", "SET_VRING_ERR with two fds", self.b_err_two),
            c("VU-RING-005", "unused bits in SET_VRING_KICK", self.b_kick_bits),
            # memory
            c("VU-MEM-001", "SET_MEM_TABLE with 0 regions", self.b_zero_regions),
            c("VU-MEM-001", "SET_MEM_TABLE with 9 regions", self.b_nine_regions),
            c("VU-MEM-002", "SET_MEM_TABLE region without fd", self.b_region_nofd),
            c("VU-MEM-003", "SET_MEM_TABLE size mismatch", self.b_table_size),
            c("VU-MEM-004", "region of size 0", self.b_region_empty),
            c("VU-MEM-004", "region address overflow", self.b_region_overflow),
            c("VU-MEM-005", "overlapping guest addresses", self.b_overlap_gpa),
            c("VU-MEM-005", "overlapping user addresses", self.b_overlap_uva),
            c("VU-MEM-005", "ADD_MEM_REG overlapping a region", self.b_add_overlap),
            c("VU-MEM-006", "ADD_MEM_REG without fd", self.b_add_nofd),
            c("VU-MEM-008", "REM_MEM_REG of an unknown region", self.b_rem_unknown),
            c("VU-MEM-009", "REM_MEM_REG with two fds", self.b_rem_fds),
            c("VU-MEM-010", "SET_LOG_BASE without fd", self.b_log_nofd),
            c("VU-MEM-011", "SET_LOG_FD without fd", self.b_log_fd_nofd),
            c("VU-MEM-011", "SET_BACKEND_REQ_FD without fd", self.b_backend_nofd),
            c("VU-MEM-014", "region larger than its fd", self.b_short_fd),
            # other payloads
            c("VU-PAY-001", "GET_CONFIG size 0", lambda: self.b_config(0)),
            c("VU-PAY-001", "GET_CONFIG size 300", lambda: self.b_config(300)),
            c("VU-PAY-003", "GET_INFLIGHT_FD 0 queues", self.b_inflight),
            c("VU-PAY-004", "SET_STATUS above 0xFF", self.b_status),
            c("VU-PAY-010", "NET_SET_MTU 10", self.b_mtu),
        ]


def selects(case: Case, only: str) -> bool:
    """Whether ``--only`` `only` selects `case`.

    A rule id, or the start of one (``VU-RING-002``, ``VU-MEM``), selects that rule's
    cases. An alias that ``specs/rules.yaml`` declares for a rule (an earlier checklist's
    label) is resolved there and selects the cases of its rule. Any other text selects
    the cases whose title contains it. Letter case never matters.
    """
    wanted = only.strip()
    aliased = rule_for_alias(wanted)
    if aliased is not None:
        return case.rule_id == aliased.id
    if wanted.upper().startswith("VU-"):
        return case.rule_id.startswith(wanted.upper())
    return wanted.lower() in case.title.lower()


def run_suite(
    path: str | os.PathLike[str],
    device: str = "generic",
    *,
    timeout: float = 2.0,
    progress: Progress | None = None,
    only: str | None = None,
) -> Report:
    """Run the suite (or the cases `only` selects) against the back-end at `path`."""
    return BackendSuite(path, device, timeout=timeout, progress=progress).run(only)


def iter_case_names(device: str = "generic") -> Iterator[str]:
    """The names of the cases, in order (for documentation and --list)."""
    suite = BackendSuite("/nonexistent", device)
    return (case.name for case in suite.cases())


__all__ = ["DEVICES", "BackendSuite", "Case", "Skip", "iter_case_names", "run_suite", "selects"]
