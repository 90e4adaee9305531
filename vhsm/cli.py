"""The `vhsm` command line: one sub-command per module in `vhsm.commands`.

Each command module exposes `register(subparsers)`, which adds its parser and
sets `func` to a callable taking the parsed arguments and returning the exit
status. Errors a user can fix are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
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


class _VersionAction(argparse.Action):
    """``--version``: the version and the active data path, one unwrapped line."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        print(f"vhsm {__version__}; data path: {speedups.data_path()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
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
    for name in COMMAND_MODULES:
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
    parser = build_parser()
    args = parser.parse_args(argv)
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
