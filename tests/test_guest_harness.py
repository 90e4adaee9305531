"""Host-side pieces of the guest harness that need no QEMU: parsing, cpio, image checks."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from guest.harness import GuestResult, parse_output, vhost_user_blk
from guest.initramfs import CpioWriter
from guest.scripts import BlkPlan, BlkRegion, guest_virtio_features


def _result(values: dict[str, str], status: str = "pass") -> GuestResult:
    return GuestResult(status, "", "", "", 0, 1.0, values)


def test_parse_output_reads_markers_and_values() -> None:
    text = (
        "VHSM-GUEST-BEGIN\r\nnoise\nVHSM-KV a=1\nVHSM-KV b = x=y \n"
        "VHSM-KV broken\nVHSM-GUEST-RESULT PASS\n"
    )
    assert parse_output(text) == ("pass", {"a": "1", "b": "x=y"})
    assert parse_output("VHSM-GUEST-RESULT FAIL rc=2\n")[0] == "fail"
    assert parse_output("kernel panic\n") == ("no-result", {})


def test_cpio_archive_lists_entries(tmp_path: Path) -> None:
    cpio_tool = shutil.which("cpio")
    if cpio_tool is None:
        pytest.skip("cpio not installed (run .ci/install-deps)")
    w = CpioWriter()
    w.directory("bin")
    w.file("bin/hello", b"hello world", 0o755)
    w.symlink("bin/sh", "hello")
    w.char_device("console", 5, 1)
    archive = w.finish()
    assert len(archive) % 4 == 0
    out = subprocess.run(
        [cpio_tool, "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    names = [
        line.split()[-1] if "->" not in line else line.split()[-3] for line in out.splitlines()
    ]
    assert names == ["bin", "bin/hello", "bin/sh", "console"]
    assert out.splitlines()[3].startswith("crw")


def _write_as_guest(plan: BlkPlan, image: Path) -> dict[str, str]:
    """Fill the plan's regions in the image like the guest would; return its report."""
    values = {}
    with open(image, "r+b") as f:
        for r in plan.regions:
            data = bytes([len(r.name)]) * r.length
            f.seek(r.offset)
            f.write(data)
            values[f"region.{r.name}"] = f"{r.offset}:{r.length}:{hashlib.sha256(data).hexdigest()}"
    return values


def test_verify_image_accepts_exact_writes(tmp_path: Path) -> None:
    plan = BlkPlan()
    image = plan.prepare_image(tmp_path / "disk.img")
    values = _write_as_guest(plan, image)
    assert plan.verify_image(image, _result(values)) == [r.name for r in plan.regions]


def test_verify_image_catches_stray_write_and_missing_region(tmp_path: Path) -> None:
    plan = BlkPlan()
    image = plan.prepare_image(tmp_path / "disk.img")
    values = _write_as_guest(plan, image)
    with open(image, "r+b") as f:
        f.seek(plan.regions[1].offset - 512)  # one sector before a region: off-by-one write
        f.write(b"\x01")
    with pytest.raises(AssertionError, match="stray write"):
        plan.verify_image(image, _result(values))
    del values["region.large"]
    with pytest.raises(AssertionError, match="region large"):
        plan.verify_image(image, _result(values))


def test_verify_image_catches_wrong_data(tmp_path: Path) -> None:
    plan = BlkPlan()
    image = plan.prepare_image(tmp_path / "disk.img")
    values = _write_as_guest(plan, image)
    with open(image, "r+b") as f:
        f.seek(plan.regions[0].offset + 4096)
        f.write(b"\xff" * 512)
    with pytest.raises(AssertionError, match="region aligned: image has"):
        plan.verify_image(image, _result(values))


def test_blk_plan_rejects_bad_layouts() -> None:
    with pytest.raises(ValueError, match="overlap"):
        BlkPlan(regions=(BlkRegion("a", 0, 4096), BlkRegion("b", 2048, 4096)))
    with pytest.raises(ValueError, match="not sector aligned"):
        BlkPlan(regions=(BlkRegion("a", 100, 4096),))
    with pytest.raises(ValueError, match="past the image"):
        BlkPlan(image_size=4096, seed_offset=0, seed=b"", regions=(BlkRegion("a", 4096, 512),))


def test_script_mentions_every_region() -> None:
    plan = BlkPlan()
    script = plan.script()
    for r in plan.regions:
        assert f"wr {r.name} {r.offset} {r.length}" in script
        assert f"chk {r.name} {r.offset} {r.length}" in script


def test_guest_virtio_features_bit_order() -> None:
    bits = "0" * 32 + "101"
    assert guest_virtio_features(_result({"virtio_features": bits})) == (1 << 32) | (1 << 34)


def test_vhost_user_device_args_and_socket_length(tmp_path: Path) -> None:
    dev = vhost_user_blk(Path("/tmp/x.sock"), num_queues=2)
    assert dev.args == (
        "-chardev",
        "socket,id=vublk0-chr,path=/tmp/x.sock",
        "-device",
        "vhost-user-blk-pci,id=vublk0,chardev=vublk0-chr,num-queues=2",
    )
    with pytest.raises(ValueError, match="too long"):
        vhost_user_blk(Path("/tmp/" + "x" * 120))
