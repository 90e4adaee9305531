"""Boot a throwaway Linux guest under QEMU (TCG) against vhost-user back-ends.

Independent of vhsm: a back-end is any process that listens on a unix socket.
Guest RAM is always a shared memfd (`share=on`): without it a vhost-user back-end
cannot map the rings and the guest hangs silently.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .initramfs import (
    MARK_BEGIN,
    MARK_KV,
    MARK_RESULT,
    VIRTIO_MODULES,
    GuestKernel,
    build_initramfs,
    cache_dir,
    find_busybox,
    find_kernel,
)

QEMU = "qemu-system-x86_64"
QSD = "qemu-storage-daemon"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL

# ---------------------------------------------------------------------------
# Devices


@dataclass(frozen=True)
class GuestDevice:
    """QEMU command-line arguments that add one device to the guest."""

    id: str
    args: tuple[str, ...]


def _check_socket_path(socket: Path) -> str:
    path = str(socket)
    if len(path.encode()) > UNIX_PATH_MAX:
        raise ValueError(f"unix socket path too long ({len(path)} bytes): {path}")
    return path


def vhost_user_device(
    driver: str, socket: Path, *, id: str, reconnect: int | None = None, **props: str | int
) -> GuestDevice:
    """A vhost-user device whose back-end listens on `socket` (QEMU connects as client).

    With `reconnect`, QEMU's chardev reconnects every that many seconds after the
    back-end went away (and QEMU restarts the device on the new connection).
    """
    extra = "".join(f",{k.replace('_', '-')}={v}" for k, v in props.items())
    chardev = f"socket,id={id}-chr,path={_check_socket_path(socket)}"
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    return GuestDevice(
        id=id,
        args=(
            "-chardev",
            chardev,
            "-device",
            f"{driver},id={id},chardev={id}-chr{extra}",
        ),
    )


def vhost_user_blk(
    socket: Path, *, id: str = "vublk0", reconnect: int | None = None, **props: str | int
) -> GuestDevice:
    """A vhost-user-blk-pci device (the guest sees /dev/vda if it is the only disk)."""
    return vhost_user_device("vhost-user-blk-pci", socket, id=id, reconnect=reconnect, **props)


def vhost_user_rng(socket: Path, *, id: str = "vurng0", **props: str | int) -> GuestDevice:
    """A vhost-user-rng-pci device (the guest sees /dev/hwrng)."""
    return vhost_user_device("vhost-user-rng-pci", socket, id=id, **props)


def vhost_user_net(
    socket: Path, *, mac: str, id: str = "vunet0", **props: str | int
) -> GuestDevice:
    """A virtio-net-pci NIC on a vhost-user netdev (the guest finds it by `mac`).

    ``vectors=0``: QEMU 7.2 under TCG crashes in msix_set_vector_notifiers when
    virtio-net uses MSI-X with a vhost-user back-end; the NIC uses INTx instead.
    """
    extra = "".join(f",{k.replace('_', '-')}={v}" for k, v in props.items())
    return GuestDevice(
        id=id,
        args=(
            "-chardev",
            f"socket,id={id}-chr,path={_check_socket_path(socket)}",
            "-netdev",
            f"vhost-user,id={id}-net,chardev={id}-chr",
            "-device",
            f"virtio-net-pci,id={id},netdev={id}-net,mac={mac},vectors=0{extra}",
        ),
    )


def qemu_virtio_rng(*, id: str = "rng0") -> GuestDevice:
    """QEMU's built-in virtio-rng-pci: a reference peer for the guest rng test."""
    return GuestDevice(
        id=id,
        args=(
            "-object",
            f"rng-random,id={id}-src,filename=/dev/urandom",
            "-device",
            f"virtio-rng-pci,id={id},rng={id}-src",
        ),
    )


# ---------------------------------------------------------------------------
# Prerequisites


@dataclass(frozen=True)
class GuestEnv:
    """Everything a guest boot needs from the host."""

    qemu: Path
    kernel: GuestKernel
    busybox: Path


def guest_env_problem() -> str | GuestEnv:
    """The guest environment, or a sentence saying what is missing and how to get it."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        return f"{QEMU} not found (run .ci/install-deps)"
    kernel = find_kernel()
    if kernel is None:
        return f"no guest kernel in {cache_dir()} (run .ci/install-deps)"
    busybox = find_busybox()
    if busybox is None:
        return "no static busybox (run .ci/install-deps: busybox-static)"
    return GuestEnv(Path(qemu), kernel, busybox)


def in_ci() -> bool:
    """True when running under CI (env CI=true), where missing prerequisites fail."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_guest_env(*tools: str) -> GuestEnv:
    """The guest environment for a test; skip (fail under CI=true) if anything is missing.

    Args:
        tools: extra executables the test needs, e.g. "qemu-storage-daemon".
    """
    import pytest

    env = guest_env_problem()
    missing = [t for t in tools if shutil.which(t) is None]
    problem = env if isinstance(env, str) else None
    if problem is None and missing:
        problem = f"{', '.join(missing)} not found (run .ci/install-deps)"
    if problem is not None:
        if in_ci():
            pytest.fail(f"guest test prerequisite missing under CI: {problem}")
        pytest.skip(problem)
    assert isinstance(env, GuestEnv)
    return env


# ---------------------------------------------------------------------------
# Back-end processes


def _listening_unix_paths(pid: int | None = None) -> set[str]:
    """Paths of unix sockets in listen state, from /proc/net/unix (no connect probe).

    With ``pid``, the table of that process's network namespace (a back-end started
    with ``ip netns exec`` lists its sockets there, not in the test's namespace).
    """
    paths: set[str] = set()
    table = "/proc/net/unix" if pid is None else f"/proc/{pid}/net/unix"
    try:
        with open(table) as f:
            lines = f.readlines()[1:]
    except FileNotFoundError:  # the process just exited
        return paths
    for line in lines:
        parts = line.split()
        if len(parts) >= 8 and int(parts[3], 16) & 0x10000:  # __SO_ACCEPTCON
            paths.add(parts[7])
    return paths


@dataclass
class BackendProcess:
    """A back-end daemon started for a test, with its output kept in a log file."""

    argv: list[str]
    socket: Path
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        """Everything the back-end printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_backend(
    argv: Sequence[str], socket: Path, log_path: Path, *, ready_timeout: float = 60.0
) -> BackendProcess:
    """Start a back-end and wait until it listens on `socket`.

    Raises:
        RuntimeError: the process exited or did not listen in time (message has its log).
    """
    sock = _check_socket_path(socket)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    backend = BackendProcess(list(argv), socket, log_path, proc)
    deadline = time.monotonic() + ready_timeout
    while sock not in _listening_unix_paths(proc.pid):
        if not backend.alive():
            raise RuntimeError(
                f"back-end exited with {proc.returncode} before listening on {sock}:\n"
                f"{backend.log()}"
            )
        if time.monotonic() > deadline:
            backend.stop()
            raise RuntimeError(
                f"back-end not listening on {sock} after {ready_timeout}s:\n{backend.log()}"
            )
        time.sleep(0.05)
    return backend


@contextlib.contextmanager
def running_backend(
    argv: Sequence[str], socket: Path, log_path: Path, *, ready_timeout: float = 60.0
) -> Iterator[BackendProcess]:
    """Context manager around start_backend that always stops the process."""
    backend = start_backend(argv, socket, log_path, ready_timeout=ready_timeout)
    try:
        yield backend
    finally:
        backend.stop()


@contextlib.contextmanager
def short_socket_dir() -> Iterator[Path]:
    """A fresh short directory under /tmp for unix sockets (sun_path holds 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vhsm-sock-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def qsd_blk_argv(image: Path, socket: Path, *, writable: bool = True) -> list[str]:
    """qemu-storage-daemon serving a raw image file as a vhost-user-blk export."""
    return [
        QSD,
        "--blockdev",
        f"driver=file,node-name=file0,filename={image}",
        "--export",
        "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
        f"addr.path={_check_socket_path(socket)},writable={'on' if writable else 'off'}",
    ]


# ---------------------------------------------------------------------------
# Booting


@dataclass
class GuestResult:
    """What one guest boot produced: verdict, key/values, and logs for diagnostics."""

    status: str  # "pass", "fail", "timeout", "backend-exited", "no-result"
    output: str  # the test channel (second serial port)
    console: str  # the kernel console (first serial port)
    qemu_log: str  # QEMU's own stdout/stderr
    returncode: int | None
    elapsed: float
    values: dict[str, str] = field(default_factory=dict)
    backend_logs: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None  # initramfs, logs, qemu.argv (own temp dir: removed on pass)

    @property
    def passed(self) -> bool:
        """True if the guest test script exited 0."""
        return self.status == "pass"

    def report(self, tail: int = 80) -> str:
        """A diagnostic text: verdict, test output, console tail, QEMU and back-end logs."""
        console_tail = "\n".join(self.console.splitlines()[-tail:])
        parts = [
            f"guest status={self.status} qemu rc={self.returncode} after {self.elapsed:.1f}s"
            f" (files in {self.workdir})",
            "--- test output ---",
            self.output,
            f"--- console (last {tail} lines) ---",
            console_tail,
            "--- qemu ---",
            self.qemu_log,
        ]
        for name, text in self.backend_logs.items():
            parts += [f"--- back-end {name} ---", text]
        return "\n".join(parts)

    def assert_passed(self) -> None:
        """Raise AssertionError with the full diagnostics unless the guest test passed."""
        if not self.passed:
            raise AssertionError(self.report())


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace").replace("\r\n", "\n")
    except FileNotFoundError:
        return ""


def parse_output(output: str) -> tuple[str, dict[str, str]]:
    """The verdict ("pass"/"fail"/"no-result") and the VHSM-KV key/values of a test channel."""
    status = "no-result"
    values: dict[str, str] = {}
    for line in output.splitlines():
        line = line.strip()
        if line.startswith(MARK_KV + " "):
            key, sep, value = line[len(MARK_KV) + 1 :].partition("=")
            if sep:
                values[key.strip()] = value.strip()
        elif line.startswith(MARK_RESULT + " "):
            status = "pass" if line.split()[1] == "PASS" else "fail"
    return status, values


def qemu_argv(
    env: GuestEnv,
    initramfs: Path,
    console: Path,
    output: Path,
    devices: Sequence[GuestDevice],
    *,
    memory_mb: int = 256,
    cmdline: str = "",
    smp: int = 1,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line of a guest boot (``extra_args`` go last)."""
    argv = [
        str(env.qemu),
        "-machine", "q35",
        "-accel", "tcg",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display", "none",
        "-monitor", "none",
        "-smp", str(smp),
        "-m", f"{memory_mb}M",
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-numa", "node,memdev=mem",
        "-serial", f"file:{console}",
        "-serial", f"file:{output}",
        "-kernel", str(env.kernel.vmlinuz),
        "-initrd", str(initramfs),
        # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer probe can
        # miss its window and panic ("IO-APIC + timer doesn't work"); skip the probe.
        "-append", f"console=ttyS0 panic=-1 loglevel=4 no_timer_check {cmdline}".strip(),
    ]  # fmt: skip
    for device in devices:
        argv += device.args
    return argv + list(extra_args)


def boot_guest(
    env: GuestEnv,
    *,
    script: str,
    devices: Sequence[GuestDevice] = (),
    timeout: float = 90.0,
    workdir: Path | None = None,
    backends: Sequence[BackendProcess] = (),
    modules: Sequence[str] = VIRTIO_MODULES,
    memory_mb: int = 256,
    cmdline: str = "",
    smp: int = 1,
    files: Mapping[str, bytes] | None = None,
) -> GuestResult:
    """Boot the guest, run `script` (busybox sh) in it, and return what happened.

    `files` are extra executables put in the initramfs (path inside the guest: bytes).

    The guest powers off after the script. QEMU is killed after `timeout` seconds,
    or as soon as one of `backends` exits (the guest would hang on its device).
    """
    from .vm import start_guest  # vm.py builds on this module

    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="vhsm-guest-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    initramfs = build_initramfs(
        env.kernel,
        script,
        work / "initramfs.cpio",
        modules=modules,
        busybox=env.busybox,
        files=files,
    )
    guest = start_guest(
        env,
        initramfs,
        work,
        devices=devices,
        backends=backends,
        memory_mb=memory_mb,
        smp=smp,
        cmdline=cmdline,
    )
    result = guest.result(guest.wait_exit(timeout))
    if own_dir and result.passed:
        shutil.rmtree(work, ignore_errors=True)
    return result


__all__ = [
    "MARK_BEGIN",
    "BackendProcess",
    "GuestDevice",
    "GuestEnv",
    "GuestResult",
    "boot_guest",
    "guest_env_problem",
    "in_ci",
    "parse_output",
    "qemu_argv",
    "qemu_virtio_rng",
    "qsd_blk_argv",
    "require_guest_env",
    "running_backend",
    "short_socket_dir",
    "start_backend",
    "vhost_user_blk",
    "vhost_user_device",
    "vhost_user_net",
    "vhost_user_rng",
]
