"""A guest QEMU that a test talks to while it runs: QMP, output markers, migration targets.

:func:`harness.boot_guest` boots and waits for the guest to power off; tests that act
during the run (migrate it, kill its back-end) start a :class:`RunningGuest` instead,
wait for lines the guest prints, drive QEMU over QMP, then collect a
:class:`~harness.GuestResult` the same way.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .harness import (
    BackendProcess,
    GuestDevice,
    GuestEnv,
    GuestResult,
    _check_socket_path,
    _read,
    parse_output,
    qemu_argv,
)
from .qmp import QMPClient, qmp_args

__all__ = ["GuestStopped", "RunningGuest", "guest_files", "start_guest"]


def guest_files(workdir: Path, name: str) -> tuple[Path, Path, Path]:
    """The console, test-channel and QEMU log files of guest ``name`` in ``workdir``."""
    return (
        workdir / f"{name}.console.log",
        workdir / f"{name}.output.log",
        workdir / f"{name}.qemu.log",
    )


class GuestStopped(AssertionError):
    """The guest did not reach an expected point: QEMU exited, a back-end died, or timeout."""


@dataclass
class RunningGuest:
    """One QEMU process with its files; ``qmp`` is connected when the guest has a monitor."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    workdir: Path
    started: float
    qmp: QMPClient | None = None
    backends: list[BackendProcess] = field(default_factory=list)

    @property
    def console_path(self) -> Path:
        """The kernel console (first serial port)."""
        return guest_files(self.workdir, self.name)[0]

    @property
    def output_path(self) -> Path:
        """The test channel (second serial port)."""
        return guest_files(self.workdir, self.name)[1]

    @property
    def qemu_log_path(self) -> Path:
        """QEMU's own stdout and stderr."""
        return guest_files(self.workdir, self.name)[2]

    def output(self) -> str:
        """What the guest printed on its test channel so far."""
        return _read(self.output_path)

    def alive(self) -> bool:
        """True while QEMU runs."""
        return self.proc.poll() is None

    def _problem(self, deadline: float) -> str | None:
        """Why waiting should stop (a back-end died, or time is up), else None."""
        dead = [b for b in self.backends if not b.alive()]
        if dead:
            return f"back-end {dead[0].socket} exited with {dead[0].proc.returncode}"
        if time.monotonic() > deadline:
            return "timeout"
        return None

    def find_line(self, prefix: str, others: Sequence[RunningGuest] = ()) -> str | None:
        """The first line starting with ``prefix`` on this guest's (or ``others``') channel."""
        for guest in (self, *others):
            for line in guest.output().splitlines():
                if line.strip().startswith(prefix):
                    return line.strip()
        return None

    def wait_for_line(
        self, prefix: str, *, timeout: float, others: Sequence[RunningGuest] = ()
    ) -> str:
        """Wait until a line starting with ``prefix`` appears on this guest's test channel.

        ``others`` are guests whose output counts too (a migrated guest prints on the
        destination); the first matching line of any of them is returned.

        Raises:
            GuestStopped: every QEMU exited, a back-end died, or ``timeout`` seconds passed.
        """
        deadline = time.monotonic() + timeout
        while (line := self.find_line(prefix, others)) is None:
            if not any(g.alive() for g in (self, *others)):
                problem = f"QEMU exited with {self.proc.returncode}"
            else:
                problem = self._problem(deadline)
            if problem is not None:
                raise GuestStopped(f"waiting for {prefix!r}: {problem}\n{self.report()}")
            time.sleep(0.1)
        return line

    def wait_exit(self, timeout: float) -> str | None:
        """Wait for QEMU to exit (the guest powers off); kill it after ``timeout`` seconds.

        Returns:
            None if it exited by itself, else "timeout" or "backend-exited".
        """
        deadline = time.monotonic() + timeout
        status: str | None = None
        while self.alive():
            problem = self._problem(deadline)
            if problem is not None:
                status = "timeout" if problem == "timeout" else "backend-exited"
                break
            time.sleep(0.1)
        self.kill()
        return status

    def kill(self) -> None:
        """Stop QEMU now (idempotent) and close the monitor connection."""
        if self.qmp is not None:
            self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def result(self, status: str | None = None, *, extra_output: str = "") -> GuestResult:
        """The guest's verdict and values; ``extra_output`` is prepended (a migration source)."""
        text = extra_output + self.output()
        verdict, values = parse_output(text)
        return GuestResult(
            status=status or verdict,
            output=text,
            console=_read(self.console_path),
            qemu_log=_read(self.qemu_log_path),
            returncode=self.proc.returncode,
            elapsed=time.monotonic() - self.started,
            values=values,
            backend_logs={f"{b.argv[0]} ... ({b.socket})": b.log() for b in self.backends},
            workdir=self.workdir,
        )

    def report(self) -> str:
        """Diagnostics of the guest so far (does not stop it)."""
        return self.result("running" if self.alive() else "exited").report()


def start_guest(
    env: GuestEnv,
    initramfs: Path,
    workdir: Path,
    *,
    name: str = "guest",
    devices: Sequence[GuestDevice] = (),
    backends: Sequence[BackendProcess] = (),
    qmp_socket: Path | None = None,
    extra_args: Sequence[str] = (),
    memory_mb: int = 256,
    smp: int = 1,
    cmdline: str = "",
) -> RunningGuest:
    """Start QEMU on ``initramfs`` and return at once; with ``qmp_socket``, connect QMP.

    Files go to ``workdir`` with ``name`` as prefix, so a migration source and its
    destination can share one directory. ``extra_args`` go last (e.g. ``-incoming``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    console, output, qemu_log = guest_files(workdir, name)
    args = [*extra_args]
    if qmp_socket is not None:
        _check_socket_path(qmp_socket)
        args += qmp_args(qmp_socket)
    argv = qemu_argv(
        env,
        initramfs,
        console,
        output,
        devices,
        memory_mb=memory_mb,
        cmdline=cmdline,
        smp=smp,
        extra_args=args,
    )
    (workdir / f"{name}.qemu.argv").write_text(" ".join(argv) + "\n")
    with open(qemu_log, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    running = RunningGuest(name, argv, proc, workdir, time.monotonic(), None, list(backends))
    if qmp_socket is not None:
        try:
            running.qmp = QMPClient(qmp_socket)
        except Exception:
            running.kill()
            raise
    return running
