"""`VhostUserDaemon` and `Listener`: sockets, the control thread, reconnects, shutdown.

One front-end at a time: the accept thread hands each connection to a
control thread that reads messages, feeds them to a fresh `Session` and sends
the replies. A second front-end connecting while one is served is accepted
and closed at once, with a log line (QEMU then retries or fails visibly,
instead of hanging in a backlog). When a connection ends, for any reason
(EOF, a protocol violation, a framing error), everything tied to it is reset
and the next connection is accepted: QEMU's reconnect.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import select
import socket
import stat
import sys
import threading
import time
from typing import TYPE_CHECKING

from vhsm.device_plane import DevicePlane
from vhsm.errors import FramingError, ProtocolViolation, VhsmError
from vhsm.memory import GuestMemoryAtomic, RegionMapper
from vhsm.signals import stop_on_signals

if TYPE_CHECKING:
    from collections.abc import Callable

    from vhsm.backend import VhostUserBackend
    from vhsm.session import StateListener
    from vhsm.session.connection import Connection
    from vhsm.transport import MessageReader
    from vhsm.worker import VringEpollHandler

log = logging.getLogger(__name__)

#: Pending connections the kernel queues while one front-end is being served.
LISTEN_BACKLOG = 64
#: Seconds a new connection may stay silent before its first message, or stop inside
#: a message, before it is closed (VU-FRAME-011): a silent client would otherwise keep
#: every other front-end out. Real front-ends send their first request at once.
HANDSHAKE_TIMEOUT = 5.0
#: Pause before accepting again when out of fds or memory (seconds).
ACCEPT_RETRY = 0.5
#: Client mode: first and largest pause between connection attempts (seconds).
RETRY_FIRST = 0.05
RETRY_MAX = 1.0


class Listener:
    """A listening unix socket at `path`, mode 0600.

    An existing path is replaced only when it is a stale socket (nobody
    listening); a live socket raises "socket in use", anything else raises too.
    Every failure is a VhsmError with a one-line message.

    The mode is set on the socket before `bind()` creates the file (Linux gives
    the file the socket's mode, less the umask), so the file is 0600 from its
    first instant and nothing is ever changed through the path: a writer of the
    directory cannot swap in a symlink and have another file's mode changed.
    """

    def __init__(self, path: str | os.PathLike[str], *, backlog: int = LISTEN_BACKLOG) -> None:
        #: The socket's path (a plain string: a daemon does not carry pathlib).
        self.path = os.fspath(path)
        _remove_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(self.path)
            sock.listen(backlog)
        except OSError as err:
            sock.close()
            raise VhsmError(f"cannot listen on {self.path}: {err.strerror or err}") from err
        self.sock = sock
        self._ino = os.stat(self.path).st_ino
        self._closed = False

    def fileno(self) -> int:
        """The listening socket's fd."""
        return self.sock.fileno()

    def accept(self) -> socket.socket:
        """Accept one connection (blocking)."""
        conn, _ = self.sock.accept()
        return conn

    def close(self) -> None:
        """Close the socket and remove the path if it is still ours (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_stale(path: str) -> None:
    """Unlink `path` if it is a socket nobody listens on; raise if it is anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise VhsmError(f"cannot use {path}: {err.strerror or err}") from err
    if not stat.S_ISSOCK(mode):
        raise VhsmError(f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale socket %s", path)
        try:
            os.unlink(path)
        except OSError as err:
            raise VhsmError(
                f"cannot remove the stale socket {path}: {err.strerror or err}"
            ) from err
        return
    except OSError as err:
        raise VhsmError(f"cannot probe {path}: {err.strerror or err}") from err
    finally:
        probe.close()
    raise VhsmError(f"socket in use: {path} (another back-end is listening)")


def describe(backend: VhostUserBackend) -> str:
    """Name a back-end for start-up lines: its class, with the module it comes from."""
    cls = type(backend)
    return f"{cls.__module__}:{cls.__qualname__}"


class ShutdownHandle:
    """Stops a daemon from any thread or a signal handler (writes an eventfd)."""

    def __init__(self, daemon: VhostUserDaemon) -> None:
        self._daemon = daemon

    def shutdown(self) -> None:
        """Request the stop; `wait()` returns soon after (then call `stop()` to clean up)."""
        self._daemon._request_shutdown()


class VhostUserDaemon:
    """Serves one back-end to one front-end at a time, across reconnects.

    Args:
        name: shown in thread names and logs.
        backend: the device.
        memory: the guest memory holder shared with the device (created when omitted).
        handshake_timeout: seconds a front-end may stay silent after connecting, or
            stop in the middle of a message, before it is disconnected (None: no limit).
        mapper: how memory regions are mapped, when ``memory`` is omitted (default:
            ``mmap`` of each region's fd; `vhsm.xen.XenMapper` for Xen guests).
    """

    def __init__(
        self,
        name: str,
        backend: VhostUserBackend,
        memory: GuestMemoryAtomic | None = None,
        *,
        handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
        mapper: RegionMapper | None = None,
    ) -> None:
        if handshake_timeout is not None and not handshake_timeout > 0:
            raise VhsmError(f"hand-shake timeout must be positive, not {handshake_timeout}")
        self.name = name
        self.handshake_timeout = handshake_timeout
        self._greeted = threading.Event()  # the served connection sent a whole message
        self.backend = backend
        if memory is not None and mapper is not None:
            raise VhsmError("give the mapper to the GuestMemoryAtomic, or memory= alone")
        self.memory = memory if memory is not None else GuestMemoryAtomic(mapper=mapper)
        self.plane = DevicePlane(backend, self.memory)
        self.plane.on_mapping_lost = self._mapping_lost
        self._shutdown_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._conn: socket.socket | None = None
        self._listener: Listener | None = None
        self._own_listener = False
        self._done = threading.Event()
        self._started = False
        self._stopped = False
        self._closing = False  # the current connection ended; its reset is running
        self.connections = 0
        #: A one-line summary of the last internal error (a bug, never a peer's doing):
        #: kept as text, not as the exception, whose frames would pin the session's
        #: guest mappings long after the front-end left.
        self.last_error: str | None = None
        #: Set when the daemon itself stopped on an internal error (not one session).
        self.failed = False
        #: Added to every new session's `listeners` (state changes, for demos and audits).
        self.session_listeners: list[StateListener] = []

    # --- public API -----------------------------------------------------------------
    def get_epoll_handlers(self) -> list[VringEpollHandler]:
        """The worker event loops, one per entry of `backend.queues_per_thread()`."""
        return list(self.plane.handlers)

    def shutdown_handle(self) -> ShutdownHandle:
        """A handle whose `shutdown()` stops the daemon, safe from any thread or signal."""
        return ShutdownHandle(self)

    def start(self, listener: Listener, *, once: bool = False) -> None:
        """Start the workers and accept front-ends on `listener` in the background.

        `once`: end after the first connection closes. The daemon closes the
        listener (and removes its path) on stop.
        """
        self._begin()
        self._listener = listener
        self._spawn(self._accept_loop, f"{self.name}-accept", listener, once)

    def start_client(
        self,
        path: str | os.PathLike[str],
        *,
        once: bool = False,
        connect_timeout: float | None = 10.0,
    ) -> None:
        """Connect out to a front-end listening at `path` (retrying with back-off), then serve.

        The first connection is made here (VhsmError after `connect_timeout`
        seconds, None: forever); later reconnects retry in the background.
        """
        sock = self._connect(os.fspath(path), connect_timeout)
        if sock is None:
            raise VhsmError("daemon stopped while connecting")
        self._begin()
        self._spawn(self._client_loop, f"{self.name}-client", os.fspath(path), sock, once)

    def serve(self, path: str | os.PathLike[str], *, once: bool = False) -> None:
        """Listen at `path` and serve until stopped (or, with `once`, one connection).

        Meant for a script's main: in the main thread, SIGINT and SIGTERM stop
        the daemon cleanly (connection closed, threads joined, socket removed)
        and `serve` returns; it prints one line saying what is served where. A
        path it cannot listen on (a socket in use, a missing directory, a file
        that is not a socket) ends the process with that one line as the error
        (`SystemExit`) instead of a traceback; in other threads it raises
        `VhsmError`.
        """
        main = threading.current_thread() is threading.main_thread()
        try:
            listener = Listener(path)
        except VhsmError as err:
            if main:
                raise SystemExit(f"{self.name}: {err}") from None
            raise
        self._own_listener = True
        self.run(
            functools.partial(self.start, listener, once=once),
            f"{self.name}: serving {describe(self.backend)} on {path}",
        )

    def run(self, start: Callable[[], None], banner: str) -> None:
        """Call ``start``, print ``banner`` on stderr, and block until the daemon ends.

        SIGINT and SIGTERM (caught in the main thread) shut the daemon down; on the
        way out it is stopped (connection closed, threads joined) and the signal
        handlers are restored. `serve` and ``vhsm serve`` both run this way.
        """
        restore = stop_on_signals(self.shutdown_handle().shutdown)
        try:
            start()
            print(banner, file=sys.stderr)
            while not self.wait(0.5):
                pass
        finally:
            self.stop()
            restore()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the daemon ended (stop, shutdown handle, or `once` done); True if so."""
        return self._done.wait(timeout)

    def stop(self) -> None:
        """Stop serving: close the connection, reset the device state, join every thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            conn = self._conn
        self.shutdown_handle().shutdown()
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        current = threading.current_thread()
        for thread in list(self._threads):
            if thread is not current:
                thread.join()
        self.plane.stop_workers()
        if self._listener is not None:
            self._listener.close()
        self.plane.close()
        with self._lock:
            fd, self._shutdown_fd = self._shutdown_fd, -1
        os.close(fd)
        self._done.set()

    @property
    def serving(self) -> bool:
        """Whether a front-end is connected right now."""
        return self._conn is not None

    # --- threads ---------------------------------------------------------------------
    def _begin(self) -> None:
        with self._lock:
            if self._started or self._stopped:
                raise VhsmError(f"daemon {self.name} already started")
            self._started = True
        self.plane.start_workers()

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _shutting_down(self) -> bool:
        readable, _, _ = select.select([self._shutdown_fd], [], [], 0)
        return bool(readable)

    def _accept_loop(self, listener: Listener, once: bool) -> None:
        active: threading.Thread | None = None
        active_sock: socket.socket | None = None
        try:
            while True:
                readable, _, _ = select.select([listener.fileno(), self._shutdown_fd], [], [])
                if self._shutdown_fd in readable:
                    break
                try:
                    conn = listener.accept()
                except OSError as err:
                    if err.errno in (errno.EAGAIN, errno.EINTR, errno.ECONNABORTED):
                        continue
                    if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self._starved(err)
                        continue
                    raise
                if active is not None and active.is_alive() and _ending(self._closing, active_sock):
                    active.join()  # the old front-end is gone, its reset runs: serve the new one
                if active is not None and active.is_alive():
                    self._await_greeting(active)
                if active is not None and active.is_alive():
                    log.warning(
                        "%s: refusing a second front-end on %s (one is being served)",
                        self.name,
                        listener.path,
                    )
                    conn.close()
                    continue
                if active is not None and once:
                    conn.close()
                    break
                self._closing = False
                self._greeted.clear()
                active_sock = conn
                active = threading.Thread(
                    target=self._connection_thread,
                    args=(conn, once),
                    name=f"{self.name}-control",
                    daemon=True,
                )
                # keep only live threads: one Thread object per past connection adds up
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(active)
                active.start()
        except Exception as err:
            self.last_error = _summary(err)
            self.failed = True
            log.exception("%s: accept loop failed", self.name)
        finally:
            self._finish()

    def _await_greeting(self, active: threading.Thread) -> None:
        """Let the served connection finish its hand-shake (or time out) before judging.

        A newcomer is refused only once the served front-end has said something:
        a silent client holds the others back for one hand-shake timeout at most.
        """
        if self.handshake_timeout is None:
            return
        deadline = time.monotonic() + self.handshake_timeout + GREETING_MARGIN
        while active.is_alive() and not self._greeted.wait(0.02):
            if time.monotonic() > deadline or self._shutting_down():
                return

    def _connection_thread(self, conn: socket.socket, once: bool) -> None:
        self._handle_connection(conn)
        if once:
            self._finish()

    def _client_loop(self, path: str, sock: socket.socket, once: bool) -> None:
        current: socket.socket | None = sock
        try:
            while current is not None:
                self._handle_connection(current)
                if once or self._shutting_down():
                    break
                current = self._connect(path, None)
        except VhsmError as err:
            self.failed = True
            self.last_error = _summary(err)
            log.error("%s: %s", self.name, str(err))
        finally:
            self._finish()

    def _mapping_lost(self, reason: str) -> None:
        """A mapped file shrank (any thread): end the session before anything touches it."""
        log.error("%s: closing the connection: %s", self.name, reason)
        with self._lock:
            conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _starved(self, err: OSError) -> None:
        """Out of fds (or memory) to accept with: say so, pause, keep the connection queued."""
        log.error(
            "%s: cannot accept a front-end: %s (fd or memory limit reached); retrying",
            self.name,
            err.strerror or err,
        )
        select.select([self._shutdown_fd], [], [], ACCEPT_RETRY)

    def _request_shutdown(self) -> None:
        # No lock: this runs in signal handlers, which may interrupt a holder of the lock.
        fd = self._shutdown_fd
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)

    def _finish(self) -> None:
        """End the daemon from inside one of its threads (`wait` returns; `stop` cleans up)."""
        self.shutdown_handle().shutdown()
        self._done.set()

    def _connect(self, path: str, timeout: float | None) -> socket.socket | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = RETRY_FIRST
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return sock
            except OSError as err:
                sock.close()
                if err.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                    raise VhsmError(f"cannot connect to {path}: {err.strerror or err}") from err
                if deadline is not None and time.monotonic() + pause > deadline:
                    raise VhsmError(
                        f"cannot connect to {path}: {err.strerror or err} (gave up after "
                        f"{timeout:g}s)"
                    ) from err
            readable, _, _ = select.select([self._shutdown_fd], [], [], pause)
            if readable:
                return None
            pause = min(pause * 2, RETRY_MAX)

    # --- one connection -----------------------------------------------------------
    def _handle_connection(self, conn: socket.socket) -> None:
        """Run one front-end's session on this thread until it ends; then reset.

        The session machinery (state machines, payload classes, framing) is imported
        here, with the first front-end: a daemon waiting for its VM does not hold it.
        """
        from vhsm.backend_channel import mark_control_thread
        from vhsm.session.connection import Connection
        from vhsm.transport import MessageReader

        with self._lock:
            if self._stopped:
                conn.close()
                return
            self._conn = conn
            self.connections += 1
        mark_control_thread(True)
        connection = Connection(self.backend, self.plane)
        session = connection.session
        session.listeners.extend(self.session_listeners)
        self.plane.attach(session)
        self._greeted.clear()
        reader = MessageReader(conn, connection, patience=self.handshake_timeout)
        _call_hook("connected", self.backend.connected)
        log.info("%s: front-end connected", self.name)
        try:
            self._message_loop(connection, reader)
        finally:
            self._closing = True
            reader.close()
            with contextlib.suppress(VhsmError):
                connection.close()
            with self._lock:
                self._conn = None
            conn.close()
            self.plane.reset()
            _call_hook("disconnected", self.backend.disconnected)
            mark_control_thread(False)
            log.info("%s: front-end disconnected; session reset", self.name)

    def _message_loop(self, connection: Connection, reader: MessageReader) -> None:
        # One message at a time, its reply sent before the next is read: main-channel
        # requests are answered strictly in arrival order (VU-STATE-010).
        from vhsm.transport import PeerClosed, send_message

        session = connection.session
        msg = None
        try:
            while True:
                msg = reader.read()
                self._greeted.set()
                if self.plane.mapping_lost() is not None:
                    _close_fds(msg.fds)
                    break  # logged by _mapping_lost; the session ends here
                reply = connection.handle(msg)
                if reply is not None:
                    send_message(reader.sock, reply)  # reply fds are borrowed: not closed
        except PeerClosed:
            log.info("%s: front-end closed the connection", self.name)
        except FramingError as err:
            log.error(
                "%s: closing the connection: framing error %s on %s (state %s): %s",
                self.name,
                err.rule_id,
                err.request,
                session.state.name,
                err.detail,
            )
        except ProtocolViolation as err:
            log.error(
                "%s: closing the connection: %s violated by %s in state %s: %s",
                self.name,
                err.rule_id,
                err.request,
                err.state,
                err.detail,
            )
        except OSError as err:
            if not self._stopped:
                log.warning("%s: connection error: %s", self.name, str(err))
        except VhsmError as err:
            log.error("%s: closing the connection: %s", self.name, str(err))
        except Exception as err:
            self.last_error = _summary(err)
            name = msg.name if msg is not None else "-"
            log.exception(
                "%s: closing the connection after an internal error handling %s", self.name, name
            )


#: Extra seconds a newcomer waits past the served connection's hand-shake timeout.
GREETING_MARGIN = 0.5

#: How long a new connection waits for the served one to show its hang-up (a front-end
#: that reconnects at once can beat its own close to the daemon; QEMU reconnect).
RECONNECT_GRACE_MS = 250


def _ending(closing: bool, sock: socket.socket | None) -> bool:
    """Whether the served connection is over: its reset runs, or its peer hung up."""
    if closing or sock is None:
        return True
    poller = select.poll()
    try:
        poller.register(sock, select.POLLRDHUP)
        events = poller.poll(RECONNECT_GRACE_MS)
    except (OSError, ValueError):
        return True
    hangup = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
    return any(mask & hangup for _, mask in events)


def _close_fds(fds: tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _summary(err: BaseException) -> str:
    """An exception as one line of text (no traceback, no frames kept alive)."""
    return f"{type(err).__name__}: {err}"


def _call_hook(name: str, hook: object) -> None:
    try:
        hook()  # type: ignore[operator]
    except Exception:
        log.exception("back-end hook %s failed", name)


__all__ = ["Listener", "ShutdownHandle", "VhostUserDaemon"]
