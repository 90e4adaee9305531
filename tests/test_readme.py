"""The README's examples run: the seed example serves I/O, the fixture example passes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

pytest_plugins = ["pytester"]


def example(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README.md lost the {name!r} example"
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
    pytester.makepyfile(test_reverser=example("fixtures"))
    pytester.runpytest("-p", "vhsm", "-q").assert_outcomes(passed=1)
