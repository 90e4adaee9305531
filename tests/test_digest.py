"""`vhsm._digest`: SHA-256 without mapping OpenSSL, equal to hashlib's."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from vhsm._digest import sha256_hex


def test_the_digest_is_hashlibs() -> None:
    for data in (b"", b"abc", bytes(range(256)) * 1000):
        assert sha256_hex(data) == hashlib.sha256(data).hexdigest()


def test_hashlib_is_not_imported_for_it() -> None:
    probe = (
        "import sys; import vhsm._digest as d; d.sha256_hex(b'x'); print('hashlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
