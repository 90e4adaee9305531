"""Guest kernel discovery and a tiny busybox initramfs, built without root or cpio(1).

The kernel comes from `.ci/install-deps`, which unpacks a Debian cloud kernel package
into a cache dir and writes `kernel.env` there. Debian packages carry no modules.dep
(depmod runs at install time), so module dependencies are read from each module's
`.modinfo` ELF section instead.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "guest"

#: Virtio modules the guest loads (dependencies are added and ordered automatically).
VIRTIO_MODULES = ("virtio_pci", "virtio_blk", "virtio_rng")

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


@dataclass(frozen=True)
class GuestKernel:
    """An unpacked guest kernel: the bzImage and its module tree."""

    vmlinuz: Path
    modules_dir: Path
    release: str
    package: str
    version: str


def cache_dir() -> Path:
    """Where `.ci/install-deps` unpacks the kernel (env VHSM_GUEST_CACHE overrides)."""
    return Path(os.environ.get("VHSM_GUEST_CACHE", DEFAULT_CACHE))


def find_kernel(cache: Path | None = None) -> GuestKernel | None:
    """Read `kernel.env` from the cache; None when no usable kernel is there."""
    env_file = (cache or cache_dir()) / "kernel.env"
    if not env_file.is_file():
        return None
    values: dict[str, str] = {}
    for line in env_file.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    try:
        kernel = GuestKernel(
            vmlinuz=Path(values["VMLINUZ"]),
            modules_dir=Path(values["MODULES_DIR"]),
            release=values["KERNEL_RELEASE"],
            package=values["KERNEL_PACKAGE"],
            version=values["KERNEL_VERSION"],
        )
    except KeyError:
        return None
    if not kernel.vmlinuz.is_file() or not kernel.modules_dir.is_dir():
        return None
    return kernel


def find_busybox() -> Path | None:
    """The static busybox from Debian's busybox-static (a dynamic one would need libc)."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file() and _is_static_elf(path):
            return path
    return None


def _is_static_elf(path: Path) -> bool:
    """True if the ELF file has no PT_INTERP program header (no dynamic loader)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # ELF64 only
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in _MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def _decompressed(path: Path) -> bytes:
    """Module bytes, decompressed on the host (busybox insmod may not decompress)."""
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise RuntimeError(f"{path} is zstd-compressed and zstd(1) is not installed")
        return subprocess.run([zstd, "-dc", str(path)], check=True, capture_output=True).stdout
    return raw


def _elf_section(data: bytes, wanted: str) -> bytes:
    """The contents of one named section of an ELF64 little-endian object."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not an ELF64 little-endian object")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        (name,) = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    names = data[str_off : str_off + str_size]
    for i in range(shnum):
        name_off, offset, size = header(i)
        name = names[name_off : names.index(b"\0", name_off)].decode()
        if name == wanted:
            return data[offset : offset + size]
    raise ValueError(f"no {wanted} section")


def module_depends(data: bytes) -> list[str]:
    """The `depends=` list of a kernel module's .modinfo section."""
    for entry in _elf_section(data, ".modinfo").split(b"\0"):
        if entry.startswith(b"depends="):
            value = entry[len(b"depends=") :].decode()
            return [d.replace("-", "_") for d in value.split(",") if d]
    return []


@dataclass(frozen=True)
class KernelModule:
    """One module to load in the guest, already decompressed."""

    name: str
    source: Path
    data: bytes


def modules_in_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[KernelModule]:
    """The wanted modules plus their dependencies, dependencies first.

    Modules built into the kernel (listed in modules.builtin) are dropped.
    """
    index: dict[str, Path] = {}
    for path in sorted((modules_dir / "kernel").rglob("*.ko*")):
        index.setdefault(_module_name(path), path)
    builtin: set[str] = set()
    builtin_file = modules_dir / "modules.builtin"
    if builtin_file.is_file():
        builtin = {_module_name(Path(line)) for line in builtin_file.read_text().split()}

    ordered: list[KernelModule] = []
    state: dict[str, str] = {}

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if state.get(name) == "done" or name in builtin:
            return
        if state.get(name) == "visiting":
            raise ValueError(f"module dependency cycle at {name}")
        if name not in index:
            raise FileNotFoundError(f"kernel module {name} not found under {modules_dir}")
        state[name] = "visiting"
        data = _decompressed(index[name])
        for dep in module_depends(data):
            visit(dep)
        state[name] = "done"
        ordered.append(KernelModule(name, index[name], data))

    for name in wanted:
        visit(name)
    return ordered


class CpioWriter:
    """Writes a cpio "newc" archive (what the kernel unpacks as initramfs)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,
            1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts.append(self._pad(header + encoded))
        if data:
            self._parts.append(self._pad(data))

    @staticmethod
    def _pad(chunk: bytes) -> bytes:
        return chunk + b"\0" * (-len(chunk) % 4)

    def directory(self, name: str) -> None:
        """Add a directory (mode 0755)."""
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file."""
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        """Add a character device node (no root needed: it is only bytes here)."""
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive bytes, with the trailer."""
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


#: Marker lines the guest prints; the host parses them from the test channel.
MARK_BEGIN = "VHSM-GUEST-BEGIN"
MARK_RESULT = "VHSM-GUEST-RESULT"
MARK_KV = "VHSM-KV"
MARK_INFO = "VHSM-GUEST-INFO"

_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# Test channel: the second serial port, read by the host as a separate file.
out=/dev/ttyS1
[ -c $out ] || out=/dev/null
say() {{ echo "$*"; echo "$*" >$out; }}
say "{info} kernel=$(uname -r)"
for m in $(cat /etc/modules.load); do
    insmod /lib/modules/$m.ko || say "{info} insmod-failed=$m"
done
say "{begin}"
( sh /test.sh; echo $? >/tmp/rc ) 2>&1 | tee $out
rc=$(cat /tmp/rc 2>/dev/null || echo 255)
if [ "$rc" = 0 ]; then say "{result} PASS"; else say "{result} FAIL rc=$rc"; fi
sync
poweroff -f
"""


def build_initramfs(
    kernel: GuestKernel,
    script: str,
    out: Path,
    *,
    modules: Sequence[str] = VIRTIO_MODULES,
    busybox: Path | None = None,
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write an initramfs that loads `modules`, runs `script` with sh, reports, powers off.

    `files`: extra executables, by path inside the guest (e.g. ``bin/tool``).
    """
    busybox = busybox or find_busybox()
    if busybox is None:
        raise FileNotFoundError("no static busybox (install Debian's busybox-static)")
    loaded = modules_in_load_order(kernel.modules_dir, modules)
    cpio = CpioWriter()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for module in loaded:
        cpio.file(f"lib/modules/{module.name}.ko", module.data)
    cpio.file("etc/modules.load", "".join(f"{m.name}\n" for m in loaded).encode())
    init = _INIT.format(info=MARK_INFO, begin=MARK_BEGIN, result=MARK_RESULT)
    cpio.file("init", init.encode(), 0o755)
    cpio.file("test.sh", script.encode(), 0o755)
    for name, data in (files or {}).items():
        cpio.file(name, data, 0o755)
    out.write_bytes(cpio.finish())
    return out
