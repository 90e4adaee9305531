"""SHA-256 without OpenSSL: ``hashlib`` maps libcrypto (about 3.5 MiB resident).

Only staleness checks use it (the spec cache, the accelerator's source), so the
interpreter's own small SHA-256 module does, when it has one (``_sha256`` up to
Python 3.11, ``_sha2`` from 3.12); ``hashlib`` otherwise.
"""

from __future__ import annotations

import importlib
from typing import Any


def _constructor() -> Any:
    for name in ("_sha2", "_sha256"):
        try:
            return importlib.import_module(name).sha256
        except (ImportError, AttributeError):
            continue
    import hashlib

    return hashlib.sha256


_sha256 = _constructor()


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data`` as 64 hexadecimal digits."""
    return str(_sha256(data).hexdigest())
