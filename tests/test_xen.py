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
import struct
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
from vhsm.ondemand import OnDemandMapping
from vhsm.transport import PeerClosed
from vhsm.wire import FrontendReq, ProtocolFeature
from vhsm.wire.enums import XenMmapFlag
from vhsm.wire.payloads import VhostUserMemory, VhostUserMemoryRegion
from vhsm.xen import (
    GRANT_ADDR_BIT,
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
    for name, layout in PYTHON_LAYOUTS.items():
        assert ctypes.sizeof(layout) == facts[name][0], name
        for field, _ in layout._fields_:
            offset, size = facts[f"{name}.{field}"]
            member = getattr(layout, field)
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


# --- NO_ADVANCE_MAP: mapped per access ---------------------------------------------------------
class GrantDevice(Recorder):
    """A gntdev ioctl whose mappings sit at the reference's own page of the stand-in file."""

    def __call__(self, fd: int, request: int, arg: object) -> int:
        super().__call__(fd, request, arg)
        if request == IOCTL_GNTDEV_MAP_GRANT_REF:
            first = GntdevGrantRef.from_buffer(arg, GntdevMapGrantRef.refs.offset)  # type: ignore[arg-type]
            GntdevMapGrantRef.from_buffer(arg).index = first.ref * PAGE  # type: ignore[arg-type]
        return 0

    def requests(self, request: int) -> list[bytes]:
        return [raw for req, raw in self.calls if req == request]


def test_no_advance_map_is_the_value_xen_front_ends_send(tmp_path: Path) -> None:
    # xen-vhost-frontend sends GRANT | NO_ADVANCE_MAP as vm-memory spells them: 0x2 | 0x8.
    wire = struct.pack("<QQQQII", GRANT_ADDR_BIT, 16 * PAGE, 0, 0, 0x2 | 0x8, 1)
    decoded = VhostUserMemoryRegion.from_bytes(wire, "SET_MEM_TABLE", xen=True)
    mapper = XenMapper(gntdev=fake_device(tmp_path, "gntdev", PAGE), ioctl=GrantDevice())
    fd = memfd(PAGE)
    try:
        mapping = mapper.map_region(decoded, fd)
    finally:
        os.close(fd)
    assert isinstance(mapping, OnDemandMapping)
    mapping.close()


def test_a_no_advance_map_grant_region_maps_each_access(tmp_path: Path) -> None:
    ioctl = GrantDevice()
    device = tmp_path / "gntdev"
    device.write_bytes(b"".join(bytes([i]) * PAGE for i in range(64)))  # page i holds i
    mapper = XenMapper(gntdev=str(device), ioctl=ioctl)
    gpa = GRANT_ADDR_BIT | 0x10000  # references 0x10.. of domain 7
    memory = GuestMemory.from_table(  # closes the fd
        [region(XenMmapFlag.GRANT | XenMmapFlag.NO_ADVANCE_MAP, gpa=gpa, size=32 * PAGE)],
        [memfd(PAGE)],
        mapper=mapper,
    )
    assert ioctl.calls == []  # nothing mapped with the table
    assert bytes(memory.translate(gpa + 3 * PAGE + 7, 2)) == bytes([0x13, 0x13])
    assert bytes(memory.translate(gpa + 5 * PAGE - 1, 2)) == bytes([0x14, 0x15])
    maps = ioctl.requests(IOCTL_GNTDEV_MAP_GRANT_REF)
    heads = [GntdevMapGrantRef.from_buffer_copy(raw[:24]) for raw in maps]
    assert [h.count for h in heads] == [1, 2]
    refs = [
        (GntdevGrantRef * h.count).from_buffer_copy(raw, 16)
        for h, raw in zip(heads, maps, strict=True)
    ]
    assert [[(r.domid, r.ref) for r in rs] for rs in refs] == [[(7, 0x13)], [(7, 0x14), (7, 0x15)]]
    with pytest.raises(GuestMemoryError):
        memory.translate(gpa + 32 * PAGE - 1, 2)  # past the region: nothing mapped
    assert len(ioctl.requests(IOCTL_GNTDEV_MAP_GRANT_REF)) == 2
    memory.regions[0].mapping.close()
    unmaps = [
        GntdevUnmapGrantRef.from_buffer_copy(r)
        for r in ioctl.requests(IOCTL_GNTDEV_UNMAP_GRANT_REF)
    ]
    assert sorted((u.index, u.count) for u in unmaps) == [(0x13 * PAGE, 1), (0x14 * PAGE, 2)]


def test_a_no_advance_map_foreign_region_batch_maps_each_access(tmp_path: Path) -> None:
    ioctl = Recorder()
    mapper = XenMapper(privcmd=fake_device(tmp_path, "privcmd", 4 * PAGE), ioctl=ioctl)
    fd = memfd(PAGE)
    try:
        mapping = mapper.map_region(
            region(XenMmapFlag.FOREIGN | XenMmapFlag.NO_ADVANCE_MAP, gpa=0x80000, size=64 * PAGE,
                   domid=4),
            fd,
        )  # fmt: skip
    finally:
        os.close(fd)
    assert isinstance(mapping, OnDemandMapping) and ioctl.calls == []
    mapping.window(10 * PAGE + 100, PAGE)  # pages 10 and 11
    ((request, raw),) = ioctl.calls
    assert request == IOCTL_PRIVCMD_MMAPBATCH_V2
    arg = PrivcmdMmapbatchV2.from_buffer_copy(raw)
    assert (arg.num, arg.dom) == (2, 4)
    assert ioctl.frames == [0x80 + 10, 0x80 + 11]
    mapping.close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (XenMmapFlag.FOREIGN | XenMmapFlag.GRANT, "both FOREIGN and GRANT"),
        (XenMmapFlag.NO_ADVANCE_MAP, "NO_ADVANCE_MAP needs FOREIGN or GRANT"),
        (0x40, "unknown xen_mmap_flags bits 0x40"),
        (XenMmapFlag.GRANT | 0x100, "unknown xen_mmap_flags bits 0x100"),  # the document's bit 8
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


def test_daemon_maps_a_no_advance_map_grant_region_per_access(sockdir: Path) -> None:
    # The front-end's own memfd stands in for gntdev: reference r is mapped at r * 4096,
    # which is guest address r * 4096 of its one region (guest address 0 on).
    ioctl = GrantDevice()
    mapper = XenMapper(ioctl=ioctl)
    daemon = VhostUserDaemon("xen-rng", XenRng(), mapper=mapper)
    daemon.start(Listener(sockdir / "x.sock"))
    fe = None
    try:
        fe = xen_frontend(sockdir / "x.sock")
        (guest,) = fe.memory.regions
        mapper.gntdev = f"/proc/self/fd/{guest.fd}"
        send_table(fe, XenMmapFlag.GRANT | XenMmapFlag.NO_ADVANCE_MAP)
        assert ioctl.calls == []  # the table maps nothing
        fe.setup_vring(0, 64)
        ring_maps = len(ioctl.requests(IOCTL_GNTDEV_MAP_GRANT_REF))
        assert ring_maps > 0  # the ring's areas, when its addresses were set
        data = RngDevice(fe).read(3 * PAGE)  # beyond the ring's page
        assert len(data) == 3 * PAGE and data != bytes(3 * PAGE)  # written through windows
        assert len(ioctl.requests(IOCTL_GNTDEV_MAP_GRANT_REF)) > ring_maps  # the buffer's
        for raw in ioctl.requests(IOCTL_GNTDEV_MAP_GRANT_REF):
            head = GntdevMapGrantRef.from_buffer_copy(raw[: ctypes.sizeof(GntdevMapGrantRef)])
            refs = (GntdevGrantRef * head.count).from_buffer_copy(
                raw, GntdevMapGrantRef.refs.offset
            )
            assert all(r.domid == 3 and r.ref < guest.memory_size // PAGE for r in refs)
        fe.close()
        fe = None
    finally:
        if fe is not None:
            fe.close()
        daemon.stop()
    maps = len(ioctl.requests(IOCTL_GNTDEV_MAP_GRANT_REF))
    assert len(ioctl.requests(IOCTL_GNTDEV_UNMAP_GRANT_REF)) == maps  # all released at the end
    assert daemon.last_error is None


def test_daemon_refuses_a_grant_region_without_gntdev_and_keeps_serving(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    missing = sockdir / "gntdev"
    daemon = VhostUserDaemon("xen-rng", XenRng(), mapper=XenMapper(gntdev=str(missing)))
    daemon.start(Listener(sockdir / "x.sock"))
    try:
        fe = xen_frontend(sockdir / "x.sock")
        with pytest.raises((BackendError, PeerClosed)):
            send_table(fe, XenMmapFlag.GRANT | XenMmapFlag.NO_ADVANCE_MAP)
        fe.close()
        fe = xen_frontend(sockdir / "x.sock")  # the daemon serves the next front-end
        send_table(fe, 0)
        fe.setup_vring(0, 64)
        assert len(RngDevice(fe).read(8)) == 8
        fe.close()
    finally:
        daemon.stop()
    assert f"needs {missing}: No such file or directory" in caplog.text
    assert daemon.last_error is None
