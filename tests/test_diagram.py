"""Tests of vhsm.diagram and `vhsm diagram`: golden files, labels, errors, transcript replay."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from vhsm import diagram, diagram_trace
from vhsm import diagram_overview as overview
from vhsm.audit.trace import RecordedBackend
from vhsm.audit.transcript import load_transcript
from vhsm.cli import main
from vhsm.diagram_trace import trace_sequence
from vhsm.errors import VhsmError
from vhsm.session.machines import composition, load_machine_spec

ROOT = Path(__file__).resolve().parent.parent
DIAGRAMS = ROOT / "diagrams"
DATA = ROOT / "tests" / "data"
REGENERATE = "`vhsm diagram --format all --out diagrams` (or `make diagrams`)"
TRACES = {"qemu72-blk-sequence.mmd": DATA / "qemu72-blk.jsonl"}

needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None,
    reason="Graphviz's dot program is not installed (apt-get install graphviz)",
)


def _committed(name: str) -> str:
    path = DIAGRAMS / name
    assert path.is_file(), f"diagrams/{name} is missing: run {REGENERATE}"
    return path.read_text(encoding="utf-8")


def _trace_text(path: Path) -> str:
    return trace_sequence(load_transcript(path), title=path.name)


# --- golden files -------------------------------------------------------------------------


@pytest.mark.parametrize("machine", diagram.MACHINES)
@pytest.mark.parametrize("fmt", ["mermaid", "dot"])
def test_committed_diagram_is_current(machine: str, fmt: str) -> None:
    name = diagram.file_name(machine, fmt)
    fresh = diagram.render(machine, fmt).decode("utf-8")
    assert fresh == _committed(name), (
        f"diagrams/{name} is stale (specs/{machine}.yaml or vhsm/diagram.py changed): "
        f"run {REGENERATE}"
    )


@pytest.mark.parametrize("machine", diagram.MACHINES)
def test_committed_svg_was_rendered_from_current_dot_source(machine: str) -> None:
    # dot's SVG differs between Graphviz versions; the digest of its dot source does not.
    svg = _committed(diagram.file_name(machine, "svg"))
    dot = diagram.render(machine, "dot").decode("utf-8")
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert diagram.svg_source_digest(svg) == diagram.dot_digest(dot), (
        f"diagrams/{machine}.svg was not rendered from the current dot source: run {REGENERATE}"
    )


@pytest.mark.parametrize("name", sorted(TRACES))
def test_committed_sequence_diagram_is_current(name: str) -> None:
    trace = TRACES[name]
    command = f"vhsm diagram --trace {trace.relative_to(ROOT)} --out diagrams"
    assert _trace_text(trace) == _committed(name), f"diagrams/{name} is stale: run `{command}`"


def test_diagrams_directory_holds_only_generated_files() -> None:
    expected = {
        diagram.file_name(machine, fmt)
        for machine in diagram.MACHINES
        for fmt in diagram.ALL_FORMATS
    } | set(TRACES)
    assert {p.name for p in DIAGRAMS.iterdir()} == expected


# --- what the state diagrams say ------------------------------------------------------------


MACHINES = [m for m in diagram.MACHINES if m != "session"]


@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("engine", diagram.ENGINES)
def test_every_declared_transition_is_drawn(machine: str, engine: str) -> None:
    spec = load_machine_spec(machine)
    text = diagram.machine_source(machine, engine)
    inside = diagram.internal_requests(spec)
    for declared in spec.transitions:
        label = diagram.request_label(declared["trigger"], declared.get("conditions", []))
        if declared.get("dest") is None:
            for state in spec.sources(declared):
                assert any(
                    item.startswith(declared["trigger"].upper()) for item in inside[state.name]
                )
        else:
            assert label in text, f"{machine}: edge label {label!r} missing ({engine})"
    for state in spec.states:
        assert diagram.state_label(spec, state) in text


@pytest.mark.parametrize("engine", diagram.ENGINES)
def test_overview_has_one_region_per_machine_and_the_set_up_order(engine: str) -> None:
    text = diagram.machine_source("session", engine)
    for spec in composition().specs:
        assert spec.name in text and "§" not in text
        for state in spec.states:
            assert f"{spec.name}_{state.name}" in text or f"{spec.name}.{state.name}" in text
    for step in composition().setup:
        assert step in text
    assert "NEGOTIATING" in text and "RUNNING" in text


def test_overview_mermaid_uses_concurrent_regions() -> None:
    text = diagram.machine_source("session", "mermaid")
    assert text.count("\n    --\n") == len(composition().machines) - 1
    assert "features_UNSET --> features_ACKED : SET_FEATURES" in text
    assert "vring_STOPPED_DISABLED --> vring_STARTED_DISABLED : SET_VRING_KICK | VRING_KICK" in text
    # requests that leave a machine where it is stay in that machine's own diagram
    assert "GET_FEATURES" not in text.split("note right of session")[0]


def _front_matter(text: str) -> object:
    """The YAML front matter of a mermaid document, parsed as mermaid parses it."""
    lines = text.splitlines()
    assert lines[0] == "---", text[:80]
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end]))


@pytest.mark.parametrize("machine", diagram.MACHINES)
def test_mermaid_front_matter_is_yaml_naming_the_diagram(machine: str) -> None:
    """Mermaid refuses a document whose front matter is not YAML (a ": " in a plain title)."""
    text = diagram.machine_source(machine, "mermaid")
    spec_title = overview.TITLE if machine == "session" else f"vhsm {machine} machine"
    assert _front_matter(text) == {"title": spec_title}


def test_trace_title_survives_any_file_name() -> None:
    name = 'odd: name #1 "quoted".jsonl'
    text = trace_sequence(load_transcript(DATA / "qemu72-blk.jsonl"), title=name)
    assert _front_matter(text) == {"title": 'odd: name no.1 "quoted".jsonl'}


@pytest.mark.parametrize("machine", [spec.name for spec in composition().specs])
def test_no_state_loops_on_itself(machine: str) -> None:
    """A request that leaves a state where it is is listed in the state, never drawn as a loop.

    Mermaid lays a loop's label over the labels of the edges beside it.
    """
    text = diagram.machine_source(machine, "mermaid")
    for state in load_machine_spec(machine).states:
        assert f"  {state.name} --> {state.name}:" not in text, (machine, state.name)
    features = diagram.machine_source("features", "mermaid")
    assert "UNSET : GET_FEATURES, RESET_DEVICE" in features


@pytest.mark.parametrize("engine", diagram.ENGINES)
def test_diagrams_cite_no_digest_sections(engine: str) -> None:
    """Titles are names: a "§7.4" would point into a document users do not have."""
    for name in ["session", *(spec.name for spec in composition().specs)]:
        text = diagram.machine_source(name, engine)
        assert "§" not in text, f"{name} ({engine}) cites a section"
    vring = diagram.machine_source("vring", "graphviz")
    assert 'STARTED_ENABLED [label="STARTED_ENABLED\\n' in vring


def test_edges_name_request_and_condition() -> None:
    features = diagram.machine_source("features", "mermaid")
    assert "UNSET --> ACKED: SET_FEATURES [acks_offered_bits" in features
    assert "[*] --> UNSET" in features
    vring = diagram.machine_source("vring", "graphviz")
    assert (
        'STOPPED_DISABLED -> STOPPED_ENABLED [label="SET_VRING_ENABLE [enable_requested & '
        'features_acked_first]\\nSET_FEATURES [lacks_protocol_features]"]'
    ) in vring
    assert "__initial__ -> STOPPED_DISABLED" in vring


def test_internal_transitions_are_listed_inside_states_not_drawn_as_loops() -> None:
    features = diagram.machine_source("features", "mermaid")
    assert "[internal]" not in features
    # GET_FEATURES is internal everywhere: no edge carries it, every state lists it.
    edges = [line for line in features.splitlines() if "-->" in line]
    assert not any("GET_FEATURES" in edge for edge in edges)
    for state in ("UNSET", "ACKED"):
        described = " ".join(
            line.split(":", 1)[1]
            for line in features.splitlines()
            if line.strip().startswith(f"{state} :")
        )
        assert "GET_FEATURES" in described
    # Selectors are shown inside states; rule checks are left to the edges and rules.
    inside = diagram.internal_requests(load_machine_spec("features"))
    assert "SET_FEATURES [rings_running]" in inside["ACKED"]
    assert "SET_FEATURES" not in " ".join(inside["UNSET"])


@pytest.mark.parametrize("engine", diagram.ENGINES)
def test_output_is_deterministic_and_unstyled(engine: str) -> None:
    first = diagram.machine_source("session", engine)
    assert first == diagram.machine_source("session", engine)
    for marker in ("s_active", "s_previous", "darksalmon", "azure", "color=red", "color=blue"):
        assert marker not in first


def test_unknown_graph_engine_is_refused_not_silently_mermaid() -> None:
    with pytest.raises(VhsmError, match="unknown graph engine 'graphvis'"):
        diagram.DiagramMachine(load_machine_spec("vring"), "graphvis")


@given(st.lists(st.text(alphabet="ABCDEFGHIJ_[]& ", min_size=1, max_size=70), max_size=30))
def test_wrap_items_keeps_every_item_in_order(items: list[str]) -> None:
    lines = diagram.wrap_items(items, width=40)
    assert ", ".join(lines).replace(",, ", ", ") == ", ".join(items)
    for line in lines:
        assert len(line.rstrip(",")) <= 40 or ", " not in line.rstrip(",")


# --- rendering with dot ---------------------------------------------------------------------


@needs_dot
@pytest.mark.parametrize("fmt", ["svg", "png"])
def test_render_with_dot(fmt: str) -> None:
    data = diagram.render("vring", fmt)
    if fmt == "png":
        assert data.startswith(b"\x89PNG")
    else:
        svg = data.decode("utf-8")
        dot = diagram.render("vring", "dot").decode("utf-8")
        assert diagram.svg_source_digest(svg) == diagram.dot_digest(dot)
        assert "STOPPED_DISABLED" in svg


def test_missing_dot_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "out"
    assert main(["diagram", "--format", "all", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "apt-get install graphviz" in err and "`dot`" in err
    assert not out.exists(), "nothing is written when dot is missing"
    with pytest.raises(VhsmError, match="apt-get install graphviz"):
        diagram.render_dot("digraph {}", "svg")


# --- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "jpeg"], "unknown format 'jpeg' (choose mermaid, dot, svg, png, all)"),
        (["--machine", "ring"], "unknown machine 'ring' (choose session, ownership,"),
        (["--format", "all"], "several diagrams make several files: give --out DIR"),
        (["--machine", "all"], "several diagrams make several files: give --out DIR"),
        (["--trace", "x.jsonl", "--format", "dot"], "--trace draws a mermaid sequence diagram"),
        (["--trace", "x.jsonl", "--machine", "vring"], "--machine does not apply to --trace"),
        (["--trace", "/nonexistent/x.jsonl"], "cannot read transcript /nonexistent/x.jsonl"),
    ],
)
def test_cli_errors_are_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diagram", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("vhsm diagram: ")
    assert message in captured.err
    assert captured.out == ""


def test_cli_prints_one_mermaid_document_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagram"]) == 0
    out = capsys.readouterr().out
    assert out == _committed("session.mmd")  # the overview alone: one valid document
    assert out.count("stateDiagram-v2") == 1
    assert main(["diagram", "--machine", "vring", "--format", "dot"]) == 0
    assert capsys.readouterr().out == _committed("vring.dot")


@needs_dot
def test_cli_format_all_regenerates_the_committed_files(tmp_path: Path) -> None:
    assert main(["diagram", "--format", "all", "--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(
        f"{m}.{ext}" for m in diagram.MACHINES for ext in ("dot", "mmd", "svg")
    )
    for machine in diagram.MACHINES:
        for ext in ("mmd", "dot"):
            name = f"{machine}.{ext}"
            assert (tmp_path / name).read_text(encoding="utf-8") == _committed(name)
    for machine in diagram.MACHINES:
        svg = (tmp_path / f"{machine}.svg").read_text(encoding="utf-8")
        assert diagram.svg_source_digest(svg) == diagram.svg_source_digest(
            _committed(f"{machine}.svg")
        )


def test_cli_trace_writes_sequence_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = DATA / "qemu72-blk.jsonl"
    assert main(["diagram", "--trace", str(trace), "--out", str(tmp_path)]) == 0
    written = tmp_path / "qemu72-blk-sequence.mmd"
    assert capsys.readouterr().out.strip() == str(written)
    assert written.read_text(encoding="utf-8") == _committed("qemu72-blk-sequence.mmd")
    assert main(["diagram", "--trace", str(trace)]) == 0
    assert capsys.readouterr().out == _committed("qemu72-blk-sequence.mmd")


# --- transcripts as sequence diagrams -------------------------------------------------------


def test_qemu_blk_sequence_shows_messages_and_state_changes() -> None:
    text = _trace_text(DATA / "qemu72-blk.jsonl")
    lines = text.splitlines()
    assert lines[3] == "sequenceDiagram"
    assert "  Note over B: session NEGOTIATING, 1 ring STOPPED_DISABLED" in lines
    assert "  F->>B: GET_FEATURES" in lines
    assert (
        "  B-->>F: GET_FEATURES bit1 | bit2 | bit6 | bit9 | bit10 | bit11 | bit12 | bit13 | "
        "bit14 | NOTIFY_ON_EMPTY | LOG_ALL | RING_INDIRECT_DESC | RING_EVENT_IDX | "
        "PROTOCOL_FEATURES | VERSION_1" in lines
    )
    assert "  F->>B: SET_BACKEND_REQ_FD +1 fd (need reply)" in lines
    kick = lines.index("  F->>B: SET_VRING_KICK ring 0 +1 fd")
    assert lines[kick + 1] == (
        "  Note over B: ring 0: STOPPED_DISABLED → STARTED_DISABLED<br/>"
        "session: SUSPENDED → RUNNING"
    )
    features = lines.index(
        "  F->>B: SET_FEATURES bit1 | bit2 | bit6 | PROTOCOL_FEATURES | VERSION_1"
    )
    assert lines[features + 1] == (
        "  Note over B: features: UNSET → ACKED<br/>session: NEGOTIATING → SUSPENDED"
    )
    stop = lines.index("  B-->>F: GET_VRING_BASE ring 0 num 132")
    assert lines[stop - 1] == (
        "  Note over B: ring 0: STARTED_DISABLED → STOPPED_DISABLED<br/>"
        "session: RUNNING → SUSPENDED"
    )
    assert lines[-1] == "  Note over F,B: connection 1 closed by front-end (eof)"
    # The real QEMU session breaks no rule.
    assert not any("VU-" in line for line in lines)
    # Every recorded message is one arrow.
    records = load_transcript(DATA / "qemu72-blk.jsonl")
    arrows = [line for line in lines if "->>" in line]
    assert len(arrows) == sum(1 for r in records if r.message is not None)


def test_dpdk_net_sequence_has_two_rings_without_get_queue_num() -> None:
    records = load_transcript(DATA / "dpdk2211-net.jsonl")
    backend = RecordedBackend(records)
    assert backend.num_queues() == 2
    assert backend.features() == 0xD7C66E7CB
    assert backend.protocol_features() == 0x10CBF
    text = trace_sequence(records)
    assert not text.startswith("---")
    assert "Note over B: session NEGOTIATING, 2 rings STOPPED_DISABLED" in text
    assert "Note over B: ring 1: STOPPED_DISABLED → STARTED_DISABLED" in text
    assert "F->>B: SET_MEM_TABLE 1 region +1 fd (need reply)" in text


def test_replay_backend_offers_the_recorded_answers() -> None:
    backend = RecordedBackend(load_transcript(DATA / "qemu72-blk.jsonl"))
    assert backend.features() == 0x175007E46
    assert backend.protocol_features() == 0x8F2B
    assert backend.queue_num() == backend.num_queues() == 1
    assert backend.max_mem_slots() == 32


def test_replay_substitute_fds_are_all_closed() -> None:
    before = set(os.listdir("/proc/self/fd"))
    _trace_text(DATA / "qemu72-blk.jsonl")
    _trace_text(DATA / "dpdk2211-net.jsonl")
    assert set(os.listdir("/proc/self/fd")) <= before


def _message(name: str, req: int, payload: str = "", nfds: int = 0, flags: str = "0x1") -> str:
    size = len(payload) // 2
    record = {
        "t": 0.0,
        "conn": 7,
        "dir": "F>B",
        "req": req,
        "name": name,
        "flags": flags,
        "reply": False,
        "need_reply": False,
        "size": size,
        "nfds": nfds,
        "payload": payload,
    }
    return json.dumps(record)


def test_violations_become_notes_with_rule_ids(tmp_path: Path) -> None:
    trace = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"conn": 7, "event": "open"}),
        # SET_VRING_NUM before SET_FEATURES: the session is still NEGOTIATING.
        _message("SET_VRING_NUM", 8, "0000000080000000"),
        # SET_VRING_ENABLE with num 2: the payload itself is wrong.
        _message("SET_VRING_ENABLE", 18, "0000000002000000"),
    ]
    trace.write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = _trace_text(trace).splitlines()
    assert "  Note over F,B: connection 7 opened" in text
    num = text.index("  F->>B: SET_VRING_NUM ring 0 num 128")
    assert text[num + 1].startswith(
        "  Note over B: VU-STATE-002: expected: SET_FEATURES came first"
    )
    enable = text.index("  F->>B: SET_VRING_ENABLE (malformed, VU-RING-006)")
    assert text[enable + 1].startswith("  Note over B: VU-RING-006: ")
    assert all(";" not in line for line in text)


def test_transcript_errors_name_the_line(tmp_path: Path) -> None:
    trace = tmp_path / "broken.jsonl"
    trace.write_text('{"event": "open", "conn": 1}\n{not json\n', encoding="utf-8")
    with pytest.raises(VhsmError, match=r"broken.jsonl:2: not JSON"):
        load_transcript(trace)
    trace.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(VhsmError, match=r"broken.jsonl:1: a record must be a JSON object"):
        load_transcript(trace)


def test_text_is_made_safe_for_mermaid() -> None:
    assert diagram_trace._text("a;b #1 <x>\nc") == "a,b no.1 \u2039x\u203a c"


def test_design_page_embeds_the_current_diagrams() -> None:
    """docs/design.md's mermaid copies match diagrams/ (they render on the site and forges)."""
    page = Path(__file__).resolve().parent.parent / "docs" / "design.md"
    text = page.read_text(encoding="utf-8")
    for machine in diagram.MACHINES:
        marker = f"<!-- embed: diagrams/{machine}.mmd -->\n```mermaid\n"
        assert marker in text, f"docs/design.md lost the embedded {machine} diagram"
        embedded = text.split(marker, 1)[1].split("```\n", 1)[0]
        assert embedded == _committed(f"{machine}.mmd"), (
            f"docs/design.md embeds a stale diagrams/{machine}.mmd: paste the file's contents"
        )


def test_cli_png_refuses_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert main(["diagram", "--machine", "vring", "--format", "png"]) == 2
    captured = capsys.readouterr()
    assert "png is binary: give --out DIR or redirect the output to a file" in captured.err
    assert captured.out == ""
