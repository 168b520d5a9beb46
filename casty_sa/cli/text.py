"""Text for a terminal: escaped control characters, aligned tables, optional colour.

Whatever ``casty-sa`` prints of a database's content (entity ids, decoded
events, error text from a decoder) goes through :func:`printable`, so no
stored string can drive the terminal.

Examples
--------
>>> for line in table(["ID", "N"], [["a", "1"], ["bb", "22"]], right={1}, flex=0, style=Style()):
...     print(line)
ID   N
a    1
bb  22
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "BOLD",
    "CYAN",
    "DIM",
    "RED",
    "Cell",
    "Style",
    "add_color_option",
    "fields",
    "painted",
    "printable",
    "shell_quote",
    "table",
    "terminal_style",
]

#: ANSI SGR codes.
BOLD, DIM, RED, CYAN = "1", "2", "31", "36"


@dataclass(frozen=True, slots=True)
class Style:
    """How text output looks.

    Parameters
    ----------
    color : bool
        Use ANSI colours (bold headers, dim placeholders, red errors).
    width : int | None
        Terminal width to fit tables into by shortening their widest column;
        ``None`` (piped output) never shortens anything.
    """

    color: bool = False
    width: int | None = None

    def paint(self, text: str, code: str) -> str:
        """``text`` wrapped in the ANSI SGR ``code`` when colours are on."""
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text


def add_color_option(parser: argparse.ArgumentParser) -> None:
    """``--color auto|always|never`` (see :func:`terminal_style`)."""
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="auto: when stdout is a terminal and NO_COLOR is unset",
    )


def terminal_style(choice: str) -> Style:
    """How a command prints: colour and width from ``--color``, the TTY and NO_COLOR."""
    tty = sys.stdout.isatty()
    color = choice == "always" or (
        choice == "auto"
        and tty
        and not os.environ.get("NO_COLOR")
        and os.environ.get("TERM") != "dumb"
    )
    return Style(color=color, width=shutil.get_terminal_size().columns if tty else None)


def fields(pairs: Sequence[tuple[str, str]], style: Style) -> list[str]:
    """``name  value`` lines with the names aligned (and bold when colours are on)."""
    width = max(len(name) for name, _ in pairs) + 2
    return [style.paint(name.ljust(width), BOLD) + value for name, value in pairs]


Cell = str | tuple[str, str]
"""A table cell: its text, or its text and an ANSI colour code."""


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    right: set[int],
    flex: int,
    style: Style,
) -> list[str]:
    """Aligned columns two spaces apart; column ``flex`` shrinks to fit ``style.width``."""
    texts = [[cell if isinstance(cell, str) else cell[0] for cell in row] for row in rows]
    paints = [[None if isinstance(cell, str) else cell[1] for cell in row] for row in rows]
    widths = [max([_cells(h)] + [_cells(row[i]) for row in texts]) for i, h in enumerate(headers)]
    if style.width is not None:
        spare = style.width - (sum(widths) + 2 * (len(widths) - 1))
        if spare < 0:
            widths[flex] = max(_cells(headers[flex]), widths[flex] + spare, 8)
            texts = [
                [_clip(text, widths[flex]) if i == flex else text for i, text in enumerate(row)]
                for row in texts
            ]

    def line(cells: Sequence[str], codes: Sequence[str | None]) -> str:
        """One table line: cells padded to their column, aligned left or right."""
        parts = []
        for i, (text, code) in enumerate(zip(cells, codes, strict=True)):
            pad = " " * (widths[i] - _cells(text))
            shown = text if code is None else style.paint(text, code)
            parts.append(pad + shown if i in right else shown + pad)
        return "  ".join(parts).rstrip()

    return [line(headers, [BOLD] * len(headers))] + [
        line(row, codes) for row, codes in zip(texts, paints, strict=True)
    ]


def painted(cell: Cell, style: Style) -> str:
    """A cell as text, coloured when its style asks."""
    return cell if isinstance(cell, str) else style.paint(*cell)


def printable(text: str) -> str:
    """``text`` with control characters escaped, so no output can drive the terminal.

    Examples
    --------
    >>> printable("acct-1\\x1b[2J")
    'acct-1\\\\x1b[2J'
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def shell_quote(text: str) -> str:
    """Quote text for a shell command line the user may copy."""
    return "'" + printable(text).replace("'", "'\\''") + "'"


def _cells(text: str) -> int:
    """Terminal cells ``text`` takes: wide East Asian characters take two."""
    if text.isascii():
        return len(text)
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        for ch in text
    )


def _clip(text: str, width: int) -> str:
    """Shorten text to ``width`` terminal cells, ending with an ellipsis."""
    if _cells(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        size = _cells(ch)
        if used + size > width - 1:
            break
        out.append(ch)
        used += size
    return "".join(out) + "…"


def when(timestamp: float) -> str:
    """A timestamp as ISO 8601 UTC (or as the number when it is out of range)."""
    try:
        return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")
    except (OverflowError, OSError, ValueError):
        return repr(timestamp)
