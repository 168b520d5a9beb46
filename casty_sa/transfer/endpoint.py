"""What one side of a copy offers (:class:`Endpoint`), and the key lookups both sides chunk.

Examples
--------
>>> [list(chunk) for chunk in chunks([1, 2, 3, 4, 5], 2)]
[[1, 2], [3, 4], [5]]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from casty_sa.transfer.values import JournalStats, Row

__all__ = ["LOOKUP_CHUNK", "Endpoint", "chunks"]

#: Keys looked up per statement: under SQLite's oldest limit of 999 bound parameters.
LOOKUP_CHUNK = 400


class Endpoint(Protocol):
    """One side of a copy: a casty file or a casty-sa database."""

    @property
    def name(self) -> str:
        """Where the side is, for messages (passwords masked)."""
        ...

    @property
    def keeps_zero_sign(self) -> bool:
        """Whether a ``-0.0`` timestamp written to the side is read back as ``-0.0``."""
        ...

    async def stats(self) -> JournalStats:
        """Per-entity event statistics and snapshot positions."""
        ...

    async def read_events(
        self, after: tuple[str, int] | None, limit: int, max_bytes: int
    ) -> list[Row]:
        """Up to ``limit`` events in key order, starting after the key ``after``.

        The rows stop before ``max_bytes`` (:func:`casty_sa.batching.row_bytes`)
        would be passed, though never before the first row.
        """
        ...

    async def read_snapshots(self, after: str | None, limit: int, max_bytes: int) -> list[Row]:
        """Up to ``limit`` snapshots (and ``max_bytes``) in entity order, after entity ``after``."""
        ...

    async def fetch_events(self, keys: Sequence[tuple[str, int]]) -> list[Row]:
        """The events stored under ``keys`` (``(entity id, sequence number)``), any order."""
        ...

    async def fetch_snapshots(self, entities: Sequence[str]) -> list[Row]:
        """The snapshots of ``entities``, any order."""
        ...

    async def count_events(self, bounds: Sequence[tuple[str, int]]) -> list[int]:
        """Per ``(entity id, bound)``, how many events of the entity are at or below ``bound``."""
        ...

    async def write_events(self, rows: Sequence[Row]) -> int:
        """Insert the rows the side lacks, in one transaction; return how many were new."""
        ...

    async def write_snapshots(self, rows: Sequence[Row]) -> int:
        """Insert or advance snapshots in one transaction; return how many changed."""
        ...


def chunks[T](items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
