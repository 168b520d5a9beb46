"""What a ``Projection`` refuses at construction: a clear error before any I/O.

Examples
--------
>>> check_int("slices", 40000, 1, 1024)
Traceback (most recent call last):
...
ValueError: slices must be an int from 1 to 1024, not 40000
"""

from __future__ import annotations

import math

from casty_sa.models import PROJECTION_NAME_LENGTH

__all__ = ["check_int", "check_name", "check_seconds"]


def check_name(name: object) -> None:
    """A projection name the offsets table can hold, printable."""
    if type(name) is not str or not name or len(name) > PROJECTION_NAME_LENGTH:
        raise ValueError(
            f"name must be a str of 1 to {PROJECTION_NAME_LENGTH} characters, not {name!r:.80}"
        )
    if "\x00" in name or not name.isprintable():
        raise ValueError(f"name {name!r:.80} holds a NUL or another unprintable character")


def check_int(what: str, value: object, low: int, high: int) -> None:
    """An int (not a bool) from ``low`` to ``high``."""
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{what} must be an int from {low} to {high}, not {value!r:.80}")


def check_seconds(what: str, value: object, low: float, high: float) -> None:
    """A finite number of seconds from ``low`` to ``high``."""
    if (
        type(value) not in (int, float)
        or not math.isfinite(value)  # type: ignore[arg-type]
        or not low <= value <= high  # type: ignore[operator]
    ):
        raise ValueError(f"{what} must be seconds from {low} to {high}, not {value!r:.80}")
