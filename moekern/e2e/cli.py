"""`moekern e2e`: the end-to-end A/B runner's command (moekern.cli lists it); main() is `python -m moekern.e2e`.

Building the parser imports only the flag definitions (no vLLM, no torch); the runner's modules are imported
when the command runs.
"""

from __future__ import annotations

import argparse
import sys

from moekern.e2e.args import DESCRIPTION, add_arguments, check_args


def add_parser(subparsers) -> None:
    """Register `moekern e2e` with the runner's flags."""
    p = subparsers.add_parser("e2e", help="end-to-end A/B of the MoE backends on vLLM (offline and served)",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=lambda args: _run(check_args(p, args)))


def _run(args: argparse.Namespace) -> int:
    from moekern.e2e.runner import run

    stop_on_sigterm()
    return run(args)


def stop_on_sigterm() -> None:
    """SIGTERM (a sweep's timeout, `timeout` around a device stage) raises SystemExit(143) in the main thread,
    so the runner's `finally` blocks stop the servers it started in their own sessions instead of leaving them
    holding the GPU for the next run."""
    import signal

    def _stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)


def main(argv: list[str] | None = None) -> int:
    """`python -m moekern.e2e [flags]`: parse, check, run; the exit code."""
    from moekern.e2e.args import build_parser

    p = build_parser(prog="python -m moekern.e2e")
    return _run(check_args(p, p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
