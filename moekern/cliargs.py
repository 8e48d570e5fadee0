"""argparse types shared by the command modules: a bad value is refused while the command line is parsed.

argparse turns an `ArgumentTypeError` into one line naming the flag
(`moekern placement: error: argument --ep-size: '0' is not an int >= 1`) and exit code 2, the same
contract as `moekern.errors.UsageError` for what only the data can tell (an EP size that does not divide
the log's expert count). Each type checks one thing and says what it expected and what came. Imports stay
light (stdlib, the model registry, the gate-log phases): the parser is built on every `moekern` call.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    """An int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 1")
    return value


def nonneg_int(text: str) -> int:
    """An int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 0")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value


def fraction(text: str) -> float:
    """A float strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1)") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1)")
    return value


def positive_int_list(text: str) -> tuple[int, ...]:
    """A comma list of ints >= 1, e.g. `1,2,4`."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of ints >= 1 (e.g. 1,2,4)")
    return values


def existing_path(text: str) -> str:
    """A file or folder that exists."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return text


def existing_file(text: str) -> str:
    """A file that exists."""
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} " + ("is a folder, expected a file" if p.is_dir()
                                                          else "does not exist"))
    return text


def existing_dir(text: str) -> str:
    """A folder that exists."""
    p = Path(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} " + ("is a file, expected a folder" if p.exists()
                                                          else "does not exist"))
    return text


def model_name(text: str) -> str:
    """A model of the registry (`moekern models` lists them), by key or alias."""
    from moekern.models.registry import MODELS, get_model

    try:
        get_model(text)
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; known: {', '.join(MODELS)}") from None
    return text


def phase(text: str) -> str:
    """A gate-log phase (prefill, decode, mixed, diffusion, unknown)."""
    from moekern.gatelog.schema import PHASES

    if text not in PHASES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a phase; expected one of {', '.join(PHASES)}")
    return text
