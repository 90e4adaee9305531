"""pytest fixtures for testing vhost-user back-ends with vhsm's Python front-end.

Installed as a pytest plugin (entry point ``pytest11: vhsm``), so any project
that installs vhsm can write::

    def test_my_device(vhost_user_backend, frontend):
        fe = frontend(MyBackend())            # daemon on a temp socket, connected, rings set up
        vq = fe.vring(0)
        ...

`vhost_user_backend(backend)` starts ``backend`` in a `VhostUserDaemon` on a
temporary socket, in background threads, and stops it at teardown.
`frontend(target, **start_options)` connects a `Frontend` to a back-end (a
`VhostUserBackend` to start, a `RunningBackend`, or a socket path), runs
`Frontend.start` (negotiation, memory table, rings) unless ``start=False``,
and closes it at teardown. Heavy imports happen inside the fixtures, so
merely having vhsm installed costs other test suites nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from vhsm.backend import VhostUserBackend
    from vhsm.daemon import VhostUserDaemon
    from vhsm.frontend import Frontend, FrontendListener


class RunningBackend:
    """A back-end served by a daemon in this process (what `vhost_user_backend` returns)."""

    def __init__(
        self,
        backend: VhostUserBackend,
        daemon: VhostUserDaemon,
        path: Path,
        listener: FrontendListener | None = None,
    ) -> None:
        self.backend = backend
        self.daemon = daemon
        #: The socket path (the daemon listens there, or connects there in client mode).
        self.path = path
        #: Client mode: the front-end's listener the daemon connected to.
        self.listener = listener

    @property
    def client_mode(self) -> bool:
        """Whether the back-end connects to the front-end (not the other way round)."""
        return self.listener is not None

    def stop(self) -> None:
        """Stop the daemon (idempotent)."""
        self.daemon.stop()
        if self.listener is not None:
            self.listener.close()


def _short_dir() -> Path:
    """A private temp dir with a short path (unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="vhsm-"))


@pytest.fixture
def vhost_user_backend() -> Iterator[Callable[..., RunningBackend]]:
    """Factory fixture: ``vhost_user_backend(backend, name=..., client=False)``.

    Starts ``backend`` in a `VhostUserDaemon` on a fresh socket. With
    ``client=True`` the front-end side listens and the daemon connects to it
    (client-mode back-ends); `frontend` then accepts on that listener.
    """
    from vhsm.daemon import Listener, VhostUserDaemon
    from vhsm.frontend import FrontendListener

    started: list[RunningBackend] = []
    dirs: list[Path] = []

    def start(
        backend: VhostUserBackend, *, name: str | None = None, client: bool = False
    ) -> RunningBackend:
        directory = _short_dir()
        dirs.append(directory)
        path = directory / "vhost-user.sock"
        daemon = VhostUserDaemon(name or type(backend).__name__, backend)
        if client:
            listener = FrontendListener(path)
            try:
                daemon.start_client(path)
            except Exception:
                listener.close()
                raise
            running = RunningBackend(backend, daemon, path, listener)
        else:
            daemon.start(Listener(path))
            running = RunningBackend(backend, daemon, path)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        running.stop()
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def frontend(
    vhost_user_backend: Callable[..., RunningBackend],
) -> Iterator[Callable[..., Frontend]]:
    """Factory fixture: ``frontend(target, *, start=True, **options)``.

    ``target`` is a `VhostUserBackend` (started with `vhost_user_backend`), a
    `RunningBackend`, or a socket path. ``start_options`` go to `Frontend.start`
    (``queues``, ``size``, ``packed``, ``owner_first``, ``inflight``, ``features``,
    ``protocol_features``; ``queues`` defaults to every ring the back-end has).
    Frontend keyword arguments (``memory``, ``record_path``,
    ``backend_request_handler``, ``device_features``, ``timeout``, ``strict``) are
    passed through. ``strict`` (default True) makes ``wait_used`` fail when the
    back-end never signals a used element the driver was owed a call for. Every
    front-end is closed at teardown.
    """
    from vhsm.backend import VhostUserBackend
    from vhsm.frontend import Frontend

    made: list[Frontend] = []
    frontend_keys = {
        "memory",
        "record_path",
        "recorder",
        "backend_request_handler",
        "device_features",
        "timeout",
        "strict",
    }

    def connect(target: Any, *, start: bool = True, **options: Any) -> Frontend:
        fe_kwargs = {k: options.pop(k) for k in list(options) if k in frontend_keys}
        if isinstance(target, VhostUserBackend):
            target = vhost_user_backend(target)
        if isinstance(target, RunningBackend):
            fe_kwargs.setdefault("num_queues", target.backend.num_queues())
            if target.listener is not None:
                fe = target.listener.accept(**fe_kwargs)
            else:
                fe = Frontend.connect(target.path, **fe_kwargs)
        elif isinstance(target, str | os.PathLike):
            fe = Frontend.connect(Path(target), **fe_kwargs)
        else:
            raise TypeError(f"frontend(): cannot connect to {target!r}")
        made.append(fe)
        if start:
            fe.start(**options)
        return fe

    yield connect
    for fe in reversed(made):
        with contextlib.suppress(Exception):
            fe.close()
