"""The documentation site builds in strict mode, and the protocol reference covers every rule."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from vhsm.audit.reference import concerned_requests, rules_markdown
from vhsm.audit.report import AuditFinding, Report
from vhsm.session.rules import all_rules, upstream
from vhsm.specs import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC = "https://qemu-project.gitlab.io/qemu/interop/vhost-user.html"


def test_site_builds_in_strict_mode(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is missing: install the 'docs' extra (make venv does)"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [mkdocs, "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rules_page = (tmp_path / "site" / "reference" / "rules" / "index.html").read_text()
    assert all(f'id="{rid.lower()}"' in rules_page for rid in all_rules())
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "vhsm.backend.VhostUserBackend" in api
    # Docstrings are user-facing here: they cite no section of the private digest.
    assert "§" not in api, "a docstring in the API reference cites a digest section"


def test_rules_page_lists_every_rule_with_an_upstream_link() -> None:
    page = rules_markdown()
    for rid, known in all_rules().items():
        section = page.split(f"### {rid}\n", 1)[1].split("### ", 1)[0]
        assert known.statement in section
        assert f"**{known.severity}**" in section
        assert f"]({known.url})" in section
        assert known.url.startswith(SPEC) or "docs.oasis-open.org" in known.url
    assert "§" not in page


def test_requests_concerned_come_from_statements_and_specs() -> None:
    concerns = concerned_requests()
    assert concerns["VU-NEG-001"] == ["GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES"]
    assert concerns["VU-RING-008"] == ["SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_KICK"]
    # From session.yaml's invalid-state table, not from the statement.
    assert "SET_VRING_KICK" in concerns["VU-STATE-002"]


def test_every_section_key_of_the_specs_maps_upstream() -> None:
    sections = load_spec("upstream")["sections"]
    for known in all_rules().values():
        assert known.section in sections, f"{known.id}: section {known.section} not mapped"
    for entry in load_spec("requests")["frontend"]:
        assert str(entry["section"]) in sections, entry["name"]


def test_unmapped_sections_fall_back_to_their_major_number_or_the_document() -> None:
    assert upstream("7.99") == upstream("7")
    assert upstream("99").url == SPEC


def test_report_lines_link_the_specification_not_a_digest() -> None:
    finding = AuditFinding("VU-RING-001", "index 9 of 2 rings", "front-end", 3, 0.5)
    line = finding.line()
    assert "§" not in line
    assert line.endswith(f"(see {all_rules()['VU-RING-001'].url})")
    doc = Report("t", [finding]).json()
    assert '"spec": "https://' in doc


#: Everything the project ships or publishes: sources, specs, diagrams, docs, README.
CITABLE = (
    [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    + [p for p in sorted((ROOT / "vhsm").rglob("*")) if p.suffix in (".py", ".pyi", ".c")]
    + sorted((ROOT / "specs").glob("*.yaml"))
    + sorted(p for p in (ROOT / "diagrams").iterdir() if p.suffix in (".mmd", ".dot"))
    + sorted((ROOT / "docs").rglob("*.md"))
    + sorted((ROOT / "docs").rglob("*.py"))
)


def test_nothing_the_project_ships_cites_a_digest_section() -> None:
    """No "§" anywhere: section numbers of the private digest mean nothing to a reader.

    Where a reference is needed, the text names a rule id (VU-*) or the upstream
    specification's section by its heading (specs/upstream.yaml).
    """
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in CITABLE
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "§" in line
    ]
    assert len(CITABLE) > 100
    assert offenders == []
