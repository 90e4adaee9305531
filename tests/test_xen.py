"""vhsm.xen: argument layouts against the kernel's UAPI headers, region decoding, errors.

No Xen here: foreign and grant mappings run up to their ioctl with a recording
ioctl (the layouts and values it received are checked), and the daemon's answer
to a Xen region without a Xen device is checked end to end.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhsm.daemon import Listener, VhostUserDaemon
from vhsm.devices.rng import RngBackend
from vhsm.errors import BackendError, GuestMemoryError
from vhsm.frontend import Frontend, RngDevice
from vhsm.memory import GuestMemory
from vhsm.transport import PeerClosed
from vhsm.wire import FrontendReq, ProtocolFeature
from vhsm.wire.enums import XenMmapFlag
from vhsm.wire.payloads import VhostUserMemory, VhostUserMemoryRegion
from vhsm.xen import (
    IOCTL_GNTDEV_MAP_GRANT_REF,
    IOCTL_GNTDEV_UNMAP_GRANT_REF,
    IOCTL_PRIVCMD_MMAPBATCH_V2,
    GntdevGrantRef,
    GntdevMapGrantRef,
    GntdevUnmapGrantRef,
    PrivcmdMmapbatchV2,
    XenMapper,
)

PAGE = 4096

# The kernel headers include Xen's own public header for three types; its
# definitions on x86-64 (xen/include/public/xen.h, grant_table.h).
XEN_TYPES = """#include <stdint.h>
typedef uint16_t domid_t;
typedef unsigned long xen_pfn_t;
typedef uint32_t grant_ref_t;
"""
LAYOUT_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/ioctl.h>
#include <xen/privcmd.h>
#include <xen/gntdev.h>
#define F(s, m) printf(#s "." #m " %zu %zu\n", offsetof(struct s, m), sizeof(((struct s *)0)->m))
#define S(s) printf(#s " %zu\n", sizeof(struct s))
int main(void) {
    S(privcmd_mmapbatch_v2);
    F(privcmd_mmapbatch_v2, num); F(privcmd_mmapbatch_v2, dom); F(privcmd_mmapbatch_v2, addr);
    F(privcmd_mmapbatch_v2, arr); F(privcmd_mmapbatch_v2, err);
    S(ioctl_gntdev_grant_ref);
    F(ioctl_gntdev_grant_ref, domid); F(ioctl_gntdev_grant_ref, ref);
    S(ioctl_gntdev_map_grant_ref);
    F(ioctl_gntdev_map_grant_ref, count); F(ioctl_gntdev_map_grant_ref, pad);
    F(ioctl_gntdev_map_grant_ref, index); F(ioctl_gntdev_map_grant_ref, refs);
    S(ioctl_gntdev_unmap_grant_ref);
    F(ioctl_gntdev_unmap_grant_ref, index); F(ioctl_gntdev_unmap_grant_ref, count);
    F(ioctl_gntdev_unmap_grant_ref, pad);
    printf("IOCTL_PRIVCMD_MMAPBATCH_V2 %lu\n", (unsigned long)IOCTL_PRIVCMD_MMAPBATCH_V2);
    printf("IOCTL_GNTDEV_MAP_GRANT_REF %lu\n", (unsigned long)IOCTL_GNTDEV_MAP_GRANT_REF);
    printf("IOCTL_GNTDEV_UNMAP_GRANT_REF %lu\n", (unsigned long)IOCTL_GNTDEV_UNMAP_GRANT_REF);
    return 0;
}
"""
PYTHON_LAYOUTS: dict[str, type[ctypes.Structure]] = {
    "privcmd_mmapbatch_v2": PrivcmdMmapbatchV2,
    "ioctl_gntdev_grant_ref": GntdevGrantRef,
    "ioctl_gntdev_map_grant_ref": GntdevMapGrantRef,
    "ioctl_gntdev_unmap_grant_ref": GntdevUnmapGrantRef,
}
HEADER_FIELDS = {"dom": "dom", "ref": "ref"}


def header_layouts(tmp: Path) -> dict[str, list[int]]:
    """Sizes, offsets and request numbers as the kernel headers define them (compiled C)."""
    headers = Path("/usr/include/xen")
    if not (headers / "privcmd.h").is_file() or shutil.which("gcc") is None:
        pytest.skip("gcc or the kernel's xen/privcmd.h UAPI header missing (linux-libc-dev)")
    stub = tmp / "inc" / "xen" / "interface"
    stub.mkdir(parents=True)
    (stub / "xen.h").write_text(XEN_TYPES)
    (tmp / "inc" / "xen" / "grant_table.h").write_text(XEN_TYPES)
    (tmp / "layout.c").write_text(XEN_TYPES + LAYOUT_PROGRAM)
    # -idirafter: the real xen/privcmd.h and xen/gntdev.h win over the stub directory
    subprocess.run(
        ["gcc", "-idirafter", str(tmp / "inc"), "-o", str(tmp / "layout"), str(tmp / "layout.c")],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(tmp / "layout")], check=True, capture_output=True, text=True)
    return {line.split()[0]: [int(v) for v in line.split()[1:]] for line in out.stdout.splitlines()}


def test_argument_layouts_match_the_kernel_headers(tmp_path: Path) -> None:
    facts = header_layouts(tmp_path)
    for name, struct in PYTHON_LAYOUTS.items():
        assert ctypes.sizeof(struct) == facts[name][0], name
        for field, _ in struct._fields_:
            offset, size = facts[f"{name}.{field}"]
            member = getattr(struct, field)
            assert (member.offset, member.size) == (offset, size), f"{name}.{field}"
    assert facts["IOCTL_PRIVCMD_MMAPBATCH_V2"][0] == IOCTL_PRIVCMD_MMAPBATCH_V2
    assert facts["IOCTL_GNTDEV_MAP_GRANT_REF"][0] == IOCTL_GNTDEV_MAP_GRANT_REF
    assert facts["IOCTL_GNTDEV_UNMAP_GRANT_REF"][0] == IOCTL_GNTDEV_UNMAP_GRANT_REF


# --- region decoding ---------------------------------------------------------------------------
def memfd(size: int) -> int:
    fd = os.memfd_create("xen-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def region(flags: int, *, gpa: int = 0x10000, size: int = 4 * PAGE, domid: int = 7,
           offset: int = 0) -> VhostUserMemoryRegion:  # fmt: skip
    return VhostUserMemoryRegion(gpa, size, 0x7000_0000, offset, flags, domid)


class Recorder:
    """An ioctl that records its calls (and their arguments, decoded) and succeeds."""

    def __init__(self, index: int = 0) -> None:
        self.calls: list[tuple[int, bytes]] = []
        self.frames: list[int] = []
        self.index = index

    def __call__(self, fd: int, request: int, arg: object) -> int:
        raw = bytes(memoryview(arg).cast("B"))  # type: ignore[arg-type]
        self.calls.append((request, raw))
        if isinstance(arg, PrivcmdMmapbatchV2):  # the frame array lives only during the call
            self.frames = [arg.arr[i] for i in range(arg.num)]
        if request == IOCTL_GNTDEV_MAP_GRANT_REF:
            GntdevMapGrantRef.from_buffer(arg).index = self.index  # type: ignore[arg-type]
        return 0


def fake_device(tmp: Path, name: str, size: int) -> str:
    path = tmp / name  # a regular file stands in for the device node: mmap works, ioctl is faked
    path.write_bytes(bytes(size))
    return str(path)


def test_flags_zero_is_a_plain_unix_mapping() -> None:
    fd = memfd(4 * PAGE)
    try:
        mapping = XenMapper().map_region(region(0), fd)
        mapping.view[:5] = b"hello"
        assert os.pread(fd, 5, 0) == b"hello"
        mapping.close()
    finally:
        os.close(fd)


def test_foreign_region_is_batch_mapped_for_its_domain(tmp_path: Path) -> None:
    ioctl = Recorder()
    mapper = XenMapper(privcmd=fake_device(tmp_path, "privcmd", 4 * PAGE), ioctl=ioctl)
    fd = memfd(PAGE)  # not a character device: the mapper opens privcmd itself
    try:
        mapping = mapper.map_region(region(XenMmapFlag.FOREIGN, gpa=0x20000, domid=9), fd)
    finally:
        os.close(fd)
    assert mapping.view.nbytes == 4 * PAGE
    ((request, raw),) = ioctl.calls
    assert request == IOCTL_PRIVCMD_MMAPBATCH_V2
    arg = PrivcmdMmapbatchV2.from_buffer_copy(raw)
    assert (arg.num, arg.dom) == (4, 9)
    assert ioctl.frames == [0x20, 0x21, 0x22, 0x23]  # guest frame numbers
    assert arg.addr != 0
    mapping.close()


def test_grant_region_maps_its_references_then_mmaps_at_the_offset(tmp_path: Path) -> None:
    ioctl = Recorder(index=2 * PAGE)
    mapper = XenMapper(gntdev=fake_device(tmp_path, "gntdev", 8 * PAGE), ioctl=ioctl)
    fd = memfd(PAGE)
    try:
        gpa = (1 << 63) | 0x5000  # grant addresses carry bit 63
        mapping = mapper.map_region(region(XenMmapFlag.GRANT, gpa=gpa, size=2 * PAGE), fd)
    finally:
        os.close(fd)
    ((request, raw),) = ioctl.calls
    assert request == IOCTL_GNTDEV_MAP_GRANT_REF
    head = GntdevMapGrantRef.from_buffer_copy(raw[: ctypes.sizeof(GntdevMapGrantRef)])
    assert head.count == 2
    refs = (GntdevGrantRef * 2).from_buffer_copy(raw, GntdevMapGrantRef.refs.offset)
    assert [(r.domid, r.ref) for r in refs] == [(7, 5), (7, 6)]
    Path(mapper.gntdev).write_bytes(bytes(2 * PAGE) + b"G" * PAGE + bytes(5 * PAGE))
    assert bytes(mapping.view[:4]) == b"GGGG"  # mapped at the returned offset
    mapping.close()
    request, raw = ioctl.calls[-1]
    assert request == IOCTL_GNTDEV_UNMAP_GRANT_REF
    unmap = GntdevUnmapGrantRef.from_buffer_copy(raw)
    assert (unmap.index, unmap.count) == (2 * PAGE, 2)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (XenMmapFlag.FOREIGN | XenMmapFlag.GRANT, "both FOREIGN and GRANT"),
        (XenMmapFlag.GRANT | XenMmapFlag.NO_ADVANCE_MAP, "NO_ADVANCE_MAP"),
        (0x40, "unknown xen_mmap_flags bits 0x40"),
    ],
)
def test_bad_flag_combinations_are_refused(flags: int, message: str) -> None:
    fd = memfd(4 * PAGE)
    try:
        with pytest.raises(GuestMemoryError, match=message):
            XenMapper().map_region(region(flags), fd)
    finally:
        os.close(fd)


def test_xen_mappings_start_at_offset_zero_and_whole_pages() -> None:
    fd = memfd(8 * PAGE)
    try:
        with pytest.raises(GuestMemoryError, match="offset 0"):
            XenMapper().map_region(region(XenMmapFlag.FOREIGN, offset=PAGE), fd)
        with pytest.raises(GuestMemoryError, match="multiple of 4096"):
            XenMapper().map_region(region(XenMmapFlag.GRANT, size=PAGE + 1), fd)
    finally:
        os.close(fd)


def test_missing_devices_are_named(tmp_path: Path) -> None:
    mapper = XenMapper(privcmd=str(tmp_path / "no-privcmd"), gntdev=str(tmp_path / "no-gntdev"))
    fd = memfd(4 * PAGE)
    try:
        with pytest.raises(GuestMemoryError, match=r"needs .*no-privcmd: No such file"):
            mapper.map_region(region(XenMmapFlag.FOREIGN), fd)
        with pytest.raises(GuestMemoryError, match=r"needs .*no-gntdev: No such file"):
            mapper.map_region(region(XenMmapFlag.GRANT), fd)
    finally:
        os.close(fd)


def test_the_default_mapper_still_refuses_xen_regions() -> None:
    fd = memfd(4 * PAGE)
    with pytest.raises(GuestMemoryError, match="Xen-aware RegionMapper"):
        GuestMemory.from_table([region(XenMmapFlag.FOREIGN)], [fd])


# --- through the daemon ----------------------------------------------------------------------
class XenRng(RngBackend):
    def protocol_features(self) -> int:
        return super().protocol_features() | ProtocolFeature.XEN_MMAP


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vhsm-xen-") as d:
        yield Path(d)


def xen_frontend(path: Path) -> Frontend:
    fe = Frontend.connect(path, timeout=10)
    fe.negotiate(
        protocol_features=int(
            ProtocolFeature.XEN_MMAP | ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ
        )
    )
    return fe


def send_table(fe: Frontend, flags: int, domid: int = 3) -> None:
    """SET_MEM_TABLE with every region of the front-end's memory in the 40-byte Xen form."""
    regions, fds = fe.memory.table()
    xen = [VhostUserMemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                 r.mmap_offset, flags, domid) for r in regions]  # fmt: skip
    fe.call(FrontendReq.SET_MEM_TABLE, VhostUserMemory(tuple(xen)), fds=fds)


def test_daemon_with_xen_mapper_serves_flags_zero_regions(sockdir: Path) -> None:
    daemon = VhostUserDaemon("xen-rng", XenRng(), mapper=XenMapper())
    daemon.start(Listener(sockdir / "x.sock"))
    try:
        fe = xen_frontend(sockdir / "x.sock")
        send_table(fe, 0)
        fe.setup_vring(0, 64)
        assert len(RngDevice(fe).read(32)) == 32  # data through a Xen-form region
        fe.close()
    finally:
        daemon.stop()


def test_daemon_without_a_xen_device_answers_with_the_device_name(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    missing = sockdir / "xen-privcmd"
    daemon = VhostUserDaemon("xen-rng", XenRng(), mapper=XenMapper(privcmd=str(missing)))
    daemon.start(Listener(sockdir / "x.sock"))
    try:
        fe = xen_frontend(sockdir / "x.sock")
        with pytest.raises((BackendError, PeerClosed)):  # a NACK, then the connection closes
            send_table(fe, XenMmapFlag.FOREIGN)
        fe.close()
    finally:
        daemon.stop()
    assert f"needs {missing}: No such file or directory" in caplog.text
    assert daemon.last_error is None  # a clear refusal, not an internal error
