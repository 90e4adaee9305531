"""The documented examples run.

README's seed example serves I/O; the fixture example of the testing how-to
passes; and the tutorial, followed literally, gives a device whose own test
passes and which passes `vhsm audit backend`.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TUTORIAL = ROOT / "docs" / "tutorial.md"
TEST_HOWTO = ROOT / "docs" / "howto" / "test.md"

pytest_plugins = ["pytester"]


def example(name: str, page: Path = README) -> str:
    text = page.read_text(encoding="utf-8")
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"{page.relative_to(ROOT)} lost the {name!r} example"
    return match.group(1)


@pytest.mark.parametrize("event_idx", [True, False])
def test_seed_example_serves_random_bytes(frontend: Any, event_idx: bool) -> None:
    from vhsm.wire import VirtioFeature

    namespace: dict[str, Any] = {"__name__": "readme_seed"}
    exec(compile(example("seed"), "README.md:seed", "exec"), namespace)
    service = namespace["RandomService"]()
    features = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
    if event_idx:
        features |= VirtioFeature.RING_EVENT_IDX
    fe = frontend(service, size=32, features=int(features))
    assert service.event_idx is event_idx
    vq, mem = fe.vring(0), fe.memory
    bufs = [mem.alloc(64) for _ in range(8)]
    for buf in bufs:
        vq.post([], [(buf, 64)])
    vq.kick()
    assert {vq.wait_used()[1] for _ in bufs} == {64}
    assert all(mem.read(buf, 64) != bytes(64) for buf in bufs)


def test_fixture_example_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_reverser=example("fixtures", TEST_HOWTO))
    pytester.runpytest("-p", "vhsm", "-q").assert_outcomes(passed=1)


def test_tutorial_device_passes_its_own_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(seeded_rng=example("tutorial-device", TUTORIAL))
    pytester.makepyfile(test_seeded_rng=example("tutorial-test", TUTORIAL))
    pytester.syspathinsert()
    pytester.runpytest("-p", "vhsm", "-q").assert_outcomes(passed=2)


def test_tutorial_device_passes_the_backend_audit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the tutorial says: `vhsm serve seeded_rng:SeededRng`, then `vhsm audit backend`."""
    from vhsm.cli import main
    from vhsm.frontend import Frontend

    (tmp_path / "seeded_rng.py").write_text(example("tutorial-device", TUTORIAL))
    with tempfile.TemporaryDirectory(prefix="vhsm-tut-", dir="/tmp") as short:
        path = Path(short) / "seeded-rng.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhsm", "serve", "seeded_rng:SeededRng", "--socket", str(path)],
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            Frontend.connect(path, retry_for=20.0).close()  # wait until it listens
            status = main(["audit", "backend", "--socket", str(path), "--device", "rng"])
            out = capsys.readouterr().out
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20.0)
    assert status == 0, out
    assert "verdict: PASS" in out
    assert proc.returncode == 0, err
    assert "Traceback" not in err
