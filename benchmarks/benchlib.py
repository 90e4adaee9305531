"""Helpers shared by the benchmarks: tools, processes, CPU placement, CPU time, summaries.

Installs nothing: a missing tool is reported with the Debian package that provides it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: Debian packages providing the external tools (Debian 12 puts testpmd in dpdk-dev).
TOOL_PACKAGES = {
    "dpdk-testpmd": "dpdk-dev (Debian 12; the dpdk package alone lacks testpmd)",
    "qemu-storage-daemon": "qemu-system-common",
    "taskset": "util-linux",
}

REPO = Path(__file__).resolve().parent.parent


class MissingTool(RuntimeError):
    """An external program the benchmark needs is not installed."""


def require(tool: str) -> str:
    """Path of ``tool``, or MissingTool naming the package to install."""
    path = shutil.which(tool)
    if path is None:
        pkg = TOOL_PACKAGES.get(tool, "?")
        raise MissingTool(f"{tool} not found: install it with `apt-get install {pkg}`")
    return path


def missing(tool: str) -> str | None:
    """Why ``tool`` cannot be used (None when it is installed)."""
    try:
        require(tool)
    except MissingTool as err:
        return str(err)
    return None


def vhsm_command() -> list[str]:
    """How to run the `vhsm` command line with this interpreter."""
    return [sys.executable, "-m", "vhsm"]


def cpus() -> list[int]:
    """CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0))


def placement() -> tuple[int | None, int | None]:
    """(front-end CPU, back-end CPU): different cores when there are two or more."""
    avail = cpus()
    if len(avail) < 2:
        return None, None
    return avail[-1], avail[0]


def pinned(cmd: Sequence[str], cpu: int | None) -> list[str]:
    """``cmd`` under ``taskset -c cpu`` (unchanged when cpu is None or taskset is missing)."""
    if cpu is None or shutil.which("taskset") is None:
        return list(cmd)
    return ["taskset", "-c", str(cpu), *cmd]


def spawn(cmd: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with stdin closed and stdout+stderr going to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, timeout: float = 10.0) -> int:
    """Signal ``proc`` and wait for it (SIGKILL after ``timeout``); return its status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait until ``path`` exists (RuntimeError if ``proc`` died or time ran out)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads), from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max); zeros for no values."""
    if not values:
        return 0.0, 0.0, 0.0
    return min(values), statistics.median(values), max(values)


def machine() -> str:
    """One line naming the machine: nproc, CPU model, kernel, Python."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"nproc {os.cpu_count()}, {model}, kernel {platform.release()},"
        f" Python {platform.python_version()}"
    )


def fmt_rate(value: float) -> str:
    """A rate in human units (k, M)."""
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f} "
