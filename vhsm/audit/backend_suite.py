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
from vhsm.transport import PeerClosed
from vhsm.wire import (
    VirtioFeature,
)


class BackendSuite(Scenarios, BadInputs):
    """The active suite against the back-end listening at `path` (see `SuiteCore` for args)."""

    # --- running ------------------------------------------------------------------------
    def run(self, only: str | None = None) -> Report:
        """Run every case (or those whose name contains `only`); return the report.

        The first case asks GET_FEATURES and GET_PROTOCOL_FEATURES: if the
        back-end wedges or crashes there, nothing else can be judged and the
        suite stops.
        """
        report = Report(f"back-end at {self.path} (device {self.device})")
        cases = [case for case in self.cases() if only is None or only.lower() in case.name.lower()]
        if only is not None and not cases:
            raise VhsmError(f"--only {only!r} matches no case (run without --only to list them)")
        first = self._run_case(Case("GET_FEATURES is answered", "VU-FRAME-010", self.s_discover))
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
        return CaseResult(case.name, case.rule_id, outcome, detail, time.monotonic() - start)

    # --- the case list ---------------------------------------------------------------------
    def cases(self) -> list[Case]:
        """Every case, scenarios first."""
        c = Case
        return [
            # scenarios
            c("negotiation, QEMU's order", "VU-STATE-001", self.s_qemu_order),
            c("negotiation, SET_OWNER first", "VU-STATE-001", self.s_owner_first),
            c("protocol features before SET_OWNER", "VU-NEG-001", self.s_protocol_first),
            c("renegotiation after stopping the rings", "VU-STATE-001", self.s_renegotiate),
            c("memory table replaced while running", "VU-STATE-001", self.s_mem_replace),
            c("ADD_MEM_REG / REM_MEM_REG", "VU-STATE-001", self.s_add_rem),
            c("ring stop/start cycles", "VU-STATE-009", self.s_ring_cycles),
            c("disabled ring has no side effects", "VU-STATE-008", self.s_disabled_ring),
            c("enable/disable cycles", "VU-STATE-001", self.s_enable_cycles),
            c("RESET_DEVICE and re-initialisation", "VU-STATE-001", self.s_reset),
            c("status byte round trip", "VU-STATE-001", self.s_status),
            c("config space read", "VU-PAY-009", self.s_config),
            c("reconnect and resume", "VU-STATE-011", self.s_reconnect),
            c(f"data round trip ({self.device})", "VU-STATE-011", self.s_data),
            c("acks every NEED_REPLY request", "VU-REQ-002", self.s_acks),
            # framing
            c("F1 version bits 0", "VU-FRAME-001", lambda: self.b_flags(0x0)),
            c("F1 version bits 2", "VU-FRAME-001", lambda: self.b_flags(0x2)),
            c("F2 reserved flag bits set", "VU-FRAME-002", lambda: self.b_flags(0x11)),
            c("F3 REPLY flag on a request", "VU-FRAME-003", lambda: self.b_flags(0x5)),
            c("F4 unknown request code (99)", "VU-FRAME-004", self.b_unknown),
            c("F4 request code 0", "VU-FRAME-004", self.b_code_zero),
            c("F4 unknown request without NEED_REPLY", "VU-REQ-001", self.b_unknown_silent),
            c("F5 payload size field 64 KiB", "VU-FRAME-005", lambda: self.b_oversized(1 << 16)),
            c("F5 payload size field 4 GiB-16", "VU-FRAME-005", lambda: self.b_oversized(-16)),
            c("F6 SET_FEATURES with 4 bytes", "VU-FRAME-006", self.b_short_u64),
            c("F6 SET_VRING_NUM with 16 bytes", "VU-FRAME-006", self.b_long_state),
            c("F6 GET_FEATURES with a payload", "VU-FRAME-006", self.b_payload_on_get),
            c("F7 connection cut inside a header", "VU-FRAME-007", self.b_truncated),
            c("F8 fd on GET_FEATURES", "VU-FRAME-008", self.b_fd_on_get),
            c("F8 fd on SET_VRING_NUM", "VU-FRAME-008", self.b_fd_on_num),
            # negotiation
            c("N1 protocol features not offered", "VU-NEG-001", self.b_no_vf30),
            c("N2 GET_QUEUE_NUM without MQ", "VU-NEG-002", self.b_gate_queue_num),
            c("N2 RESET_DEVICE without RESET_DEVICE", "VU-NEG-002", self.b_gate_reset),
            c("N2 GET_CONFIG without CONFIG", "VU-NEG-002", self.b_gate_config),
            c("N3 SET_VRING_ENABLE without VF 30", "VU-NEG-003", self.b_enable_no_vf30),
            c("N4 SET_FEATURES with an un-offered bit", "VU-NEG-004", self.b_unoffered),
            c("N5 SET_PROTOCOL_FEATURES un-offered bit", "VU-NEG-005", self.b_unoffered_pf),
            c("N6 INBAND_NOTIFICATIONS alone", "VU-NEG-006", self.b_inband),
            # rings
            c("R1 SET_VRING_NUM ring 255", "VU-RING-001", self.b_index_num),
            c("R1 SET_VRING_CALL ring 255", "VU-RING-001", self.b_index_call),
            c("R2 ring size 0", "VU-RING-002", lambda: self.b_ring_size(0)),
            c("R2 ring size 3 (split)", "VU-RING-002", lambda: self.b_ring_size(3)),
            c("R2 ring size 65536", "VU-RING-002", lambda: self.b_ring_size(65536)),
            c("R3 misaligned descriptor table", "VU-RING-003", self.b_misaligned),
            c("R3 unknown SET_VRING_ADDR flag", "VU-RING-003", self.b_addr_flags),
            c("R4 ring addresses outside memory", "VU-RING-004", self.b_addr_outside),
            c("R4 ring addresses before any table", "VU-RING-004", self.b_addr_no_table),
            c("R5 SET_VRING_BASE reserved bits", "VU-RING-005", self.b_base_reserved),
            c("R6 SET_VRING_ENABLE num 2", "VU-RING-006", self.b_enable_two),
            c("R7 SET_VRING_ENDIAN num 2", "VU-RING-007", self.b_endian),
            c("R8 SET_VRING_KICK without fd or no-fd bit", "VU-RING-008", self.b_kick_nofd),
            c("R8 SET_VRING_CALL fd and no-fd bit", "VU-RING-008", self.b_call_both),
            c("R8 SET_VRING_ERR with two fds", "VU-RING-008", self.b_err_two),
            c("R8 unused bits in SET_VRING_KICK", "VU-RING-005", self.b_kick_bits),
            # memory
            c("M1 SET_MEM_TABLE with 0 regions", "VU-MEM-001", self.b_zero_regions),
            c("M1 SET_MEM_TABLE with 9 regions", "VU-MEM-001", self.b_nine_regions),
            c("M2 SET_MEM_TABLE region without fd", "VU-MEM-002", self.b_region_nofd),
            c("M3 SET_MEM_TABLE size mismatch", "VU-MEM-003", self.b_table_size),
            c("M4 region of size 0", "VU-MEM-004", self.b_region_empty),
            c("M4 region address overflow", "VU-MEM-004", self.b_region_overflow),
            c("M5 overlapping guest addresses", "VU-MEM-005", self.b_overlap_gpa),
            c("M5 overlapping user addresses", "VU-MEM-005", self.b_overlap_uva),
            c("M5 ADD_MEM_REG overlapping a region", "VU-MEM-005", self.b_add_overlap),
            c("M6 ADD_MEM_REG without fd", "VU-MEM-006", self.b_add_nofd),
            c("M8 REM_MEM_REG of an unknown region", "VU-MEM-008", self.b_rem_unknown),
            c("M9 REM_MEM_REG with two fds", "VU-MEM-009", self.b_rem_fds),
            c("M10 SET_LOG_BASE without fd", "VU-MEM-010", self.b_log_nofd),
            c("M11 SET_LOG_FD without fd", "VU-MEM-011", self.b_log_fd_nofd),
            c("M11 SET_BACKEND_REQ_FD without fd", "VU-MEM-011", self.b_backend_nofd),
            c("M14 region larger than its fd", "VU-MEM-014", self.b_short_fd),
            # other payloads
            c("P1 GET_CONFIG size 0", "VU-PAY-001", lambda: self.b_config(0)),
            c("P1 GET_CONFIG size 300", "VU-PAY-001", lambda: self.b_config(300)),
            c("P3 GET_INFLIGHT_FD 0 queues", "VU-PAY-003", self.b_inflight),
            c("P4 SET_STATUS above 0xFF", "VU-PAY-004", self.b_status),
            c("P10 NET_SET_MTU 10", "VU-PAY-010", self.b_mtu),
        ]


def run_suite(
    path: str | os.PathLike[str],
    device: str = "generic",
    *,
    timeout: float = 2.0,
    progress: Progress | None = None,
    only: str | None = None,
) -> Report:
    """Run the suite (or the cases whose name contains `only`) against the back-end at `path`."""
    return BackendSuite(path, device, timeout=timeout, progress=progress).run(only)


def iter_case_names(device: str = "generic") -> Iterator[str]:
    """The names of the cases, in order (for documentation and --list)."""
    suite = BackendSuite("/nonexistent", device)
    return (case.name for case in suite.cases())


__all__ = ["DEVICES", "BackendSuite", "Case", "Skip", "iter_case_names", "run_suite"]
