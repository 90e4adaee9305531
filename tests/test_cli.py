"""The `vhsm` command line: sub-commands, --log-level anywhere, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vhsm.cli import COMMAND_MODULES, build_parser, command_module, main


def test_every_command_module_registers() -> None:
    parser = build_parser()
    names = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"serve", "demo", "diagram", "audit", "record", "bench"} <= names
    assert len(COMMAND_MODULES) == len(names)


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "DEBUG", "serve", "rng", "--socket", "x"],
        ["serve", "rng", "--socket", "x", "--log-level", "DEBUG"],
        ["audit", "trace", "f.jsonl", "--log-level", "DEBUG"],
    ],
)
def test_log_level_before_or_after_the_command(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).log_level == "DEBUG"


def test_log_level_defaults_to_warning() -> None:
    assert build_parser().parse_args(["diagram"]).log_level == "WARNING"


def test_unknown_command_and_bad_level_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["serve", "rng", "--socket", "x", "--log-level", "LOUD"])
    assert "invalid choice: 'LOUD'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["serve", "blk", "--socket", "s"], "vhsm.commands.serve"),
        (["--log-level", "DEBUG", "serve", "rng"], "vhsm.commands.serve"),
        (["--log-level=INFO", "audit", "trace", "x"], "vhsm.commands.audit"),
        (["--help"], None),
        (["--version"], None),
        (["nonsense"], None),
        ([], None),
    ],
)
def test_only_the_named_command_is_imported(argv: list[str], module: str | None) -> None:
    assert command_module(argv) == module


def test_serving_loads_no_audit_frontend_or_diagram_tooling() -> None:
    """A daemon started by `vhsm serve` carries only what serving needs (idle RSS)."""
    probe = (
        "import sys\n"
        "from vhsm.cli import main\n"
        "try:\n"
        "    main(['serve', 'blk', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('vhsm.audit', 'vhsm.frontend', 'vhsm.diagram', 'graphviz')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_help_wraps_to_columns_without_loading_shutil() -> None:
    """Building the parsers does not import shutil (nor zlib, bz2, lzma through it)."""
    probe = (
        "import sys\n"
        "from vhsm.cli import build_parser\n"
        "parser = build_parser(('vhsm.commands.serve',))\n"
        "print('shutil' in sys.modules)\n"
        "print(len(parser.format_help().splitlines()))\n"
    )

    def run(columns: str) -> list[str]:
        env = {**os.environ, "COLUMNS": columns}
        return subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
        ).stdout.split()

    narrow, wide = run("40"), run("200")
    assert narrow[0] == wide[0] == "False"
    assert int(narrow[1]) > int(wide[1])  # the width is honoured
