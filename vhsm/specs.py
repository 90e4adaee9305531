"""Find and load the YAML declarations in ``specs/``.

The same files drive the runtime, the diagrams and the auditor. They live at
the top of a source checkout and are shipped inside the wheel as
``vhsm/specs``; both places are searched, the packaged copy first.

Parsing YAML is slow (a tenth of a second for ``requests.yaml``) and PyYAML
costs a daemon memory it would carry for nothing, so each parsed document is
kept in a cache, the way Python keeps bytecode in ``.pyc`` files: a
``marshal`` dump (exact types, integer keys included) in ``specs/__pycache__``,
or in ``$XDG_CACHE_HOME/vhsm/specs`` when that directory is read-only. Each
entry records the SHA-256 of the YAML text it came from and the Python
``cache_tag``; an entry that does not match the file as it is now is stale and
ignored, the YAML is parsed again and the cache rewritten. A cache that cannot
be written costs only the parse.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import marshal
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from vhsm._digest import sha256_hex
from vhsm.errors import VhsmError

if TYPE_CHECKING:
    from pathlib import Path

# Plain os.path here: a daemon loads its specs at start-up and need not carry pathlib.
_PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__))

#: Bumped when the layout of a cache entry changes.
_CACHE_FORMAT = 1

log = logging.getLogger(__name__)


@functools.cache
def _specs_path() -> str:
    for candidate in (
        os.path.join(_PACKAGE_DIR, "specs"),
        os.path.join(os.path.dirname(_PACKAGE_DIR), "specs"),
    ):
        if os.path.isfile(os.path.join(candidate, "requests.yaml")):
            return candidate
    raise VhsmError(f"vhsm specs/ not found next to {_PACKAGE_DIR} (broken installation?)")


def specs_dir() -> Path:
    """Return the directory holding the YAML specs (wheel copy, else the checkout's)."""
    from pathlib import Path

    return Path(_specs_path())


@functools.cache
def load_spec(name: str) -> Any:
    """Load ``specs/<name>.yaml`` once and return the parsed document."""
    return read_spec(os.path.join(_specs_path(), f"{name}.yaml"))


def cache_dirs(spec_dir: str | os.PathLike[str]) -> list[str]:
    """Where parsed documents of ``spec_dir`` are cached, in the order they are tried."""
    places = [os.path.join(spec_dir, "__pycache__")]
    xdg = os.environ.get("XDG_CACHE_HOME")
    if not xdg:
        home = os.path.expanduser("~")
        if home == "~":  # no home directory (a system user): no user cache
            return places
        xdg = os.path.join(home, ".cache")
    return [*places, os.path.join(xdg, "vhsm", "specs")]


def read_spec(path: str | os.PathLike[str]) -> Any:
    """The document of the YAML file ``path``: from the cache when fresh, else parsed."""
    path = os.fspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except FileNotFoundError as exc:
        raise VhsmError(f"spec {stem!r} not found: {path}") from exc
    key = (_CACHE_FORMAT, sys.implementation.cache_tag, sha256_hex(text))
    entry = f"{stem}.{sys.implementation.cache_tag}.marshal"
    places = [os.path.join(d, entry) for d in cache_dirs(os.path.dirname(path))]
    for place in places:
        doc = _cached(place, key)
        if doc is not None:
            return doc[0]
    import yaml  # only when no cache entry is fresh: a daemon normally never loads it

    document = yaml.safe_load(text)
    for place in places:
        if _store(place, key, document):
            break
    return document


def _cached(place: str, key: tuple[int, str | None, str]) -> tuple[Any] | None:
    """(document,) from the cache entry at ``place`` when it was made from ``key``."""
    try:
        with open(place, "rb") as handle:
            stored = marshal.loads(handle.read())
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if not (isinstance(stored, tuple) and len(stored) == 2 and stored[0] == key):
        return None
    return (stored[1],)


def _store(place: str, key: tuple[int, str | None, str], document: Any) -> bool:
    """Write a cache entry atomically (another daemon may read it meanwhile)."""
    try:
        data = marshal.dumps((key, document))
    except ValueError:  # a type marshal cannot hold: nothing to cache
        return False
    folder, name = os.path.split(place)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{threading.get_ident()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, place)
    except OSError as exc:
        log.debug("spec cache %s not written: %s", place, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
    return True
