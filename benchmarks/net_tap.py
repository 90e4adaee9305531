"""Frames per second from a DPDK front-end through `vhsm serve net --tap` into a TAP.

The front-end is DPDK testpmd with a virtio-user port in txonly mode: it
transmits as fast as the back-end frees ring entries. The back-end is `vhsm
serve net --tap` in a network namespace of its own (root needed), where the
TAP is created and brought up; what reaches the host network is counted on
the TAP itself (its ``rx_packets``: every frame the device wrote into it), once
per second. The back-end's CPU time per frame comes from /proc (robust on a
busy machine, where frames per second are not). Front-end and back-end are
pinned to different CPUs when there are two. Installs nothing: says what is
missing.

``--device-side`` measures instead what the device's transmit path alone costs
per frame (no front-end process, no socket): bursts of 256 single-descriptor
frames posted on a TX ring in this process, the device's handling of each
burst timed in thread CPU seconds, writing into the TAP and, to separate the
Python work from the kernel's, into /dev/null.

Run: sudo .venv/bin/vhsm bench tap [--seconds 5] [--runs 3] [--sizes 64,1500] [--queues 1]
     [--busy-poll-us US]
     sudo .venv/bin/vhsm bench tap --device-side [--bursts 300] [--sizes 64,1500]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
import net_dpdk

from vhsm import speedups
from vhsm.commands.serve import busy_poll_micros


@dataclass
class Result:
    """Per-second frame rates and CPU cost of every run of one configuration."""

    samples: list[float] = field(default_factory=list)
    user_us_per_frame: list[float] = field(default_factory=list)
    sys_us_per_frame: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class Namespace:
    """A throwaway network namespace (``ip netns``), deleted by `close`."""

    def __init__(self) -> None:
        self.name = f"vhsm-bench-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def rx_packets(self, ifname: str) -> int | None:
        """Frames the TAP received from the device so far (None before it exists)."""
        proc = subprocess.run(
            self.argv(["cat", f"/sys/class/net/{ifname}/statistics/rx_packets"]),
            capture_output=True,
            text=True,
        )
        return int(proc.stdout) if proc.returncode == 0 else None

    def close(self) -> None:
        """Delete the namespace (and the TAP in it)."""
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid``, all threads."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


#: `vhsm serve net --busy-poll-us` (None: the device's default, 0); set from the options.
BUSY_POLL_US: int | None = None


def one_run(
    size: int, queues: int, seconds: float, warmup: int, workdir: Path, tag: str
) -> tuple[list[float], tuple[float, float]]:
    """One run: per-second frames/s on the TAP; the back-end's (user, system) µs per frame."""
    testpmd = benchlib.require("dpdk-testpmd")
    fe_cpu, be_cpu = benchlib.placement()
    sock = workdir / f"{tag}.sock"
    sock.unlink(missing_ok=True)
    ifname = f"vb{secrets.token_hex(3)}"
    ns = Namespace()
    try:
        poll = ["--busy-poll-us", str(BUSY_POLL_US)] if BUSY_POLL_US is not None else []
        be_cmd = [*benchlib.vhsm_command(), "serve", "net", "--tap", ifname,
                  "--queues", str(queues), "--socket", str(sock), *poll]  # fmt: skip
        be = benchlib.spawn(benchlib.pinned(ns.argv(be_cmd), be_cpu), workdir / f"{tag}-be.log")
        fe_log = workdir / f"{tag}-fe.log"
        try:
            benchlib.wait_for_socket(sock, be)
            subprocess.run(ns.argv(["ip", "link", "set", ifname, "up"]), check=True)
            vdev = f"net_virtio_user0,path={sock},queues={queues},queue_size=256"
            fe_cmd = [
                testpmd,
                *net_dpdk.eal_args(fe_cpu, f"vhsmtap{os.getpid()}{tag}", vdev),
                *net_dpdk.testpmd_args(queues, "txonly", [f"--txpkts={size}"]),
            ]
            fe = benchlib.spawn(benchlib.pinned(fe_cmd, fe_cpu), fe_log)
            try:
                # taskset and `ip netns exec` exec into vhsm: the pid is vhsm's
                samples, cpu = _sample(ns, ifname, be.pid, fe, seconds, warmup)
            finally:
                benchlib.stop(fe)
        finally:
            benchlib.stop(be)
    finally:
        ns.close()
    if not samples:
        tail = fe_log.read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"no frames reached the TAP ({fe_log}): {' | '.join(tail)}")
    return samples, cpu


def _sample(
    ns: Namespace,
    ifname: str,
    be_pid: int,
    fe: subprocess.Popen[bytes],
    seconds: float,
    warmup: int,
) -> tuple[list[float], tuple[float, float]]:
    """Wait for the first frames, drop ``warmup`` seconds, then sample once a second."""
    deadline = time.monotonic() + 30
    while (ns.rx_packets(ifname) or 0) == 0:
        if fe.poll() is not None or time.monotonic() > deadline:
            return [], (0.0, 0.0)
        time.sleep(0.1)
    time.sleep(warmup)
    samples: list[float] = []
    first = last = ns.rx_packets(ifname) or 0
    user0, sys0 = cpu_times(be_pid)
    t_last = time.monotonic()
    for _ in range(max(1, int(seconds))):
        time.sleep(1.0)
        now, count = time.monotonic(), ns.rx_packets(ifname) or 0
        samples.append((count - last) / (now - t_last))
        last, t_last = count, now
    user1, sys1 = cpu_times(be_pid)
    frames = max(1, last - first)
    return samples, ((user1 - user0) / frames * 1e6, (sys1 - sys0) / frames * 1e6)


def measure(
    sizes: Sequence[int], queues: int, runs: int, seconds: float, warmup: int, workdir: Path
) -> dict[int, Result]:
    """Every size ``runs`` times, sizes interleaved run by run."""
    results = {size: Result() for size in sizes}
    n = 0
    for r in range(runs):
        for size in sizes:
            n += 1
            res = results[size]
            try:
                got, cpu = one_run(size, queues, seconds, warmup, workdir, f"r{n}")
            except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
                res.failures.append(str(err))
                print(f"  {size:5d}B run {r + 1}: FAILED {err}", file=sys.stderr)
                continue
            res.samples.extend(got)
            res.user_us_per_frame.append(cpu[0])
            res.sys_us_per_frame.append(cpu[1])
            print(
                f"  {size:5d}B run {r + 1}: median {benchlib.fmt_rate(benchlib.summary(got)[1])}"
                f"frames/s, back-end CPU per frame {cpu[0]:.2f} µs user + {cpu[1]:.2f} µs system",
                file=sys.stderr,
                flush=True,
            )
    return results


def report(queues: int, results: dict[int, Result]) -> list[str]:
    """The table: frames/s on the TAP (min/median/max), back-end CPU µs per frame (medians)."""
    fe_cpu, be_cpu = benchlib.placement()
    lines = [
        f"machine: {benchlib.machine()}",
        f"placement: front-end testpmd on CPU {fe_cpu}, vhsm on CPU {be_cpu}",
        f"vhsm data path: {speedups.data_path()}; {queues} queue pair(s), 256-entry rings;"
        f" busy poll {BUSY_POLL_US or 0} µs",
        f"{'size':>6s} {'frames/s min':>13s} {'median':>11s} {'max':>11s}"
        f" {'user µs/frame':>14s} {'sys µs/frame':>13s}",
    ]
    for size, res in results.items():
        lo, med, hi = benchlib.summary(res.samples)
        user = benchlib.summary(res.user_us_per_frame)[1]
        system = benchlib.summary(res.sys_us_per_frame)[1]
        fail = f"  ({len(res.failures)} runs failed)" if res.failures else ""
        lines.append(
            f"{size:5d}B {lo:13,.0f} {med:11,.0f} {hi:11,.0f} {user:14.2f} {system:13.2f}{fail}"
        )
    return lines


#: Frames per burst of the device-side measurement (a full 256-entry ring).
BURST = 256


def device_side(sizes: Sequence[int], bursts: int) -> list[str]:
    """The table of ``--device-side``: run in a namespace of its own, one child per size."""
    lines = [
        f"device side of a {BURST}-frame TX burst, thread CPU per frame;"
        f" data path: {speedups.data_path()}",
        "into /dev/null: the Python work and a bare writev; into the TAP: and the kernel's",
        f"{'size':>6s} {'into the TAP ns':>16s} {'into /dev/null ns':>18s}",
    ]
    for size in sizes:
        ns = Namespace()
        try:
            proc = subprocess.run(
                ns.argv([sys.executable, __file__, "--inside-netns", str(size), str(bursts)]),
                capture_output=True,
                text=True,
            )
        finally:
            ns.close()
        if proc.returncode != 0:
            raise RuntimeError(f"device-side run of {size} B failed: {proc.stderr.strip()[-400:]}")
        tap_ns, null_ns = (float(x) for x in proc.stdout.split())
        lines.append(f"{size:5d}B {tap_ns:16,.0f} {null_ns:18,.0f}")
    return lines


def _inside_netns(size: int, bursts: int) -> None:
    """Child of `device_side`, in its namespace: print ns per frame into the TAP and null."""
    import numpy as np
    from net_burst import BUF_GPA, BUF_STRIDE, make_tx

    from vhsm.backend import EPOLLIN
    from vhsm.devices.net_tap import TapNetBackend
    from vhsm.devices.tap import VNET_HDR_SIZE

    if not 0 < size <= BUF_STRIDE - VNET_HDR_SIZE:
        raise SystemExit(f"--sizes: 1..{BUF_STRIDE - VNET_HDR_SIZE} bytes with --device-side")
    ifname = f"vb{secrets.token_hex(3)}"
    backend = TapNetBackend(ifname)
    subprocess.run(["ip", "link", "set", ifname, "up"], check=True)
    vrings, drv = make_tx(backend, False)  # type: ignore[arg-type]
    addrs = BUF_GPA + BUF_STRIDE * np.arange(BURST, dtype=np.uint64)
    lens = np.full(BURST, VNET_HDR_SIZE + size, dtype=np.uint32)
    device_readable = np.zeros(BURST, dtype=bool)
    tap_fd = backend.tap.fds[0]
    null_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    results = []
    try:
        for fd in (tap_fd, null_fd):
            backend.tap.fds[0] = fd
            cpu = 0.0
            for _ in range(bursts):
                drv.add_simple_batch(addrs, lens, device_readable)
                c0 = time.thread_time()
                for vring in vrings:
                    vring.begin_pass()
                backend.handle_event(1, EPOLLIN, vrings, 0)
                cpu += time.thread_time() - c0
                drv.get_used_batch()
            results.append(cpu / (bursts * BURST) * 1e9)
        assert backend.pair_stats[0].tx_errors == 0, backend.pair_stats
    finally:
        backend.tap.fds[0] = tap_fd
        os.close(null_fd)
        for vring in vrings:
            vring.reset()
        backend.close()
    print(*results)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (shared with `vhsm bench tap`)."""
    ap = argparse.ArgumentParser(
        prog="vhsm bench tap", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=5, help="measured seconds per run")
    ap.add_argument("--warmup", type=int, default=1, help="seconds dropped per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per frame size")
    ap.add_argument(
        "--sizes", type=net_dpdk._ints, default=[64, 1500], help="frame sizes (--txpkts)"
    )
    ap.add_argument("--queues", type=int, default=1, help="queue pairs (TAP queues)")
    ap.add_argument("--workdir", type=Path, help="keep logs and sockets here")
    ap.add_argument(
        "--busy-poll-us",
        type=busy_poll_micros,
        help="vhsm's busy-poll window after a burst (default: the TAP device's, 0 = off)",
    )
    ap.add_argument(
        "--device-side",
        action="store_true",
        help="the device's TX path alone, in this process: CPU per frame into the TAP and null",
    )
    ap.add_argument("--bursts", type=int, default=300, help="bursts per size (--device-side)")
    ap.add_argument("--inside-netns", nargs=2, type=int, help=argparse.SUPPRESS)
    return ap


def problem() -> str | None:
    """Why the benchmark cannot run here (None when it can)."""
    why = benchlib.missing("dpdk-testpmd")
    return why if why is not None else _root_problem()


def _root_problem() -> str | None:
    """Why no TAP can be made in a namespace here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root: the TAP is made in a network namespace of its own"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun missing (modprobe tun)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run it; exit 2 when something it needs is missing, 1 when every run failed."""
    args = build_parser().parse_args(argv)
    global BUSY_POLL_US
    BUSY_POLL_US = args.busy_poll_us
    if args.inside_netns:
        _inside_netns(*args.inside_netns)
        return 0
    why = problem() if not args.device_side else _root_problem()
    if why is not None:
        print(f"tap benchmark: {why}", file=sys.stderr)
        return 2
    if args.device_side:
        for line in device_side(args.sizes, max(1, args.bursts)):
            print(line)
        return 0
    with tempfile.TemporaryDirectory(prefix="vhsm-bench-tap-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = measure(args.sizes, args.queues, args.runs, args.seconds, args.warmup, workdir)
    for line in report(args.queues, results):
        print(line)
    return 0 if any(r.samples for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
