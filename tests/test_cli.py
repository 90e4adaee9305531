"""The `vhsm` command line: sub-commands, --log-level anywhere, one-line errors."""

from __future__ import annotations

import pytest

from vhsm.cli import COMMAND_MODULES, build_parser, main


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
