"""`vhsm serve rng|blk|net|vsock|MODULE:CLASS`: run a device on a vhost-user socket.

Keeps serving across front-end reconnects until SIGINT/SIGTERM (or, with
`--once`, until the first connection ends), then removes the socket file.
Start-up prints one line saying what is served where. The reference devices
are imported only when their sub-command runs; ``MODULE:CLASS`` serves a
back-end of one's own (a module importable from the current directory, or a
``path/to/file.py``) with the same options.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from vhsm.errors import VhsmError

if TYPE_CHECKING:
    from vhsm.backend import VhostUserBackend
    from vhsm.memory import RegionMapper

log = logging.getLogger(__name__)

_N = TypeVar("_N", int, float)


def register(subparsers: Any) -> None:
    """Add `serve` and its device sub-commands."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a reference device (rng, blk, net, vsock) or your own on a vhost-user socket",
        description=(
            "Serve a reference device, or your own back-end class (MODULE:CLASS), on a "
            "vhost-user socket until interrupted."
        ),
    )
    parser.register("action", "parsers", _DeviceParsers)
    devices = parser.add_subparsers(dest="device", metavar="DEVICE", required=True)
    own = devices.add_parser(
        OWN,
        help="your own back-end: a VhostUserBackend subclass (or a factory returning one),"
        " e.g. my_device:MyBackend or ./my_device.py:MyBackend",
    )
    _common(own)
    rng = devices.add_parser("rng", help="virtio-rng (entropy from os.urandom)")
    _common(rng)
    blk = devices.add_parser("blk", help="virtio-blk over an image file")
    _common(blk)
    blk.add_argument("--file", required=True, metavar="IMG", help="raw disk image")
    blk.add_argument("--read-only", action="store_true", help="refuse writes (VIRTIO_BLK_F_RO)")
    blk.add_argument("--queues", type=_positive, default=1, metavar="N", help="request queues")
    net = devices.add_parser("net", help="virtio-net on a TAP interface, or without a network")
    _common(net)
    net.add_argument(
        "--mode",
        choices=["sink", "loopback"],
        default=None,
        help="without --tap: sink drops transmitted frames; loopback (default) receives them",
    )
    net.add_argument(
        "--tap",
        metavar="IFNAME",
        help="join the guest to this TAP interface (created when missing: CAP_NET_ADMIN)",
    )
    net.add_argument("--mac", metavar="MAC", help="with --tap: the guest's MAC in config space")
    net.add_argument(
        "--mtu", type=int, metavar="N", help="with --tap: set on the TAP and in config space"
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


#: The sub-command name that stands for any ``MODULE:CLASS`` argument.
OWN = "MODULE:CLASS"


class _ChoicesWithOwn(dict[str, argparse.ArgumentParser]):
    """The device parsers, where any ``MODULE:CLASS`` string counts as a choice."""

    def __contains__(self, key: object) -> bool:
        if super().__contains__(key):
            return True
        # Once the OWN parser exists, any MODULE:CLASS string stands for it.
        return isinstance(key, str) and ":" in key and super().__contains__(OWN)


class _DeviceParsers(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Device sub-commands, with ``MODULE:CLASS`` dispatched to the `OWN` parser."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._name_parser_map = self.choices = _ChoicesWithOwn()

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        name, *rest = values
        if not dict.__contains__(self._name_parser_map, name) and ":" in name:
            namespace.backend = name
            values = [OWN, *rest]
        super().__call__(parser, namespace, values, option_string)


def load_backend(spec: str) -> VhostUserBackend:
    """Build the back-end ``MODULE:CLASS`` names; VhsmError (one line) if it cannot.

    MODULE is a dotted module importable from the current directory or a path to
    a ``.py`` file; CLASS a `VhostUserBackend` subclass, or any callable that
    returns a back-end, called with no arguments.
    """
    from vhsm.backend import VhostUserBackend

    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise VhsmError(f"{spec!r}: expected MODULE:CLASS, e.g. my_device:MyBackend")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            from pathlib import Path

            path = Path(module_name)
            if not path.is_file():
                raise VhsmError(f"{spec}: no file {path}")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            if loader is None or loader.loader is None:
                raise VhsmError(f"{spec}: cannot load {path} as a Python module")
            module = importlib.util.module_from_spec(loader)
            sys.modules[path.stem] = module
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # the current directory, as `python -m` would
            module = importlib.import_module(module_name)
    except VhsmError:
        raise
    except Exception as err:  # an import runs arbitrary code: report it in one line
        raise VhsmError(
            f"{spec}: cannot import {module_name}: {type(err).__name__}: {err}"
        ) from err
    factory = getattr(module, attr, None)
    if factory is None:
        raise VhsmError(f"{spec}: module {module_name} has no {attr!r}")
    if not callable(factory):
        raise VhsmError(f"{spec}: {attr} is not a class or a factory")
    try:
        backend = factory()
    except Exception as err:
        raise VhsmError(f"{spec}: {attr}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(backend, VhostUserBackend):
        raise VhsmError(f"{spec}: {attr}() gave a {type(backend).__name__}, not a VhostUserBackend")
    return backend


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
        "--handshake-timeout",
        type=_seconds,
        default=None,
        metavar="S",
        help="close a front-end that sends nothing for S seconds after connecting, or stops"
        " in the middle of a message (default 5; 0 = wait forever)",
    )
    parser.add_argument(
        "--xen",
        action="store_true",
        help="the guest is a Xen domain: map its memory through Xen's privcmd and gntdev"
        " devices (offers the XEN_MMAP protocol feature; needs /dev/xen/privcmd)",
    )
    parser.add_argument(
        "--xen-dir",
        default=None,
        metavar="DIR",
        help="with --xen: where the privcmd and gntdev devices are (default /dev/xen)",
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
    return _number(text, int, 0, 1_000_000, "microseconds")


def _seconds(text: str) -> float:
    """A ``--handshake-timeout`` value: seconds, 0..3600 (0: no timeout)."""
    return _number(text, float, 0, 3600, "seconds")


def _positive(text: str) -> int:
    return _number(text, int, 1, 0xFFFF)


def _number(text: str, parse: Callable[[str], _N], low: int, high: int, unit: str = "") -> _N:
    """Parse an option's number and check it lies in ``low..high`` (``unit`` names it).

    An ``argparse.ArgumentTypeError`` says what was wrong, so argparse prints a
    one-line usage error.
    """
    try:
        value = parse(text)
    except ValueError:
        what = f"a number of {unit}" if unit else "a number"
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not low <= value <= high:
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        raise argparse.ArgumentTypeError(f"{shown} not in {low}..{high} {unit}".rstrip())
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
    if args.device == OWN:
        return load_backend(args.backend)
    if args.device == "rng":
        from vhsm.devices.rng import RngBackend

        return RngBackend()
    if args.device == "blk":
        from vhsm.devices.blk import BlkBackend

        image = args.file
        if not os.path.exists(image):
            raise VhsmError(f"image {image} does not exist")
        try:
            return BlkBackend(image, read_only=args.read_only, num_queues=args.queues)
        except OSError as err:
            raise VhsmError(f"cannot open image {image}: {err.strerror or err}") from err
    if args.device == "net" and args.tap is not None:
        if args.mode is not None:
            raise VhsmError("--mode is for the network-less device: not with --tap")
        from vhsm.devices.net_tap import TapNetBackend, parse_mac

        mac = parse_mac(args.mac) if args.mac is not None else None
        return TapNetBackend(args.tap, args.queues, mac=mac, mtu=args.mtu)
    if args.device == "net":
        if args.mac is not None or args.mtu is not None:
            raise VhsmError("--mac and --mtu need --tap")
        net = importlib.import_module("vhsm.devices.net")
        backend: VhostUserBackend = net.NetBackend(
            mode=args.mode or "loopback", queue_pairs=args.queues, sink_reads=args.sink_reads
        )
        return backend
    if args.device == "vsock":
        from pathlib import Path

        from vhsm.devices.vsock import VsockBackend

        uds = Path(args.uds_path)
        if not uds.parent.is_dir():
            raise VhsmError(f"cannot create {uds}: directory {uds.parent} does not exist")
        return VsockBackend(args.guest_cid, uds)
    raise VhsmError(f"unknown device {args.device!r}")


def run(args: argparse.Namespace) -> int:
    """Serve until a signal (or `--once`); return the exit status."""
    from vhsm.daemon import HANDSHAKE_TIMEOUT, Listener, VhostUserDaemon, describe

    path = args.socket  # a plain string: pathlib is not needed to serve
    folder = os.path.dirname(path) or "."
    if not args.client and not os.path.isdir(folder):
        raise VhsmError(f"cannot create socket {path}: directory {folder} does not exist")
    mapper = _xen_mapper(args)
    backend = make_backend(args)
    name = type(backend).__name__ if args.device == OWN else f"vhsm-{args.device}"
    timeout = getattr(args, "handshake_timeout", None)
    try:
        if mapper is not None:
            from vhsm.xen import offer_xen_mmap

            offer_xen_mmap(backend)
        daemon = VhostUserDaemon(
            name,
            backend,
            handshake_timeout=HANDSHAKE_TIMEOUT if timeout is None else (timeout or None),
            mapper=mapper,
        )
    except BaseException:
        _close(backend)
        raise
    what = describe(backend) if args.device == OWN else args.device

    def start() -> None:
        if args.client:
            daemon.start_client(path, once=args.once, connect_timeout=None)
        else:
            daemon.start(Listener(path), once=args.once)

    where = f"as a client of {path}" if args.client else f"on {path}"
    banner = f"vhsm serve: serving {what} {where}"
    try:
        daemon.run(start, banner)
    finally:
        _close(backend)
    if daemon.failed:
        log.error("stopped after an internal error: %s", daemon.last_error)
        return 1
    if daemon.last_error is not None:
        log.warning("a session had ended on an internal error: %s", daemon.last_error)
    return 0


def _xen_mapper(args: argparse.Namespace) -> RegionMapper | None:
    """With ``--xen``: the Xen mapper over ``--xen-dir``, once privcmd is known to open."""
    if not getattr(args, "xen", False):
        if getattr(args, "xen_dir", None) is not None:
            raise VhsmError("--xen-dir needs --xen")
        return None
    from vhsm.xen import XenMapper, require_privcmd

    devices = args.xen_dir or "/dev/xen"
    privcmd = os.path.join(devices, "privcmd")
    require_privcmd(privcmd)
    return XenMapper(privcmd=privcmd, gntdev=os.path.join(devices, "gntdev"))


def _close(backend: VhostUserBackend) -> None:
    closer = getattr(backend, "close", None)
    if callable(closer):
        closer()


__all__ = ["load_backend", "make_backend", "register", "run"]
