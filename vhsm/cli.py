"""The `vhsm` command line: one sub-command per module in `vhsm.commands`.

Each command module exposes `register(subparsers)`, which adds its parser and
sets `func` to a callable taking the parsed arguments and returning the exit
status. Errors a user can fix are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from vhsm import __version__, speedups
from vhsm.errors import VhsmError

#: Command modules, in the order `vhsm --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "vhsm.commands.audit",
    "vhsm.commands.diagram",
    "vhsm.commands.record",
    "vhsm.commands.serve",
    "vhsm.commands.demo",
    "vhsm.commands.bench",
)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _terminal_columns() -> int:
    """The width help is wrapped to: ``$COLUMNS``, else the terminal's, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, given the width without ``shutil``.

    argparse builds a formatter for every argument it adds, and without a width
    the formatter imports ``shutil`` (and with it zlib, bz2 and lzma): a daemon
    started from the command line would hold them for nothing.
    """

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        super().__init__(
            prog,
            indent_increment,
            max_help_position,
            width if width is not None else _terminal_columns() - 2,
        )


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help formatter is `_Formatter` unless told otherwise.

    Sub-command parsers are built with the parent's class, so they get it too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


class _VersionAction(argparse.Action):
    """``--version``: the version and the active data path, one unwrapped line."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        print(f"vhsm {__version__}; data path: {speedups.data_path()}")
        parser.exit()


def command_module(argv: Sequence[str]) -> str | None:
    """The module of the sub-command ``argv`` runs, when its first word names one.

    Only that module is imported then: `vhsm serve` does not load the auditor, the
    front-end or the diagram tooling, which a long-running daemon would carry for
    nothing. None (every module) for `--help`, `--version` and unknown words.
    """
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--log-level":
            i += 2
        elif word.startswith("--log-level="):
            i += 1
        elif word.startswith("-"):
            return None
        else:
            module = f"vhsm.commands.{word}"
            return module if module in COMMAND_MODULES else None
    return None


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The top-level parser with the sub-commands of ``modules`` (default: all)."""
    parser = _Parser(
        prog="vhsm", description="vhost-user back-ends in Python, the protocol as state machines"
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="show the version and the data path in use (compiled accelerator or pure Python)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=LOG_LEVELS,
        help="logging threshold (default WARNING)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        importlib.import_module(name).register(subparsers)
    _accept_log_level_everywhere(parser)
    return parser


def _accept_log_level_everywhere(parser: argparse.ArgumentParser) -> None:
    """Let every sub-command take ``--log-level`` too (`vhsm serve rng --log-level DEBUG`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if any(a.nargs == argparse.REMAINDER for a in sub._actions):
                    continue  # passes its arguments through untouched (vhsm bench NAME ...)
                sub.add_argument(
                    "--log-level",
                    default=argparse.SUPPRESS,
                    choices=LOG_LEVELS,
                    help="logging threshold (default WARNING)",
                )
                _accept_log_level_everywhere(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    only = command_module(words)
    parser = build_parser((only,) if only is not None else COMMAND_MODULES)
    args = parser.parse_args(words)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        status: int = args.func(args)
    except VhsmError as err:
        print(f"vhsm {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
