"""Hatchling build hook: compile the optional C accelerator into the wheel.

A wheel gets ``vhsm/_speedups*.so`` (and a platform tag) when the compile works;
an editable install gets it built in place, next to ``_speedups.c``. When there
is no C compiler or no Python headers, or ``VHSM_PURE_PYTHON=1`` is set, the
build goes on without it (one line on stderr) and vhsm runs its pure-Python data
path. The compile itself is ``tools/build_speedups.py`` (also run by ``make``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class SpeedupsBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Build ``vhsm._speedups`` for wheel and editable builds."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Compile; on success ship the module and mark the wheel platform-specific."""
        if self.target_name != "wheel":
            return
        if os.environ.get("VHSM_PURE_PYTHON", "") not in ("", "0"):
            print("vhsm: VHSM_PURE_PYTHON is set: accelerator not built", file=sys.stderr)
            return
        root = Path(self.root)
        spec = importlib.util.spec_from_file_location(
            "vhsm_build_speedups", root / "tools" / "build_speedups.py"
        )
        assert spec is not None and spec.loader is not None
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        editable = version == "editable"
        out = root / "vhsm" if editable else root / "build" / "speedups"
        try:
            built: Path = tool.build(out)
        except tool.Unavailable as exc:
            print(
                f"vhsm: compiled accelerator not built ({exc}); pure-Python data path",
                file=sys.stderr,
            )
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if not editable:  # in place for editable installs, which import from the tree
            build_data["force_include"][str(built)] = f"vhsm/{built.name}"
