"""The conformance matrix: `vhsm audit` against every implementation this machine can start.

Back-ends (``vhsm audit backend``): vhsm's own devices, qemu-storage-daemon,
QEMU's C virtiofsd, and DPDK's vhost PMD (testpmd). Front-ends
(``vhsm audit frontend``): QEMU booting a guest against the auditor, and
DPDK's virtio-user PMD (testpmd). Each audit's JSON report is kept; the rule
x implementation table is written as Markdown (by default into the docs:
``docs/reference/conformance.md``). Run it with ``make conformance``.

An implementation whose program is missing is listed with the reason and left
out of the table. Everything runs on this machine, on unix sockets under /tmp.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the guest harness (QEMU boots) lives there

from guest.harness import (  # noqa: E402
    BackendProcess,
    guest_env_problem,
    qsd_blk_argv,
    running_backend,
    start_backend,
    vhost_user_blk,
)

from vhsm import __version__  # noqa: E402
from vhsm.session.rules import all_rules  # noqa: E402

VHSM = [sys.executable, "-m", "vhsm"]
TESTPMD = "dpdk-testpmd"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
OUT = ROOT / "docs" / "reference" / "conformance.md"
DPDK_EAL = ["--lcores", "0,1", "--no-pci", "--no-huge", "-m", "512", "--log-level", "lib.eal:error"]


@dataclass
class Result:
    """One implementation's audit: what ran, and its JSON report (or why it did not run)."""

    name: str
    role: str  # "back-end" or "front-end"
    command: str
    report: dict[str, Any] | None = None
    problem: str | None = None
    version: str = ""
    notes: list[str] = field(default_factory=list)


class Unavailable(Exception):
    """The implementation cannot be started on this machine (the message says why)."""


def need(tool: str, package: str) -> str:
    """The path of `tool`, or Unavailable naming the Debian package."""
    path = shutil.which(tool) or (tool if os.access(tool, os.X_OK) else None)
    if path is None:
        raise Unavailable(f"{tool} not found (Debian package {package}; see .ci/install-deps)")
    return path


def version_of(argv: list[str]) -> str:
    """The first line a program prints for its version option ('' when it prints none)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


def audit_backend(socket: Path, device: str, out: Path) -> dict[str, Any]:
    """Run `vhsm audit backend` against `socket`; return its JSON report."""
    argv = [*VHSM, "audit", "backend", "--socket", str(socket), "--device", device]
    argv += ["--format", "json", "--output", str(out), "--timeout", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if not out.exists():
        raise RuntimeError(f"vhsm audit backend wrote no report: {done.stderr.strip()}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


@contextlib.contextmanager
def started(argv: list[str], socket: Path, log: Path) -> Iterator[BackendProcess]:
    """A back-end process listening at `socket` (RuntimeError with its log if it never does)."""
    with running_backend(argv, socket, log) as proc:
        yield proc


@contextlib.contextmanager
def restarted(argv: list[str], socket: Path, log: Path) -> Iterator[list[int]]:
    """A one-connection daemon started again each time it exits; yields the restart count.

    Some back-ends (QEMU's C virtiofsd) serve one front-end and exit, as their
    front-end expects; the suite opens a connection per case, so each case gets a
    fresh process. A crash then looks like a clean close: the notes say so.
    """
    restarts = [0]
    stop = threading.Event()
    current = [start_backend(argv, socket, log.with_suffix(".0.log"))]

    def supervise() -> None:
        while not stop.is_set():
            if current[0].alive():
                time.sleep(0.02)
                continue
            with contextlib.suppress(OSError):
                socket.unlink()
            if stop.is_set():
                return
            restarts[0] += 1
            try:
                current[0] = start_backend(argv, socket, log.with_suffix(f".{restarts[0]}.log"))
            except RuntimeError:
                time.sleep(0.2)

    thread = threading.Thread(target=supervise, daemon=True)
    thread.start()
    try:
        yield restarts
    finally:
        stop.set()
        thread.join()
        current[0].stop()


# --- back-ends ----------------------------------------------------------------------------
def backend_vhsm(device: str, work: Path) -> Result:
    """One of vhsm's own devices under `vhsm serve`."""
    sock = work / f"{device}.sock"
    argv = [*VHSM, "serve", device, "--socket", str(sock)]
    if device == "blk":
        image = work / "disk.img"
        image.write_bytes(bytes(16 << 20))
        argv += ["--file", str(image)]
    if device == "vsock":
        argv += ["--guest-cid", "3", "--uds-path", str(work / "vsock")]
    result = Result(f"vhsm {device}", "back-end", " ".join(["vhsm", *argv[3:]]))
    result.version = f"vhsm {__version__}"
    with started(argv, sock, work / f"{device}.log"):
        result.report = audit_backend(sock, device, work / f"{device}.json")
    return result


def backend_qsd(work: Path) -> Result:
    """qemu-storage-daemon exporting a raw image as vhost-user-blk."""
    need("qemu-storage-daemon", "qemu-system-common")
    image, sock = work / "qsd.img", work / "qsd.sock"
    image.write_bytes(bytes(16 << 20))
    argv = qsd_blk_argv(image, sock)
    result = Result("qemu-storage-daemon (blk)", "back-end", " ".join(argv))
    result.version = version_of(["qemu-storage-daemon", "--version"])
    with started(argv, sock, work / "qsd.log"):
        result.report = audit_backend(sock, "blk", work / "qsd.json")
    return result


def backend_virtiofsd(work: Path) -> Result:
    """QEMU's C virtiofsd (Debian 12's qemu-system-common) sharing a scratch directory."""
    need(VIRTIOFSD, "qemu-system-common")
    shared, sock = work / "shared", work / "virtiofsd.sock"
    shared.mkdir()
    argv = [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={shared}", "-o", "cache=none"]
    argv += ["-o", "sandbox=chroot"]
    result = Result("virtiofsd (QEMU, C)", "back-end", " ".join(argv))
    result.version = version_of([VIRTIOFSD, "--version"])
    result.notes.append("audited as a generic device (the suite has no virtio-fs round trip)")
    with restarted(argv, sock, work / "virtiofsd.log") as restarts:
        result.report = audit_backend(sock, "generic", work / "virtiofsd.json")
    result.notes.append(
        f"virtiofsd serves one front-end and exits, so it was started again for every "
        f"connection ({restarts[0]} restarts): a crash cannot be told from a clean close"
    )
    return result


def backend_dpdk(work: Path) -> Result:
    """DPDK's vhost PMD in testpmd, listening (client=0) as a vhost-user-net back-end."""
    testpmd = need(TESTPMD, "dpdk-dev")
    sock = work / "dpdk-vhost.sock"
    argv = [testpmd, *DPDK_EAL, "--file-prefix", f"vhsmconfbe{os.getpid()}"]
    argv += ["--vdev", f"net_vhost0,iface={sock},client=0", "--"]
    argv += ["--total-num-mbufs=16384", "--forward-mode=rxonly", "--stats-period", "10"]
    result = Result("DPDK vhost PMD (testpmd)", "back-end", " ".join(argv))
    result.version = dpdk_version()
    with started(argv, sock, work / "dpdk-vhost.log"):
        result.report = audit_backend(sock, "net", work / "dpdk-vhost.json")
    return result


def dpdk_version() -> str:
    """The installed DPDK version (from Debian's package database)."""
    return version_of(["dpkg-query", "-W", "-f", "DPDK ${Version}", "dpdk-dev"])


# --- front-ends ----------------------------------------------------------------------------
def auditor(device: str, sock: Path, out: Path, extra: list[str]) -> list[str]:
    """The `vhsm audit frontend` command for one front-end."""
    argv = [*VHSM, "audit", "frontend", "--listen", str(sock), "--device", device]
    return [*argv, "--once", "--format", "json", "--output", str(out), *extra]


def finish_auditor(proc: BackendProcess, out: Path, grace: float = 30.0) -> dict[str, Any]:
    """Wait for the auditor to end (it does after the front-end left); return its report."""
    try:
        proc.proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.stop()
    if not out.exists():
        raise RuntimeError(f"vhsm audit frontend wrote no report:\n{proc.log()}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def frontend_qemu(device: str, work: Path) -> Result:
    """QEMU booting a Linux guest that uses a vhost-user blk (write, read, flush) or rng device."""
    from guest.harness import boot_guest, vhost_user_rng
    from guest.scripts import BlkPlan, rng_script

    env = guest_env_problem()
    if isinstance(env, str):
        raise Unavailable(env)
    sock, out = work / f"qemu-{device}.sock", work / f"qemu-{device}.json"
    if device == "blk":
        plan = BlkPlan()
        image = plan.prepare_image(work / "guest-disk.img")
        argv = auditor("blk", sock, out, ["--file", str(image)])
        script, guest_device = plan.script(), vhost_user_blk(sock)
    else:
        argv = auditor("rng", sock, out, [])
        script, guest_device = rng_script(4096), vhost_user_rng(sock)
    qdev = f"vhost-user-{device}-pci"
    what = "guest boot and I/O" if device == "blk" else "guest reads /dev/hwrng"
    result = Result(
        f"QEMU {qdev} ({what})",
        "front-end",
        f"vhsm audit frontend --device {device}; qemu-system-x86_64 ... -device {qdev}",
    )
    result.version = version_of([str(env.qemu), "--version"])
    proc = start_backend(argv, sock, work / f"qemu-{device}.log")
    try:
        guest = boot_guest(
            env, script=script, devices=[guest_device], backends=[proc], workdir=work / "guest"
        )
        result.report = finish_auditor(proc, out)
    finally:
        proc.stop()
    if not guest.passed:
        result.notes.append(f"the guest's own check ended with status {guest.status}")
    return result


def frontend_dpdk(work: Path) -> Result:
    """DPDK's virtio-user PMD in testpmd, transmitting for a few seconds."""
    testpmd = need(TESTPMD, "dpdk-dev")
    sock, out = work / "dpdk-fe.sock", work / "dpdk-fe.json"
    proc = start_backend(auditor("net", sock, out, []), sock, work / "dpdk-fe.log")
    argv = [testpmd, *DPDK_EAL, "--file-prefix", f"vhsmconffe{os.getpid()}"]
    argv += ["--vdev", f"net_virtio_user0,path={sock},queues=1", "--"]
    argv += ["--total-num-mbufs=16384", "--forward-mode=txonly", "--stats-period", "1"]
    result = Result("DPDK virtio-user PMD (testpmd)", "front-end", " ".join(argv))
    result.version = dpdk_version()
    try:
        with open(work / "dpdk-fe-testpmd.log", "wb") as log:
            pmd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        time.sleep(4)
        pmd.send_signal(signal.SIGINT)
        try:
            pmd.wait(30)
        except subprocess.TimeoutExpired:
            pmd.kill()
            pmd.wait()
        result.report = finish_auditor(proc, out)
    finally:
        proc.stop()
    return result


# --- the table -------------------------------------------------------------------------------
def cells(result: Result) -> dict[str, str]:
    """Rule id -> what the audit of `result` says about it."""
    assert result.report is not None
    out: dict[str, str] = {}
    ran: dict[str, list[str]] = {}
    for case in result.report.get("cases", []):
        ran.setdefault(case["rule_id"], []).append(case["outcome"])
    broken: dict[str, int] = {}
    for finding in result.report.get("findings", []):
        broken[finding["rule_id"]] = broken.get(finding["rule_id"], 0) + 1
    for rule_id in all_rules():
        if rule_id in broken:
            out[rule_id] = f"✗ {broken[rule_id]}" if broken[rule_id] > 1 else "✗"
        elif any(o != "skipped" for o in ran.get(rule_id, [])):
            out[rule_id] = "✓"
        elif rule_id in ran:
            out[rule_id] = "skip"
        elif result.role == "front-end":
            out[rule_id] = "·"
        else:
            out[rule_id] = ""
    return out


def summary(result: Result) -> str:
    """One table row of counts for `result`."""
    assert result.report is not None
    findings = result.report.get("findings", [])
    severities = ("MUST", "SHOULD", "INTEROP")
    by_severity = {s: sum(f["severity"] == s for f in findings) for s in severities}
    cases = result.report.get("cases", [])
    failed = sum(c["outcome"] in ("fail", "wedged", "crashed") for c in cases)
    skipped = sum(c["outcome"] == "skipped" for c in cases)
    case_text = f"{len(cases)} run, {failed} failed, {skipped} skipped" if cases else "—"
    return (
        f"| {result.name} | {result.role} | {result.version or '—'} | "
        f"{result.report['verdict'].upper()} | {by_severity['MUST']} / {by_severity['SHOULD']} / "
        f"{by_severity['INTEROP']} | {case_text} |"
    )


def markdown(results: list[Result], when: str) -> str:
    """The conformance page."""
    done = [r for r in results if r.report is not None]
    lines = [
        "# Conformance matrix",
        "",
        "`vhsm audit` run against every vhost-user implementation the project can start on",
        "one machine: back-ends under `vhsm audit backend` (scenarios and bad inputs), front-ends",
        "under `vhsm audit frontend` (a recorded session checked against every rule). Regenerate",
        "it with one command from a checkout (after `sudo .ci/install-deps`):",
        "",
        "```sh",
        "make conformance        # = .venv/bin/python conformance/run.py",
        "```",
        "",
        f"Generated {when} on {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}. The [protocol rules](rules.md) page explains every",
        "rule id.",
        "",
        "## Implementations",
        "",
        "| implementation | role | version | verdict | findings MUST / SHOULD / INTEROP | cases |",
        "| --- | --- | --- | --- | --- | --- |",
        *(summary(r) for r in done),
        "",
    ]
    missing = [r for r in results if r.report is None]
    if missing:
        lines += ["Not run here:", ""]
        lines += [f"- {r.name}: {r.problem}" for r in missing]
        lines.append("")
    lines += [
        "## Rules by implementation",
        "",
        "✓ the rule was exercised and held; ✗ it was broken (with the count when more than",
        "once); skip: its cases need a feature the implementation does not offer; · (front-ends)",
        "nothing in the recorded session broke it; empty: no case exercises it for that device.",
        "",
    ]
    header = "| rule | severity | " + " | ".join(f"{i + 1}" for i in range(len(done))) + " |"
    lines += [
        "Columns: " + "; ".join(f"**{i + 1}** {r.name}" for i, r in enumerate(done)) + ".",
        "",
        header,
        "| --- | --- | " + " | ".join("---" for _ in done) + " |",
    ]
    table = [cells(r) for r in done]
    for rule_id, known in all_rules().items():
        row = " | ".join(t[rule_id] for t in table)
        lines.append(f"| {rule_id} | {known.severity} | {row} |")
    lines += ["", "## Findings", ""]
    for r in done:
        assert r.report is not None
        lines += [f"### {r.name}", "", f"`{r.command}`", ""]
        lines += [f"- {note}" for note in r.notes]
        findings = r.report.get("findings", [])
        if not findings:
            lines += ["No findings.", ""]
            continue
        for f in findings:
            where = f"case *{f['case']}*" if f.get("case") else f"{f['request']} in {f['state']}"
            detail = " ".join(str(f["detail"]).split())
            lines.append(f"- **{f['severity']}** {f['rule_id']} ({where}): {detail}")
        lines.append("")
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def saved_date(path: Path) -> str:
    """The day a saved reports file was written."""
    return time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime))


IMPLEMENTATIONS: list[tuple[str, str, Callable[[Path], Result]]] = [
    ("vhsm rng", "back-end", lambda w: backend_vhsm("rng", w)),
    ("vhsm blk", "back-end", lambda w: backend_vhsm("blk", w)),
    ("vhsm net", "back-end", lambda w: backend_vhsm("net", w)),
    ("vhsm vsock", "back-end", lambda w: backend_vhsm("vsock", w)),
    ("qemu-storage-daemon (blk)", "back-end", backend_qsd),
    ("virtiofsd (QEMU, C)", "back-end", backend_virtiofsd),
    ("DPDK vhost PMD (testpmd)", "back-end", backend_dpdk),
    (
        "QEMU vhost-user-blk-pci (guest boot and I/O)",
        "front-end",
        lambda w: frontend_qemu("blk", w),
    ),
    (
        "QEMU vhost-user-rng-pci (guest reads /dev/hwrng)",
        "front-end",
        lambda w: frontend_qemu("rng", w),
    ),
    ("DPDK virtio-user PMD (testpmd)", "front-end", frontend_dpdk),
]


def main(argv: list[str] | None = None) -> int:
    """Run every audit this machine allows and write the matrix; 0 unless nothing ran."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"Markdown page (default {OUT})")
    parser.add_argument("--json", type=Path, help="also write every report here (one JSON file)")
    parser.add_argument("-k", metavar="TEXT", help="only implementations whose name has TEXT")
    parser.add_argument(
        "--from-json", type=Path, metavar="FILE", help="write the page from saved reports (--json)"
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text(encoding="utf-8"))
        loaded = [
            Result(
                name,
                entry["role"],
                entry.get("command", ""),
                report=entry.get("report"),
                problem=entry.get("problem"),
                version=entry.get("version", ""),
                notes=entry.get("notes", []),
            )
            for name, entry in saved.items()
        ]
        args.out.write_text(markdown(loaded, saved_date(args.from_json)) + "\n", encoding="utf-8")
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # clean up the peers on SIGTERM too
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="vhsm-conf-", dir="/tmp") as tmp:
        for number, (name, role, run) in enumerate(IMPLEMENTATIONS):
            if args.k and args.k.lower() not in name.lower():
                continue
            work = Path(tmp) / f"i{number}"
            work.mkdir()
            print(f"conformance: {name} ...", file=sys.stderr, flush=True)
            try:
                result = run(work)
                result.command = result.command.replace(str(work), "$WORK")
            except Unavailable as why:
                result = Result(name, role, "", problem=str(why))
            except Exception as exc:  # a peer that cannot be audited is reported, not fatal
                result = Result(name, role, "", problem=f"{type(exc).__name__}: {exc}")
            status = result.problem or (result.report or {}).get("verdict", "?")
            print(f"conformance: {name}: {status}", file=sys.stderr, flush=True)
            results.append(result)
    when = time.strftime("%Y-%m-%d")
    args.out.write_text(markdown(results, when) + "\n", encoding="utf-8")
    if args.json is not None:
        doc = {
            r.name: {
                "role": r.role,
                "command": r.command,
                "report": r.report,
                "problem": r.problem,
                "version": r.version,
                "notes": r.notes,
            }
            for r in results
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"conformance: wrote {args.out}", file=sys.stderr)
    return 0 if any(r.report is not None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
