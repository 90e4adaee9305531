"""The auditor against real peers: qemu-storage-daemon as back-end, QEMU as front-end.

The findings these peers produce are facts about them, not test failures: the
tests check that the audit runs to the end and prints them (run with ``-s``
to see the reports), and that what vhsm itself does stays clean.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from guest.harness import (
    QSD,
    GuestEnv,
    boot_guest,
    qsd_blk_argv,
    require_guest_env,
    running_backend,
    short_socket_dir,
    vhost_user_blk,
    vhost_user_device,
)
from guest.scripts import BlkPlan

from vhsm.audit.backend_suite import run_suite
from vhsm.audit.trace import audit_trace
from vhsm.audit.transcript import load_transcript

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]

VHSM = [sys.executable, "-m", "vhsm"]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_socket_dir() as path:
        yield path


def test_backend_suite_against_qemu_storage_daemon(tmp_path: Path, sock_dir: Path) -> None:
    require_guest_env(QSD)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * (64 * 1024))  # 16 MiB with a pattern
    before = image.read_bytes()
    sock = sock_dir / "qsd.sock"
    with running_backend(qsd_blk_argv(image, sock), sock, tmp_path / "qsd.log") as qsd:
        report = run_suite(sock, "blk", timeout=2.0)
        assert qsd.alive(), qsd.log()
    print(report.text())
    got = {case.title: case for case in report.cases}
    # qemu-storage-daemon serves every legal scenario...
    for name in (
        "negotiation, QEMU's order",
        "negotiation, SET_OWNER first",
        "memory table replaced while running",
        "ADD_MEM_REG / REM_MEM_REG",
        "ring stop/start cycles",
        "reconnect and resume",
        "data round trip (blk)",
    ):
        assert got[name].outcome == "pass", (name, got[name].detail)
    # ...and survives every bad input (it never wedges or dies).
    assert not [c.name for c in report.cases if c.outcome in ("wedged", "crashed")]
    # Oversized payloads are refused before the payload is read.
    assert got["payload size field 4 GiB-16"].outcome == "rejected-cleanly"
    assert image.read_bytes() == before


@pytest.fixture
def guest_env() -> GuestEnv:
    return require_guest_env()


def test_record_qemu_guest_boot_against_vhsm_blk(
    guest_env: GuestEnv, tmp_path: Path, sock_dir: Path
) -> None:
    plan = BlkPlan()
    image = plan.prepare_image(tmp_path / "disk.img")
    backend_sock, relay_sock = sock_dir / "blk.sock", sock_dir / "relay.sock"
    transcript = tmp_path / "qemu-vhsm-blk.jsonl"
    serve = [*VHSM, "serve", "blk", "--socket", str(backend_sock), "--file", str(image)]
    record = [*VHSM, "record", "--listen", str(relay_sock), "--connect", str(backend_sock)]
    record += ["--out", str(transcript), "--device", "blk"]
    with (
        running_backend(serve, backend_sock, tmp_path / "serve.log") as blk,
        running_backend(record, relay_sock, tmp_path / "record.log") as relay,
    ):
        result = boot_guest(
            guest_env,
            script=plan.script(),
            devices=[vhost_user_blk(relay_sock)],
            backends=[blk, relay],
            workdir=tmp_path / "guest",
        )
    result.assert_passed()
    assert plan.verify_image(image, result) == [r.name for r in plan.regions]
    assert "Traceback" not in relay.log() + blk.log()

    lines = [json.loads(line) for line in transcript.read_text().splitlines()]
    names = {line.get("name") for line in lines}
    assert {"SET_VRING_KICK", "GET_CONFIG", "SET_BACKEND_REQ_FD"} <= names
    memory = [line for line in lines if line.get("name") in ("SET_MEM_TABLE", "ADD_MEM_REG")]
    assert any(line["nfds"] for line in memory if line["dir"] == "F>B")  # memfds relayed
    assert lines[-1]["event"] == "exit"
    report = audit_trace(load_transcript(transcript), str(transcript))
    print(report.text())
    assert report.exit_status() == 0, report.text()


def test_audit_frontend_with_a_qemu_guest(
    guest_env: GuestEnv, tmp_path: Path, sock_dir: Path
) -> None:
    plan = BlkPlan()
    image = plan.prepare_image(tmp_path / "disk.img")
    sock = sock_dir / "audit.sock"
    out = tmp_path / "report.json"
    audit = [*VHSM, "audit", "frontend", "--listen", str(sock), "--device", "blk"]
    audit += ["--file", str(image), "--format", "json", "--output", str(out)]
    with running_backend(audit, sock, tmp_path / "audit.log") as auditor:
        result = boot_guest(
            guest_env,
            script=plan.script(),
            devices=[vhost_user_blk(sock)],
            backends=[auditor],
            workdir=tmp_path / "guest",
        )
    result.assert_passed()
    doc = json.loads(out.read_text())
    print(json.dumps(doc["findings"], indent=1))
    assert doc["verdict"] == "pass", doc["findings"]


#: QEMU 7.2 vhost-user devices the guest kernel has drivers for, beyond blk, rng and net
#: (tested with their own back-ends): virtio device id and the QEMU device.
OTHER_DEVICES = {
    "fs": (0x1A, "vhost-user-fs-pci", {"tag": "fs0"}),
    "scsi": (0x08, "vhost-user-scsi-pci", {}),
    "vsock": (0x13, "vhost-user-vsock-pci", {}),
}
DRIVER_OK_SCRIPT = r"""
fail() { echo "FAIL: $*"; exit 1; }
for id in IDS; do
    i=0
    while :; do
        st=0
        for d in /sys/bus/virtio/devices/*; do
            [ $(($(cat $d/device))) = $id ] && st=$(($(cat $d/status)))
        done
        [ $((st & 4)) = 4 ] && break
        i=$((i + 1)); [ $i -le 300 ] || fail "device $id: status $st, never DRIVER_OK"
        sleep 0.1
    done
    echo "VHSM-KV driver_ok.$id=1"
done
"""


def test_audit_frontend_with_qemu_fs_scsi_vsock(
    guest_env: GuestEnv, tmp_path: Path, sock_dir: Path
) -> None:
    """QEMU's vhost-user-fs, -scsi and -vsock get to DRIVER_OK on vhsm's generic device.

    The guest's drivers start every ring; the auditors see whole sessions (no
    connection cut short) and find only INTEROP deviations.
    """
    reports = {name: tmp_path / f"{name}.json" for name in OTHER_DEVICES}
    with ExitStack() as stack:
        auditors, devices = [], []
        for name, (_, driver, props) in OTHER_DEVICES.items():
            sock = sock_dir / f"{name}.sock"
            audit = [*VHSM, "audit", "frontend", "--listen", str(sock), "--device", "generic"]
            audit += ["--format", "json", "--output", str(reports[name])]
            auditors.append(
                stack.enter_context(running_backend(audit, sock, tmp_path / f"{name}.log"))
            )
            devices.append(vhost_user_device(driver, sock, id=f"vu{name}", **props))
        ids = " ".join(str(dev_id) for dev_id, _, _ in OTHER_DEVICES.values())
        result = boot_guest(
            guest_env,
            script=DRIVER_OK_SCRIPT.replace("IDS", ids),
            devices=devices,
            backends=auditors,
            workdir=tmp_path / "guest",
            modules=("virtio_pci", "virtiofs", "virtio_scsi", "vmw_vsock_virtio_transport"),
            timeout=180,
        )
    result.assert_passed()
    for name, path in reports.items():
        doc = json.loads(path.read_text())
        print(name, json.dumps(doc["findings"], indent=1))
        assert doc["verdict"] == "pass", (name, doc)
        assert {f["severity"] for f in doc["findings"]} <= {"INTEROP"}, (name, doc["findings"])
