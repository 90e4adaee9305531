"""The real-guest tests of test_guest_qsd.py, with `vhsm serve` as the back-end.

A Linux guest under QEMU drives `vhsm serve blk` (a raw image) and `vhsm serve rng`
through vhost-user-blk-pci and vhost-user-rng-pci; the host then checks the image.
`vhsm serve net` (loopback and sink, one NIC each in one boot) is driven through
virtio-net-pci on a vhost-user netdev; the guest's interface counters are checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest.harness import (
    BackendProcess,
    GuestEnv,
    GuestResult,
    boot_guest,
    require_guest_env,
    running_backend,
    short_socket_dir,
    vhost_user_blk,
    vhost_user_net,
    vhost_user_rng,
)
from guest.initramfs import VIRTIO_MODULES
from guest.scripts import (
    VIRTIO_F_RING_PACKED,
    BlkPlan,
    NetNic,
    check_net_result,
    check_rng_result,
    guest_virtio_features,
    net_script,
    rng_script,
)
from guest.serve import VHSM, require_serve, serve_blk_argv
from guest.writers import WriterPlan

from vhsm.audit.trace import audit_trace
from vhsm.audit.transcript import load_transcript

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]


def serve_rng_argv(socket: Path) -> list[str]:
    return [*VHSM, "serve", "rng", "--socket", str(socket)]


def serve_net_argv(socket: Path, mode: str) -> list[str]:
    return [*VHSM, "serve", "net", "--socket", str(socket), "--mode", mode]


@pytest.fixture
def guest_env() -> GuestEnv:
    return require_guest_env()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_socket_dir() as path:
        yield path


@pytest.fixture
def vhsm_blk() -> None:
    require_serve("blk")


@pytest.fixture
def vhsm_net() -> None:
    require_serve("net")


@pytest.fixture
def vhsm_rng() -> None:
    require_serve("rng")


def assert_backend_clean(result: GuestResult, *backends: BackendProcess) -> None:
    """No Python traceback in a back-end's log (a worker thread may die quietly)."""
    for backend in backends:
        assert "Traceback" not in backend.log(), result.report()


def run_blk(
    guest_env: GuestEnv, tmp_path: Path, sock_dir: Path, *, packed: bool = False
) -> GuestResult:
    plan = BlkPlan()
    image = plan.prepare_image(tmp_path / "disk.img")
    sock = sock_dir / "blk.sock"
    with running_backend(serve_blk_argv(image, sock), sock, tmp_path / "vhsm-blk.log") as be:
        result = boot_guest(
            guest_env,
            script=plan.script(),
            devices=[vhost_user_blk(sock, packed="on" if packed else "off")],
            backends=[be],
            workdir=tmp_path / "guest",
        )
    result.assert_passed()
    assert result.values["blk"] == "ok"
    assert plan.verify_image(image, result) == [r.name for r in plan.regions]
    assert_backend_clean(result, be)
    return result


@pytest.mark.usefixtures("vhsm_blk")
def test_blk_guest_against_vhsm(guest_env: GuestEnv, tmp_path: Path, sock_dir: Path) -> None:
    result = run_blk(guest_env, tmp_path, sock_dir)
    assert not guest_virtio_features(result) & (1 << VIRTIO_F_RING_PACKED)


@pytest.mark.usefixtures("vhsm_blk")
def test_blk_guest_against_vhsm_packed_ring(
    guest_env: GuestEnv, tmp_path: Path, sock_dir: Path
) -> None:
    # packed=on only lets QEMU offer the layout: check that it was negotiated.
    result = run_blk(guest_env, tmp_path, sock_dir, packed=True)
    assert guest_virtio_features(result) & (1 << VIRTIO_F_RING_PACKED), result.report()


@pytest.mark.usefixtures("vhsm_rng")
def test_rng_guest_against_vhsm(guest_env: GuestEnv, tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "rng.sock"
    with running_backend(serve_rng_argv(sock), sock, tmp_path / "vhsm-rng.log") as be:
        result = boot_guest(
            guest_env,
            script=rng_script(8192),
            devices=[vhost_user_rng(sock)],
            backends=[be],
            workdir=tmp_path / "guest",
        )
    check_rng_result(result, 8192)
    assert_backend_clean(result, be)


@pytest.mark.usefixtures("vhsm_blk", "vhsm_rng")
def test_blk_and_rng_in_one_guest(guest_env: GuestEnv, tmp_path: Path, sock_dir: Path) -> None:
    plan = BlkPlan()
    image = plan.prepare_image(tmp_path / "disk.img")
    blk_sock, rng_sock = sock_dir / "blk.sock", sock_dir / "rng.sock"
    with (
        running_backend(serve_blk_argv(image, blk_sock), blk_sock, tmp_path / "blk.log") as blk,
        running_backend(serve_rng_argv(rng_sock), rng_sock, tmp_path / "rng.log") as rng,
    ):
        result = boot_guest(
            guest_env,
            script=plan.script() + rng_script(4096),
            devices=[vhost_user_blk(blk_sock), vhost_user_rng(rng_sock)],
            backends=[blk, rng],
            workdir=tmp_path / "guest",
        )
    check_rng_result(result, 4096)
    assert plan.verify_image(image, result) == [r.name for r in plan.regions]
    assert_backend_clean(result, blk, rng)


# One request queue per vCPU: each writer is pinned to a CPU, so it submits on that
# CPU's queue; every queue's interrupt count shows it completed requests.
QUEUE_IRQS = r"""
echo "VHSM-KV hw_queues=$(ls /sys/block/vda/mq | wc -l)"
awk '$NF ~ /^virtio[0-9]+-req\.[0-9]+$/ {
    s = 0; for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) s += $i
    split($NF, q, "."); print "VHSM-KV irqs.q" q[2] "=" s
}' /proc/interrupts
"""


@pytest.mark.usefixtures("vhsm_blk")
def test_blk_guest_multiqueue_one_queue_per_vcpu(
    guest_env: GuestEnv, tmp_path: Path, sock_dir: Path
) -> None:
    queues = 4
    plan = WriterPlan(writers=queues, writes=8, pin=True)
    image = plan.prepare_image(tmp_path / "disk.img")
    sock = sock_dir / "blk.sock"
    argv = [*serve_blk_argv(image, sock), "--queues", str(queues)]
    with running_backend(argv, sock, tmp_path / "vhsm-blk.log") as be:
        result = boot_guest(
            guest_env,
            script=plan.script() + QUEUE_IRQS,
            devices=[vhost_user_blk(sock, num_queues=queues)],
            backends=[be],
            workdir=tmp_path / "guest",
            smp=queues,
            timeout=240,
        )
    assert plan.verify_image(image, result) == queues * 8
    assert result.values["hw_queues"] == str(queues), result.report()
    irqs = {q: int(result.values.get(f"irqs.q{q}", "0")) for q in range(queues)}
    assert all(irqs.values()), f"a queue completed nothing: {irqs}\n{result.report()}"
    assert_backend_clean(result, be)


NET_NICS = (
    NetNic("loop", "52:54:00:00:00:01", 1, loopback=True),
    NetNic("sink", "52:54:00:00:00:02", 2, loopback=False),
    NetNic("audit", "52:54:00:00:00:03", 3, loopback=True),  # `vhsm audit frontend` (loopback)
)


@pytest.mark.usefixtures("vhsm_net")
def test_net_guest_against_vhsm_loopback_and_sink(
    guest_env: GuestEnv, tmp_path: Path, sock_dir: Path
) -> None:
    """QEMU's vhost-user-net served out of the box, in both modes and by the auditor.

    One boot, three NICs: `vhsm serve net` in loopback mode behind `vhsm record`,
    in sink mode, and `vhsm audit frontend --device net`.
    """
    socks = {n: sock_dir / f"{n}.sock" for n in ("loop", "relay", "sink", "audit")}
    transcript, audit_json = tmp_path / "qemu-vhsm-net.jsonl", tmp_path / "audit.json"
    record = [*VHSM, "record", "--listen", str(socks["relay"]), "--connect", str(socks["loop"])]
    record += ["--out", str(transcript), "--device", "net"]
    audit = [*VHSM, "audit", "frontend", "--listen", str(socks["audit"]), "--device", "net"]
    audit += ["--format", "json", "--output", str(audit_json)]
    loop_nic, sink_nic, audit_nic = NET_NICS
    with (
        running_backend(
            serve_net_argv(socks["loop"], "loopback"), socks["loop"], tmp_path / "loop.log"
        ) as lp,
        running_backend(record, socks["relay"], tmp_path / "record.log") as relay,
        running_backend(
            serve_net_argv(socks["sink"], "sink"), socks["sink"], tmp_path / "sink.log"
        ) as sink,
        running_backend(audit, socks["audit"], tmp_path / "audit.log") as auditor,
    ):
        result = boot_guest(
            guest_env,
            script=net_script(NET_NICS),
            devices=[
                vhost_user_net(socks["relay"], mac=loop_nic.mac, id="vunet0"),
                vhost_user_net(socks["sink"], mac=sink_nic.mac, id="vunet1"),
                vhost_user_net(socks["audit"], mac=audit_nic.mac, id="vunet2"),
            ],
            backends=[lp, relay, sink, auditor],
            workdir=tmp_path / "guest",
            modules=(*VIRTIO_MODULES, "virtio_net"),
        )
    for nic in NET_NICS:
        print(nic.name, check_net_result(result, nic))  # shown with -s
    assert_backend_clean(result, lp, relay, sink, auditor)
    # QEMU enabled the rings before SET_FEATURES: an INTEROP finding, nothing else
    lines = [json.loads(line) for line in transcript.read_text().splitlines()]
    sent = [line["name"] for line in lines if line.get("dir") == "F>B"]
    assert sent.index("SET_VRING_ENABLE") < sent.index("SET_FEATURES")
    assert sent.index("SET_FEATURES") < sent.index("SET_VRING_KICK")
    report = audit_trace(load_transcript(transcript), str(transcript))
    assert {f.rule_id for f in report.findings} == {"VU-STATE-012"}, report.text()
    assert report.verdict() == "pass", report.text()
    doc = json.loads(audit_json.read_text())
    assert doc["verdict"] == "pass", doc
    assert {f["rule_id"] for f in doc["findings"]} == {"VU-STATE-012"}, doc["findings"]
