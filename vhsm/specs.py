"""Find and load the YAML declarations in ``specs/``.

The same files drive the runtime, the diagrams and the auditor. They live at
the top of a source checkout and are shipped inside the wheel as
``vhsm/specs``; both places are searched, the packaged copy first.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from vhsm.errors import VhsmError

_PACKAGE_DIR = Path(__file__).resolve().parent


def specs_dir() -> Path:
    """Return the directory holding the YAML specs (wheel copy, else the checkout's)."""
    for candidate in (_PACKAGE_DIR / "specs", _PACKAGE_DIR.parent / "specs"):
        if (candidate / "requests.yaml").is_file():
            return candidate
    raise VhsmError(f"vhsm specs/ not found next to {_PACKAGE_DIR} (broken installation?)")


@functools.cache
def load_spec(name: str) -> Any:
    """Load ``specs/<name>.yaml`` once and return the parsed document."""
    path = specs_dir() / f"{name}.yaml"
    try:
        with path.open(encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except FileNotFoundError as exc:
        raise VhsmError(f"spec {name!r} not found: {path}") from exc
