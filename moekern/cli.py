"""`moekern ...`: the one place that knows every part of the package.

Each command lives with the code it drives; this module lists them. A command module exposes
`add_parser(subparsers)` which registers its sub-parser with `set_defaults(func=...)`; `func(args)`
returns an exit code. Modules are imported when the parser is built, so keep their top-level imports
light (import pandas, matplotlib, vLLM inside the command functions).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command-module paths, in the order `moekern --help` lists them
COMMAND_MODULES = (
    "moekern.bench.cli",  # bench
    "moekern.bench.history",  # bench-history
    "moekern.models.cli",  # models
    "moekern.analysis.cli",  # metrics, steptimes, datasets, predict, validate, placement, sweep, report
    "moekern.analysis.study_cli",  # profile, coactivation, factorial, recommend, project
    "moekern.diffusion.cli",  # diffusion
    "moekern.e2e.cli",  # e2e
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`moekern metrics: error: argument --phase: ...`) pointing at
    --help, not the usage block: the same shape as a `UsageError`. Sub-parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moekern", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"moekern {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for path in COMMAND_MODULES:
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == path or path.startswith(exc.name + ".")):
                continue  # that part of the package is not there yet
            raise
        module.add_parser(sub)
    return parser


def _version() -> str:
    from moekern import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage line already printed: its code, as a return
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from moekern.errors import UsageError

    try:
        return int(args.func(args) or 0)
    except SystemExit as exc:  # a command that checks its flags after parsing (e2e: parser.error): its code
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"{_command_prog(parser, args)}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A path the file system refused (an --out folder that does not exist, a file without read
        # permission): the user's to fix, as a UsageError. OSErrors without a path are not, and propagate.
        if args.debug or exc.filename is None:
            raise
        print(f"{_command_prog(parser, args)}: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _command_prog(parser: argparse.ArgumentParser, args) -> str:
    """The prog of the sub-parser that ran (`moekern profile trace`), found by following the chosen names."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, subs[0].dest, None) if subs else None
        if chosen not in (subs[0].choices if subs else {}):
            return parser.prog
        parser = subs[0].choices[chosen]


if __name__ == "__main__":
    sys.exit(main())
