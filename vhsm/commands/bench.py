"""`vhsm bench NAME`: run a benchmark script (net, blk, latency, virtq, burst, blk-device, idle).

The scripts live in `benchmarks/` next to the `vhsm` package (they drive external
programs such as DPDK testpmd and qemu-storage-daemon and are not installed with
the wheel). Options after the benchmark name go to the script unchanged:
`vhsm bench net --seconds 2 --runs 1`, `vhsm bench blk --help`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from vhsm.errors import VhsmError

#: Benchmark name -> (script in benchmarks/, one-line help).
BENCHMARKS: dict[str, tuple[str, str]] = {
    "net": ("net_dpdk.py", "DPDK testpmd front-end: vhsm net sink vs DPDK vhost (pps)"),
    "blk": ("blk.py", "4 KiB random I/O: vhsm blk vs qemu-storage-daemon (req/s, CPU)"),
    "latency": ("latency.py", "one request's round trip at queue depth 1 (rng, blk)"),
    "virtq": ("virtq_bench.py", "device-side chains per second, split and packed rings"),
    "tap": ("net_tap.py", "DPDK virtio-user txonly through vhsm net --tap: frames/s on the TAP"),
    "burst": ("net_burst.py", "the net sink's cost per burst and per packet (no front-end)"),
    "blk-device": ("blk_device.py", "one 4 KiB request's device-side CPU cost (no front-end)"),
    "idle": ("idle.py", "resident memory of idle daemons: vhsm blk vs qemu-storage-daemon"),
}


def benchmarks_dir() -> Path:
    """The `benchmarks/` directory of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def register(subparsers: Any) -> None:
    """Add `vhsm bench` and one sub-command per benchmark."""
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark (net, blk, latency, virtq) from the source checkout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (script, text) in BENCHMARKS.items():
        # "+" prefix and no -h: every option (--help too) goes to the script unchanged.
        sub = names.add_parser(
            name,
            help=text,
            description=f"{text}; runs benchmarks/{script}",
            prefix_chars="+",
            add_help=False,
        )
        sub.add_argument(
            "options",
            nargs=argparse.REMAINDER,
            help=f"options for benchmarks/{script} (`vhsm bench {name} --help` lists them)",
        )
    parser.set_defaults(func=run)


def load(name: str) -> Any:
    """Import the benchmark script ``name`` (VhsmError outside a source checkout)."""
    script = BENCHMARKS[name][0]
    folder = benchmarks_dir()
    path = folder / script
    if not path.is_file():
        raise VhsmError(
            f"vhsm bench needs a source checkout: the benchmark scripts are not installed "
            f"with the package (no {path}); run it from a clone, e.g. .venv/bin/vhsm bench {name}"
        )
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # the scripts import their sibling helpers
    spec = importlib.util.spec_from_file_location(f"vhsm_bench_{name}", path)
    if spec is None or spec.loader is None:
        raise VhsmError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark's `main` with the remaining options."""
    module = load(args.benchmark)
    options = list(args.options)
    if options[:1] == ["--"]:
        options = options[1:]
    status: int = module.main(options)
    return status


__all__ = ["BENCHMARKS", "benchmarks_dir", "load", "register", "run"]
