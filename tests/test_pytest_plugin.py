"""The pytest plugin's fixtures, exercised in a separate pytest run with a ten-line back-end."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

BACKEND = """
from vhsm.backend import VhostUserBackend
from vhsm.wire import ProtocolFeature, VirtioFeature


class Reverser(VhostUserBackend):
    def num_queues(self): return 1
    def max_queue_size(self): return 64
    def features(self): return VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
    def protocol_features(self): return ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ
    def handle_event(self, device_event, evset, vrings, thread_id):
        vring = vrings[0]
        while (chain := vring.pop()) is not None:
            vring.add_used(chain.head, chain.write(chain.read_all()[::-1]))
        vring.signal_used_queue()
"""

TESTS = """
from vhsm.frontend import Frontend


def reverse(fe, data):
    mem, vq = fe.memory, fe.vring(0)
    src, dst = mem.alloc(len(data)), mem.alloc(len(data))
    mem.write(src, data)
    vq.post([(src, len(data))], [(dst, len(data))])
    vq.kick()
    head, length = vq.wait_used()
    return mem.read(dst, length)


def test_started_frontend(frontend):
    fe = frontend(Reverser(), size=16)
    assert reverse(fe, b"abc") == b"cba"
    assert any(r.get("name") == "SET_VRING_ENABLE" for r in fe.transcript)


def test_backend_then_frontend(vhost_user_backend, frontend):
    running = vhost_user_backend(Reverser())
    fe = frontend(running, start=False)
    assert isinstance(fe, Frontend) and fe.transcript[-1]["event"] == "open"
    fe.start(queues=1, size=8, owner_first=True)
    assert reverse(fe, b"xyz") == b"zyx"


def test_socket_path_target(vhost_user_backend, frontend):
    running = vhost_user_backend(Reverser())
    fe = frontend(str(running.path), size=8, record_path=None)
    assert reverse(fe, b"path") == b"htap"


def test_client_mode(vhost_user_backend, frontend):
    running = vhost_user_backend(Reverser(), client=True)
    assert running.client_mode
    fe = frontend(running, size=8)
    assert reverse(fe, b"client") == b"tneilc"
"""


def test_fixtures_drive_a_user_backend(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(BACKEND)
    pytester.makepyfile(
        TESTS.replace("from vhsm.frontend", "from conftest import Reverser\nfrom vhsm.frontend")
    )
    result = pytester.runpytest_subprocess("-q")  # the plugin loads through its entry point
    result.assert_outcomes(passed=4)
