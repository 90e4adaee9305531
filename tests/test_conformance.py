"""The conformance matrix script: its table from audit reports, and the committed page."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from vhsm.session.rules import all_rules

ROOT = Path(__file__).resolve().parent.parent


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "vhsm_conformance", ROOT / "conformance" / "run.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_table_marks_broken_held_skipped_and_unseen_rules() -> None:
    run = load()
    backend = run.Result("peer A", "back-end", "peer-a --socket s", version="A 1.0")
    backend.report = {
        "verdict": "fail",
        "cases": [
            {"name": "VU-FRAME-001 header version bits 0", "rule_id": "VU-FRAME-001",
             "outcome": "fail"},
            {"name": "VU-FRAME-002 reserved header flag bits set", "rule_id": "VU-FRAME-002",
             "outcome": "pass"},
            {"name": "VU-NEG-002 x", "rule_id": "VU-NEG-002", "outcome": "skipped"},
        ],
        "findings": [
            {"rule_id": "VU-FRAME-001", "severity": "MUST", "detail": "fail: accepted",
             "case": "VU-FRAME-001 header version bits 0", "request": "-", "state": "-"},
        ],
    }  # fmt: skip
    frontend = run.Result("peer B", "front-end", "peer-b", report={"verdict": "pass"})
    missing = run.Result("peer C", "back-end", "", problem="peer-c not found")
    page = run.markdown([backend, frontend, missing], "today")
    cells = run.cells(backend)
    assert cells["VU-FRAME-001"] == "✗" and cells["VU-FRAME-002"] == "✓"
    assert cells["VU-NEG-002"] == "skip" and cells["VU-MEM-001"] == ""
    assert set(run.cells(frontend).values()) == {"·"}
    for rule_id in all_rules():
        assert f"| {rule_id} | {all_rules()[rule_id].severity} |" in page
    assert "| peer A | back-end | A 1.0 | FAIL | 1 / 0 / 0 | 3 run, 1 failed, 1 skipped |" in page
    assert "- peer C: peer-c not found" in page
    assert (
        "**MUST** VU-FRAME-001 (case *VU-FRAME-001 header version bits 0*): fail: accepted" in page
    )


def test_the_committed_matrix_is_in_the_docs() -> None:
    page = (ROOT / "docs" / "reference" / "conformance.md").read_text(encoding="utf-8")
    assert "make conformance" in page
    assert "## Rules by implementation" in page
    assert "qemu-storage-daemon" in page and "DPDK" in page
