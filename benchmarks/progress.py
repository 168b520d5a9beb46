"""Progress lines on stderr, so that stdout carries only the table or the JSON."""

from __future__ import annotations

import sys


def progress(*parts: object) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)
