"""Device-state transfer of the vsock device: its connections, saved and restored.

SET_DEVICE_STATE_FD hands the device one end of a pipe while the rings are
stopped. Saving writes the state there on a thread of its own (the front-end
reads it after the reply, so the control thread must not block on the pipe);
loading reads it on a thread until the front-end closes its end.
CHECK_DEVICE_STATE then waits for that thread (at most ``FINISH_TIMEOUT``)
and, when loading, applies the state: it answers the transfer's result.

What the state holds: the guest CID and, for every connection the guest knows,
its ports, the byte counters of both directions, shutdown flags, and the guest
bytes the host socket had not taken yet. What happens on load, in the new daemon:

* a stream the guest opened (to host port P) is joined to the listener at
  ``<uds>_P`` again, the untaken bytes first, with the counters unchanged, so
  the guest's socket goes on as if nothing happened;
* a stream a host program opened cannot follow that program: the guest gets a
  reset for it (as it does for a guest stream whose listener is gone).

Bytes still in the old daemon's host socket buffers stay there. The format is
JSON, versioned; anything malformed fails the transfer and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vhsm.devices.vsock_conn import BUF_ALLOC, State
from vhsm.devices.vsock_packet import HOST_CID, TYPE_STREAM, Header, Op
from vhsm.errors import BackendError
from vhsm.wire.enums import TransferDirection

if TYPE_CHECKING:
    from vhsm.devices.vsock import VsockBackend

log = logging.getLogger(__name__)

FORMAT = "vhsm-vsock-state"
VERSION = 1
#: Seconds CHECK_DEVICE_STATE waits for the transfer thread (the front-end is done by then).
FINISH_TIMEOUT = 10.0
_U32_FIELDS = ("local_port", "peer_port", "rx_cnt", "fwd_cnt", "tx_cnt", "peer_buf_alloc",
               "peer_fwd_cnt")  # fmt: skip


class VsockStateTransfer:
    """The one transfer a vsock device runs at a time (see the module docstring)."""

    def __init__(self, backend: VsockBackend) -> None:
        self.backend = backend
        self._thread: threading.Thread | None = None
        self._direction = TransferDirection.SAVE
        self._loaded = b""
        self._error: str | None = None

    def start(self, direction: int, fd: int) -> None:
        """Begin saving to or loading from ``fd`` (owned from here on)."""
        self.finish_quietly()
        self._error = None
        self._loaded = b""
        self._direction = TransferDirection(direction)
        os.set_blocking(fd, True)
        if self._direction is TransferDirection.SAVE:
            work: Callable[[], None] = functools.partial(self._write, fd, self.snapshot())
        else:
            work = functools.partial(self._read, fd)
        self._thread = threading.Thread(target=work, name="vhsm-vsock-state", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """Wait for the transfer, apply a loaded state; BackendError if anything failed."""
        thread, self._thread = self._thread, None
        if thread is None:
            raise BackendError("no device-state transfer was started")
        thread.join(FINISH_TIMEOUT)
        if thread.is_alive():
            raise BackendError(
                f"device-state transfer not finished after {FINISH_TIMEOUT:g} s "
                "(the front-end kept its end of the pipe open)"
            )
        if self._error is not None:
            raise BackendError(self._error)
        if self._direction is TransferDirection.LOAD:
            self.restore(self._loaded)

    def finish_quietly(self) -> None:
        """End an unchecked earlier transfer (a new one replaces it)."""
        if self._thread is not None:
            try:
                self.finish()
            except BackendError as err:
                log.warning("vsock: unchecked device-state transfer failed: %s", str(err))

    # --- threads ------------------------------------------------------------------------
    def _write(self, fd: int, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as err:
            self._error = f"writing the device state failed: {err.strerror or err}"
        finally:
            os.close(fd)

    def _read(self, fd: int) -> None:
        limit = max_state_size(self.backend.max_connections)
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    self._error = f"device state larger than {limit} bytes"
                    return
                chunks.append(chunk)
        except OSError as err:
            self._error = f"reading the device state failed: {err.strerror or err}"
        finally:
            os.close(fd)
        self._loaded = b"".join(chunks)

    # --- the state ----------------------------------------------------------------------
    def snapshot(self) -> bytes:
        """The state of every connection the guest knows, as JSON bytes."""
        backend = self.backend
        with backend._guard():
            conns = [
                {
                    "local_port": c.local_port,
                    "peer_port": c.peer_port,
                    "host_initiated": c.host_initiated,
                    "established": c.state is State.ESTABLISHED,
                    "rx_cnt": c.rx_cnt,
                    "fwd_cnt": c.fwd_cnt,
                    "tx_cnt": c.tx_cnt,
                    "peer_buf_alloc": c.peer_buf_alloc,
                    "peer_fwd_cnt": c.peer_fwd_cnt,
                    "guest_shut": c.guest_shut,
                    "host_eof": c.host_eof,
                    "pending": base64.b64encode(bytes(c.pending)).decode(),
                }
                for c in backend.conns.values()
            ]
        state = {"format": FORMAT, "version": VERSION, "guest_cid": backend.guest_cid}
        state["connections"] = conns
        return json.dumps(state).encode()

    def restore(self, data: bytes) -> None:
        """Replace the connections with the saved ones (BackendError: nothing changed)."""
        backend = self.backend
        entries = parse_state(data, backend.guest_cid)
        with backend._guard():
            backend._drop_all()
            for entry in entries:
                self._restore_one(entry)

    def _restore_one(self, entry: dict[str, Any]) -> None:
        backend = self.backend
        hdr_args = (entry["local_port"], entry["peer_port"])
        if entry["host_initiated"] or not entry["established"]:
            self._reset_guest(*hdr_args)
            return
        try:
            conn = backend._connect_host_port(hdr_args)
        except OSError as err:
            log.info("vsock: restored port %d has no listener: %s", entry["local_port"],
                     err.strerror or err)  # fmt: skip
            self._reset_guest(*hdr_args)
            return
        for name in ("rx_cnt", "fwd_cnt", "tx_cnt", "peer_buf_alloc", "peer_fwd_cnt",
                     "guest_shut", "host_eof"):  # fmt: skip
            setattr(conn, name, entry[name])
        conn.announced_fwd_cnt = conn.fwd_cnt
        conn.closing = conn.guest_shut == 3  # the guest closed both ways: RST once flushed
        conn.pending = bytearray(entry["pending"])
        backend.conns[conn.key] = conn
        backend._flush_host(conn)
        if conn.key in backend.conns:
            backend._watch(conn)

    def _reset_guest(self, local_port: int, peer_port: int) -> None:
        cid = self.backend.guest_cid
        hdr = Header(HOST_CID, cid, local_port, peer_port, 0, TYPE_STREAM, Op.RST, 0, BUF_ALLOC, 0)
        self.backend._send_control(hdr)


def max_state_size(max_connections: int) -> int:
    """The largest state accepted: every connection's pending bytes, base64, plus slack."""
    return max_connections * (BUF_ALLOC * 4 // 3 + 1024) + 4096


def parse_state(data: bytes, guest_cid: int) -> list[dict[str, Any]]:
    """Decode and check a saved state; BackendError names what is wrong."""
    try:
        state = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BackendError(f"device state is not {FORMAT} JSON: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BackendError(f"device state is not a {FORMAT} document")
    if state.get("version") != VERSION:
        raise BackendError(f"device state version {state.get('version')!r}, expected {VERSION}")
    if state.get("guest_cid") != guest_cid:
        raise BackendError(
            f"device state is for guest CID {state.get('guest_cid')!r}; this device serves "
            f"{guest_cid}"
        )
    conns = state.get("connections")
    if not isinstance(conns, list):
        raise BackendError("device state: connections is not a list")
    entries = [_entry(i, c) for i, c in enumerate(conns)]
    keys = {(e["local_port"], e["peer_port"]) for e in entries}
    if len(keys) != len(entries):
        raise BackendError("device state: two connections share their ports")
    return entries


def _entry(i: int, raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BackendError(f"device state: connection {i} is not an object")
    entry: dict[str, Any] = {}
    for name in _U32_FIELDS:
        value = raw.get(name)
        if type(value) is not int or not 0 <= value <= 0xFFFF_FFFF:
            raise BackendError(f"device state: connection {i} {name} = {value!r}, not a u32")
        entry[name] = value
    for name in ("host_initiated", "established", "host_eof"):
        if type(raw.get(name)) is not bool:
            raise BackendError(f"device state: connection {i} {name} is not a boolean")
        entry[name] = raw[name]
    shut = raw.get("guest_shut")
    if type(shut) is not int or not 0 <= shut <= 3:
        raise BackendError(f"device state: connection {i} guest_shut = {shut!r}, not 0..3")
    entry["guest_shut"] = shut
    try:
        pending = base64.b64decode(str(raw.get("pending", "")), validate=True)
    except (binascii.Error, ValueError):
        raise BackendError(f"device state: connection {i} pending is not base64") from None
    if len(pending) > BUF_ALLOC:
        raise BackendError(f"device state: connection {i} holds {len(pending)} bytes > credit")
    entry["pending"] = pending
    return entry


__all__ = ["FORMAT", "VERSION", "VsockStateTransfer", "max_state_size", "parse_state"]
