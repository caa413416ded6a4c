"""Checks of command-line values, as argparse ``type=`` functions: a bad value is a usage error
(exit 2) naming the option, before anything runs. ``CommandError`` is what a command raises for a
usage error it finds later (``main`` prints its message and exits 2)."""

from __future__ import annotations

import argparse
import math


class CommandError(ValueError):
    """A usage error a command found: ``main`` prints the message on one line and exits 2."""


def device(value: str) -> str:
    """``cpu``, or ``cuda`` / ``cuda:N`` naming a CUDA device this machine has (``devices.check_device``)."""
    from influence_bench.devices import check_device

    try:
        return check_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int(value: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None


def _float(value: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    return x


def positive_int(value: str) -> int:
    n = _int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return n


def nonnegative_int(value: str) -> int:
    n = _int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return n


def nonnegative_float(value: str) -> float:
    x = _float(value)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return x


# Options of commands defined elsewhere, checked by ``main`` after parsing: dest -> (check, flag).
CHECKED = {
    "device": (device, "--device"),
    "chunk": (positive_int, "--chunk"),
    "sample": (positive_int, "--sample"),
    "workers": (positive_int, "--workers"),
    "n": (positive_int, "--n"),
    "seed": (nonnegative_int, "--seed"),
    "tol": (nonnegative_float, "--tol"),
    "rtol": (nonnegative_float, "--rtol"),
}


def check_parsed(args: argparse.Namespace) -> str | None:
    """The first option value of ``args`` that ``CHECKED`` refuses, as argparse would say it, or None."""
    for dest, (check, flag) in CHECKED.items():
        value = getattr(args, dest, None)
        if value is None or isinstance(value, bool):
            continue
        try:
            check(str(value))
        except argparse.ArgumentTypeError as exc:
            return f"argument {flag}: {exc}"
    return None
