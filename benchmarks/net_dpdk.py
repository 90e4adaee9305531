"""Packets per second into `vhsm serve net --mode sink` vs DPDK's own vhost back-end.

The front-end is DPDK testpmd with a virtio-user port (txonly: it transmits as fast
as the back-end frees ring entries, so its Tx pps is the back-end's throughput).
The back-end is either `vhsm serve net --mode sink` or a second testpmd with a
vhost port in rxonly mode; runs alternate between the two so both see the same
machine state (on a 2-vCPU guest DPDK alone swings between ~5 and ~19 Mpps).
Front-end and back-end are pinned to different CPUs. Guest memory is shared by
memfd (`--no-huge -m 512`) unless hugepages are free (`--in-memory
--single-file-segments`). Installs nothing: says what is missing.

Run: .venv/bin/python benchmarks/net_dpdk.py [--seconds 5] [--runs 3]
     [--sizes 64,1500] [--rings split,packed] [--queues 1,2] [--ring-sizes 256,1024]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import benchlib

from vhsm import speedups
from vhsm.commands.serve import busy_poll_micros
from vhsm.devices import net

_TX_PPS = re.compile(rb"Tx-pps:\s+(\d+)")
BACKENDS = ("vhsm", "dpdk")
#: `vhsm serve net --busy-poll-us` (None: the device's default); set from the options.
BUSY_POLL_US: int | None = None
#: `vhsm serve net --sink-reads`: copy (what DPDK's back-end does) or checksum (options).
SINK_READS = "copy"


@dataclass
class Config:
    """One measured configuration."""

    size: int
    ring: str
    queues: int
    ring_size: int = 256  # virtio_user's queue_size (its default)

    @property
    def label(self) -> str:
        """Short name for the table."""
        return f"{self.ring:6s} {self.queues}q {self.ring_size:4d}d {self.size:4d}B"


@dataclass
class Result:
    """Per-second Tx pps samples of every run of one back-end in one configuration."""

    samples: list[float] = field(default_factory=list)
    run_medians: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def hugepages_free() -> bool:
    """Whether hugetlbfs is mounted and has free pages (else memfd with --no-huge)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        mounts = Path("/proc/mounts").read_text()
    except OSError:
        return False
    free = re.search(r"HugePages_Free:\s+(\d+)", meminfo)
    return bool(free and int(free.group(1)) >= 256 and " hugetlbfs " in mounts)


def eal_args(cpu: int | None, prefix: str, vdev: str) -> list[str]:
    """EAL options: two lcores on one CPU, no PCI, memfd-shareable memory."""
    lcores = f"0@{cpu},1@{cpu}" if cpu is not None else "0,1"
    mem = ["--in-memory", "--single-file-segments"] if hugepages_free() else ["--no-huge"]
    return [
        "--lcores",
        lcores,
        "--no-pci",
        *mem,
        "-m",
        "512",
        "--file-prefix",
        prefix,
        "--vdev",
        vdev,
        "--log-level",
        "lib.eal:error",
    ]


def testpmd_args(queues: int, mode: str, extra: Sequence[str] = ()) -> list[str]:
    """testpmd application options (after ``--``)."""
    return [
        "--",
        "--total-num-mbufs=16384",
        f"--rxq={queues}",
        f"--txq={queues}",
        f"--forward-mode={mode}",
        "--stats-period",
        "1",
        *extra,
    ]


def frontend_vdev(cfg: Config, sock: Path) -> str:
    """The front-end's virtio-user port: queue pairs, ring size and layout of ``cfg``."""
    vdev = f"net_virtio_user0,path={sock},queues={cfg.queues},queue_size={cfg.ring_size}"
    return vdev + (",packed_vq=1" if cfg.ring == "packed" else "")


def one_run(
    backend: str, cfg: Config, seconds: float, warmup: int, workdir: Path, tag: str
) -> list[float]:
    """Run the front-end against ``backend`` once; return its per-second Tx pps samples."""
    testpmd = benchlib.require("dpdk-testpmd")
    fe_cpu, be_cpu = benchlib.placement()
    sock = workdir / f"{tag}.sock"
    sock.unlink(missing_ok=True)
    if backend in ("vhsm", "vhsm-pure"):
        be_cmd = [
            *(["env", "VHSM_PURE_PYTHON=1"] if backend == "vhsm-pure" else []),
            *benchlib.vhsm_command(),
            "serve",
            "net",
            "--socket",
            str(sock),
            "--mode",
            "sink",
            "--queues",
            str(cfg.queues),
            *(["--busy-poll-us", str(BUSY_POLL_US)] if BUSY_POLL_US is not None else []),
            "--sink-reads",
            SINK_READS,
        ]
    else:
        vdev = f"net_vhost0,iface={sock},queues={cfg.queues}"
        be_cmd = [
            testpmd,
            *eal_args(be_cpu, f"vhsmbe{os.getpid()}{tag}", vdev),
            *testpmd_args(cfg.queues, "rxonly"),
        ]
    be = benchlib.spawn(benchlib.pinned(be_cmd, be_cpu), workdir / f"{tag}-backend.log")
    fe_log = workdir / f"{tag}-frontend.log"
    try:
        benchlib.wait_for_socket(sock, be)
        fe_cmd = [
            testpmd,
            *eal_args(fe_cpu, f"vhsmfe{os.getpid()}{tag}", frontend_vdev(cfg, sock)),
            *testpmd_args(cfg.queues, "txonly", [f"--txpkts={cfg.size}"]),
        ]
        fe = benchlib.spawn(benchlib.pinned(fe_cmd, fe_cpu), fe_log)
        try:
            # Samples start once the port is up; wait for warm-up + measured ones.
            deadline = time.monotonic() + seconds + warmup + 30
            want = int(seconds) + warmup + 1
            while time.monotonic() < deadline and fe.poll() is None:
                if len(_TX_PPS.findall(fe_log.read_bytes())) >= want:
                    break
                time.sleep(0.2)
        finally:
            benchlib.stop(fe)
    finally:
        benchlib.stop(be)
    found = [float(x) for x in _TX_PPS.findall(fe_log.read_bytes())]
    samples = found[1 + warmup :]  # the first line is before forwarding starts
    if not samples:
        tail = fe_log.read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"no Tx-pps samples from testpmd ({fe_log}): {' | '.join(tail)}")
    return samples


def measure(
    configs: Sequence[Config], runs: int, seconds: float, warmup: int, workdir: Path
) -> dict[tuple[str, str], Result]:
    """Alternate vhsm and DPDK runs per configuration; collect the samples."""
    results: dict[tuple[str, str], Result] = {}
    n = 0
    for cfg in configs:
        for r in range(runs):
            for backend in BACKENDS:
                res = results.setdefault((cfg.label, backend), Result())
                n += 1
                try:
                    got = one_run(backend, cfg, seconds, warmup, workdir, f"r{n}")
                except (RuntimeError, OSError) as err:
                    res.failures.append(str(err))
                    print(f"  {cfg.label} {backend} run {r + 1}: FAILED {err}", file=sys.stderr)
                    continue
                res.samples.extend(got)
                res.run_medians.append(benchlib.summary(got)[1])
                print(
                    f"  {cfg.label} {backend:9s} run {r + 1}: median"
                    f" {benchlib.fmt_rate(res.run_medians[-1])}pps",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def report(configs: Sequence[Config], results: dict[tuple[str, str], Result]) -> list[str]:
    """The table: Tx pps min/median/max per back-end and the vhsm / DPDK median ratio."""
    fe_cpu, be_cpu = benchlib.placement()
    lines = [
        f"machine: {benchlib.machine()}",
        f"placement: front-end testpmd on CPU {fe_cpu}, back-end on CPU {be_cpu}"
        " (taskset; testpmd lcores 0 and 1 share that CPU)",
        f"vhsm sink reads each frame by: {SINK_READS}",
        f"vhsm data path: {speedups.data_path()} (vhsm-pure: VHSM_PURE_PYTHON=1)",
        f"{'config':18s} {'back-end':9s} {'Tx pps min':>11s} {'median':>11s} {'max':>11s}"
        f" {'vhsm/DPDK':>9s}",
    ]
    for cfg in configs:
        dpdk = benchlib.summary(results.get((cfg.label, "dpdk"), Result()).samples)[1]
        for backend in BACKENDS:
            res = results.get((cfg.label, backend), Result())
            lo, med, hi = benchlib.summary(res.samples)
            ratio = f"{med / dpdk:9.1%}" if backend != "dpdk" and dpdk else ""
            fail = f"  ({len(res.failures)} runs failed)" if res.failures else ""
            lines.append(
                f"{cfg.label:18s} {backend:9s} {lo:11,.0f} {med:11,.0f} {hi:11,.0f} {ratio:>9s}"
                f"{fail}"
            )
    return lines


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _rings(text: str) -> list[str]:
    rings = [x for x in text.split(",") if x]
    bad = [x for x in rings if x not in ("split", "packed")]
    if bad or not rings:
        raise argparse.ArgumentTypeError(f"ring layouts are split and packed, not {text!r}")
    return rings


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (shared with `vhsm bench net`)."""
    ap = argparse.ArgumentParser(
        prog="vhsm bench net", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=5, help="measured seconds per run")
    ap.add_argument("--warmup", type=int, default=1, help="samples dropped per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per back-end and configuration")
    ap.add_argument("--sizes", type=_ints, default=[64, 1500], help="packet sizes (--txpkts)")
    ap.add_argument("--rings", type=_rings, default=["split", "packed"], help="split,packed")
    ap.add_argument("--queues", type=_ints, default=[1, 2], help="queue pairs")
    ap.add_argument(
        "--ring-sizes",
        type=_ints,
        default=[256],
        help="descriptors per ring (virtio_user queue_size; 256 is its default, 1024 QEMU's max)",
    )
    ap.add_argument(
        "--sink-reads",
        choices=net.SINK_READS,
        default="copy",
        help="vhsm sink: a copy of every frame, as DPDK's back-end does (default), or its Adler-32",
    )
    ap.add_argument("--workdir", type=Path, help="keep logs and sockets here")
    ap.add_argument(
        "--pure",
        action="store_true",
        help="also run vhsm on its pure-Python data path (VHSM_PURE_PYTHON=1), alternating",
    )
    ap.add_argument(
        "--busy-poll-us",
        type=busy_poll_micros,
        help="vhsm's TX busy-poll window (default: the device's, 50; 0: off)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; exit 2 when DPDK testpmd is missing, 1 when every run failed."""
    args = build_parser().parse_args(argv)
    global BACKENDS, BUSY_POLL_US, SINK_READS
    BUSY_POLL_US = args.busy_poll_us
    SINK_READS = args.sink_reads
    BACKENDS = ("vhsm", "vhsm-pure", "dpdk") if args.pure else ("vhsm", "dpdk")
    why = benchlib.missing("dpdk-testpmd")
    if why is not None:
        print(f"net benchmark: {why}", file=sys.stderr)
        return 2
    configs = [
        Config(size, ring, q, ring_size)
        for ring in args.rings
        for ring_size in args.ring_sizes
        for q in args.queues
        for size in args.sizes
    ]
    with tempfile.TemporaryDirectory(prefix="vhsm-bench-net-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = measure(configs, args.runs, args.seconds, args.warmup, workdir)
    for line in report(configs, results):
        print(line)
    return 0 if any(r.samples for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
