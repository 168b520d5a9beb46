"""psycopg's arrays of an ``unnest(…)``, in binary, each by a dumper fixed by its column's type.

The PostgreSQL backend binds a write group's rows (and a batch of reads' keys) as
one array per column. psycopg's own dumper of a list looks at every element and
writes the array as text, in Python, which the server then parses: twice
asyncpg's time for a write group of 100 events. Here each column's values are
wrapped once in a list subclass of their element type, whose dumper writes
PostgreSQL's binary array format in a few calls.

Examples
--------
>>> [type(array).__name__ for array in arrays([["a"], [1]], ("text", "int8"))]
['_Texts', '_Int8s']
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections.abc import Sequence
from typing import Any

__all__ = ["adapt", "arrays"]


def arrays(columns: Sequence[list[Any]], types: Sequence[str]) -> list[list[Any]]:
    """``columns`` wrapped for their dumpers: ``columns[i]`` holds values of ``types[i]``
    (``"text"``, ``"int8"``, ``"float8"`` or ``"bytea"``), never NULL."""
    return [_ARRAYS[kind](column) for kind, column in zip(types, columns, strict=True)]


def adapt(conn: Any) -> None:
    """Teach a psycopg connection (its own adapters: an application's connection's
    other uses see nothing of it) the dumpers of :func:`arrays`."""
    for array, dumper in _array_dumpers().items():
        conn.adapters.register_dumper(array, dumper)


# the arrays of arrays(), by element type: each has its dumper
class _Texts(list[str]):
    pass


class _Int8s(list[int]):
    pass


class _Float8s(list[float]):
    pass


class _Byteas(list[bytes]):
    pass


_ARRAYS: dict[str, type[list[Any]]] = {
    "text": _Texts,
    "int8": _Int8s,
    "float8": _Float8s,
    "bytea": _Byteas,
}
_LENGTH = struct.Struct(">i").pack


@functools.cache
def _array_dumpers() -> dict[type, type]:
    """psycopg's dumpers of the :meth:`PgDriver.arrays`: one-dimensional arrays without NULLs,
    in PostgreSQL's binary array format."""
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    head = struct.Struct(">iiIii").pack  # dimensions, has NULLs, element oid, length, lower bound

    class Fixed(Dumper):
        format = Format.BINARY
        element: tuple[int, str]  # oid, struct code of a value of 8 bytes

        def dump(self, obj: Any) -> bytes:
            n = len(obj)
            oid, code = self.element
            # each value after its length (8)
            values = itertools.chain.from_iterable(zip(itertools.repeat(8, n), obj, strict=True))
            return head(1, 0, oid, n, 1) + struct.pack(f">{('i' + code) * n}", *values)

    class Varying(Dumper):
        format = Format.BINARY
        element: int

        def __init__(self, cls: type, context: Any = None) -> None:
            super().__init__(cls, context)
            encoding = self.connection.info.encoding if self.connection else "utf-8"
            self._encoding = "utf-8" if encoding == "ascii" else encoding  # SQL_ASCII

        def dump(self, obj: Any) -> bytes:
            values = self.encode(obj)
            return head(1, 0, self.element, len(values), 1) + b"".join(
                [_LENGTH(len(value)) + value for value in values]
            )

        def encode(self, obj: Any) -> list[bytes]:
            return obj  # type: ignore[no-any-return]

    class Texts(Varying):
        oid, element = 1009, 25

        def encode(self, obj: Any) -> list[bytes]:
            return [value.encode(self._encoding) for value in obj]

    class Byteas(Varying):
        oid, element = 1001, 17

    class Int8s(Fixed):
        oid, element = 1016, (20, "q")

    class Float8s(Fixed):
        oid, element = 1022, (701, "d")

    return {_Texts: Texts, _Int8s: Int8s, _Float8s: Float8s, _Byteas: Byteas}
