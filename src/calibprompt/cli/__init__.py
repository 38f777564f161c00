"""The ``calibprompt`` command line: a thin layer over the library, one module per group of
commands, flags of run commands generated from the run configs (:mod:`.options`)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from calibprompt import __version__
from calibprompt.cli import data, decide, demo, measure, results, run
from calibprompt.cli.common import CLIError

__all__ = ["CLIError", "build_parser", "main"]

#: Command groups, in the order ``--help`` lists them.
MODULES = (measure, data, run, results, decide, demo)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other user error (its usage block would
    bury the message): ``calibprompt train: error: argument --lr: ... (see calibprompt train --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (each module registers its own)."""
    parser = _Parser(
        prog="calibprompt", description="Calibration-aware prompt tuning and calibration metrics for medical VLMs.")
    parser.add_argument("--version", action="version", version=f"calibprompt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help_text: str, examples: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=examples,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    for module in MODULES:
        module.register(add)
    #: command -> {dest: its long flag}, so that an error naming a field names the flag instead
    parser.flags = {name: {a.dest: a.option_strings[-1] for a in command._actions
                           if a.option_strings and a.option_strings[-1].startswith("--")}
                    for name, command in sub.choices.items()}
    return parser


def _flag_named(message: str, flags: dict[str, str]) -> str:
    """``"tune_folds: expected ..."`` -> ``"--tune-folds: expected ..."`` when ``tune_folds`` is a
    flag of the command (the library names its fields; the command line user typed flags)."""
    match = re.match(r"([a-z][a-z0-9_]*)(:| )", message)
    if match and match.group(1) in flags:
        return flags[match.group(1)] + message[len(match.group(1)):]
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors print one line and exit 2, Ctrl-C exits 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (CLIError, ValueError) as exc:  # validation errors of the library name the bad input
        message = _flag_named(str(exc), getattr(parser, "flags", {}).get(args.command, {}))
        print(f"calibprompt {args.command}: error: {message}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # e.g. a Ray cluster (--address) that cannot be reached: not a disk problem
        print(f"calibprompt {args.command}: error: {exc} (a connection failed: check --address and that the "
              "cluster is running; finished runs are kept and the same command resumes)", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only or full disk, a path that is not writable: outputs are atomic
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"calibprompt {args.command}: error: {where}{exc.strerror or exc} (nothing was left "
              "half-written; free space or choose another --out, then run the same command again)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"calibprompt {args.command}: interrupted; finished runs are kept and an unfinished one "
              "resumes when the same command is run again", file=sys.stderr)
        return 130
