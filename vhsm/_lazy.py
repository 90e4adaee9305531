"""Names of a package imported from their modules on first use (PEP 562).

`vhsm.wire` and `vhsm.virtq` keep an idle daemon light this way: a name's module
(and what it brings: numpy, attrs, cattrs) is imported when the name is first
read, and the value is then kept in the package like an ordinary attribute.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(
    package: str, homes: Mapping[str, str], namespace: dict[str, Any]
) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `homes` maps each public name to its submodule."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home}"), name)
        namespace[name] = value
        return value

    return __getattr__
