"""`vhsm serve rng|blk|net|vsock`: run a reference device on a vhost-user socket.

Keeps serving across front-end reconnects until SIGINT/SIGTERM (or, with
`--once`, until the first connection ends), then removes the socket file.
The devices are imported only when their sub-command runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from vhsm.errors import VhsmError

if TYPE_CHECKING:
    from vhsm.backend import VhostUserBackend

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add `serve` and its device sub-commands."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a reference device (rng, blk, net, vsock) on a vhost-user socket",
        description="Serve a reference device on a vhost-user socket until interrupted.",
    )
    devices = parser.add_subparsers(dest="device", metavar="DEVICE", required=True)
    rng = devices.add_parser("rng", help="virtio-rng (entropy from os.urandom)")
    _common(rng)
    blk = devices.add_parser("blk", help="virtio-blk over an image file")
    _common(blk)
    blk.add_argument("--file", required=True, metavar="IMG", help="raw disk image")
    blk.add_argument("--read-only", action="store_true", help="refuse writes (VIRTIO_BLK_F_RO)")
    blk.add_argument("--queues", type=_positive, default=1, metavar="N", help="request queues")
    net = devices.add_parser("net", help="virtio-net without a host network")
    _common(net)
    net.add_argument(
        "--mode",
        choices=["sink", "loopback"],
        default="loopback",
        help="sink: drop transmitted frames; loopback: receive what was sent (default)",
    )
    net.add_argument("--queues", type=_positive, default=1, metavar="N", help="queue pairs")
    net.add_argument(
        "--sink-reads",
        choices=["checksum", "copy"],  # net.SINK_READS; the device module loads numpy lazily
        default="checksum",
        help="how the sink reads each frame: Adler-32 checksum (default) or a plain copy",
    )
    vsock = devices.add_parser("vsock", help="virtio-vsock joined to unix sockets on the host")
    _common(vsock)
    vsock.add_argument(
        "--guest-cid", required=True, type=_cid, metavar="N", help="the guest's context id (>= 3)"
    )
    vsock.add_argument(
        "--uds-path",
        required=True,
        metavar="PATH",
        help="host programs connect here and write 'CONNECT <port>'; guest connections to"
        " host port P go to PATH_P",
    )
    parser.set_defaults(func=run)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", required=True, metavar="PATH", help="vhost-user socket path")
    parser.add_argument(
        "--client",
        action="store_true",
        help="connect to a front-end listening at PATH instead of listening",
    )
    parser.add_argument(
        "--once", action="store_true", help="exit when the first front-end disconnects"
    )
    parser.add_argument(
        "--busy-poll-us",
        type=busy_poll_micros,
        default=None,
        metavar="US",
        help="poll the rings this long after a burst before sleeping in epoll"
        " (default: net 50, others 0 = off)",
    )


def busy_poll_micros(text: str) -> int:
    """A ``--busy-poll-us`` value: whole microseconds, 0..1000000 (also used by benchmarks)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of microseconds: {text!r}") from None
    if not 0 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{value} not in 0..1000000 microseconds")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{value} not in 1..65535")
    return value


def _cid(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CID: {text!r}") from None


def make_backend(args: argparse.Namespace) -> VhostUserBackend:
    """Build the device the arguments name, with its busy-poll window if one is given."""
    backend = _make_device(args)
    if args.busy_poll_us is not None:
        backend.busy_poll_us = args.busy_poll_us
    return backend


def _make_device(args: argparse.Namespace) -> VhostUserBackend:
    """Build the device the arguments name (imported lazily)."""
    if args.device == "rng":
        from vhsm.devices.rng import RngBackend

        return RngBackend()
    if args.device == "blk":
        from vhsm.devices.blk import BlkBackend

        image = Path(args.file)
        if not image.exists():
            raise VhsmError(f"image {image} does not exist")
        try:
            return BlkBackend(str(image), read_only=args.read_only, num_queues=args.queues)
        except OSError as err:
            raise VhsmError(f"cannot open image {image}: {err.strerror or err}") from err
    if args.device == "net":
        net = importlib.import_module("vhsm.devices.net")
        backend: VhostUserBackend = net.NetBackend(
            mode=args.mode, queue_pairs=args.queues, sink_reads=args.sink_reads
        )
        return backend
    if args.device == "vsock":
        from vhsm.devices.vsock import VsockBackend

        uds = Path(args.uds_path)
        if not uds.parent.is_dir():
            raise VhsmError(f"cannot create {uds}: directory {uds.parent} does not exist")
        return VsockBackend(args.guest_cid, uds)
    raise VhsmError(f"unknown device {args.device!r}")


def run(args: argparse.Namespace) -> int:
    """Serve until a signal (or `--once`); return the exit status."""
    from vhsm.daemon import Listener, VhostUserDaemon

    path = Path(args.socket)
    if not args.client and not path.parent.is_dir():
        raise VhsmError(f"cannot create socket {path}: directory {path.parent} does not exist")
    backend = make_backend(args)
    try:
        daemon = VhostUserDaemon(f"vhsm-{args.device}", backend)
    except BaseException:
        _close(backend)
        raise
    handle = daemon.shutdown_handle()
    restore = _install_signals(lambda: handle.shutdown())
    try:
        if args.client:
            daemon.start_client(path, once=args.once, connect_timeout=None)
            log.info("serving %s as a client of %s", args.device, path)
        else:
            daemon.start(Listener(path), once=args.once)
            log.info("serving %s on %s", args.device, path)
        while not daemon.wait(0.5):
            pass
    finally:
        daemon.stop()
        restore()
        _close(backend)
    if daemon.last_error is not None:
        log.error("stopped after an internal error: %s", daemon.last_error)
        return 1
    return 0


def _close(backend: VhostUserBackend) -> None:
    closer = getattr(backend, "close", None)
    if callable(closer):
        closer()


def _install_signals(stop: Callable[[], None]) -> Callable[[], None]:
    """Route SIGINT/SIGTERM to `stop` (main thread only); return the restorer."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, previous in old.items():
            signal.signal(sig, previous)

    return restore


__all__ = ["make_backend", "register", "run"]
