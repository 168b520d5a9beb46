"""The read side's statements (events in the global order, entity ids), built for a dialect.

What the dialects share is here: the page of events after a place and up to a
stop, in ``(era, transaction_id, position)`` order through the global-order
index, with the optional filters (an entity id prefix compared character for
character, never as a ``LIKE`` pattern; a list of event types, with the rows whose
type is unknown or cut kept for the caller to decide); the walk over entity ids
through the primary key (a recursive CTE taking one index probe per id); an
entity's highest sequence number. Each dialect adds how it knows that a row is
committed (:mod:`casty_sa.backends.postgresql`, :mod:`casty_sa.backends.sqlite`).

Statements are compiled once per backend; :class:`Prepared` keeps the order of
their parameters, so the driver gets them positionally.

Examples
--------
>>> from sqlalchemy.dialects import sqlite
>>> from casty_sa.models import journal_tables
>>> events = journal_tables()[0]
>>> prepare(highest_sequence_nr(events), sqlite.dialect()).names
('entity_id', 'tombstone_id')
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Dialect,
    Integer,
    Select,
    String,
    Table,
    and_,
    bindparam,
    case,
    func,
    literal_column,
    or_,
    select,
    tuple_,
    union_all,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from casty_sa.models import tombstone_table
from casty_sa.ordering import MAX_ERA, MAX_TRANSACTION_ID, global_order

__all__ = [
    "TOP",
    "EventPage",
    "Place",
    "Prepared",
    "entity_id_walk",
    "event_backlog",
    "event_page",
    "global_order",
    "highest_sequence_nr",
    "page_values",
    "prepare",
]

#: ``(era, transaction_id, position)``: a row's place in the global order
Place = tuple[int, int, int]
#: above every place a row can have
TOP: Place = (MAX_ERA, MAX_TRANSACTION_ID, 2**63 - 1)

#: Builds the condition "``event_type`` is one of the list bound as ``types``" for a dialect.
TypesIn = Callable[[ColumnElement[Any]], ColumnElement[bool]]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A compiled statement and the names of its positional parameters, in order."""

    sql: str
    names: tuple[str, ...]

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        """The parameters for the driver, in the statement's order."""
        return [values[name] for name in self.names]


def prepare(statement: Any, dialect: Dialect) -> Prepared:
    """Compile ``statement`` for ``dialect``, noting the order of its parameters."""
    compiled = statement.compile(dialect=dialect)
    return Prepared(compiled.string, tuple(compiled.positiontup or ()))


@dataclass(frozen=True, slots=True)
class EventPage:
    """One page of events, and what the database said about what comes after it.

    Attributes
    ----------
    rows : list
        ``(era, transaction_id, position, entity_id, sequence_nr, payload, timestamp,
        event_type)`` in the global order.
    horizon : Place
        Every row at or below it was committed when the page was read, and was
        looked at (a page shorter than asked for ends there).
    ceiling : Place | None
        The highest place a row of this database can have had when the page was
        read (``None``: it holds no row); an offset above it was never handed out here.
    blocked : bool
        Committed rows wait above the horizon (a transaction below them still runs).
    """

    rows: list[Any]
    horizon: Place
    ceiling: Place | None
    blocked: bool = False


def page_values(after: Place, stop: Place, limit: int) -> dict[str, Any]:
    """The parameters of :func:`event_page` that bound a page."""
    names = ("era", "transaction_id", "position")
    return {
        **{f"after_{name}": value for name, value in zip(names, after, strict=True)},
        **{f"stop_{name}": value for name, value in zip(names, stop, strict=True)},
        "limit": limit,
    }


def _place(prefix: str) -> tuple[Any, ...]:
    return (
        bindparam(f"{prefix}_era"),
        bindparam(f"{prefix}_transaction_id"),
        bindparam(f"{prefix}_position"),
    )


def _beyond(order: Sequence[Any], place: str, *, above: bool, spelled: bool) -> Any:
    """``(era, transaction_id, position) > place`` (``above``) or ``<= place``.

    A row comparison, which SQLite and PostgreSQL seek in the global-order index
    with; ``spelled``: column by column instead, the form MySQL's and MariaDB's range
    optimizer turns into one range of the index (given the row comparison, MariaDB
    walks the whole index from its start).
    """
    bound = _place(place)
    strictly, last = (operator.gt, operator.gt) if above else (operator.lt, operator.le)
    if not spelled:
        return last(tuple_(*order), tuple_(*bound))
    (era, transaction_id, position), (at_era, at_transaction_id, at_position) = order, bound
    return or_(
        strictly(era, at_era),
        and_(
            era == at_era,
            or_(
                strictly(transaction_id, at_transaction_id),
                and_(transaction_id == at_transaction_id, last(position, at_position)),
            ),
        ),
    )


class char_length(FunctionElement[int]):
    """The length of a string in characters: ``length`` (SQLite, PostgreSQL), ``CHAR_LENGTH``
    on MySQL/MariaDB (whose ``length`` counts bytes)."""

    name = "char_length"
    type = Integer()
    inherit_cache = True


@compiles(char_length)
def _length(element: char_length, compiler: Any, **kw: Any) -> str:
    return f"length({compiler.process(element.clauses, **kw)})"


@compiles(char_length, "mysql")
@compiles(char_length, "mariadb")
def _char_length(element: char_length, compiler: Any, **kw: Any) -> str:
    return f"CHAR_LENGTH({compiler.process(element.clauses, **kw)})"


def starts_with(column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """``column`` begins with the string bound as ``name``: compared as text, no pattern.

    ``substr`` and :class:`char_length` count characters on every dialect, and ``=``
    compares them exactly (a ``%`` or ``_`` in the prefix is just a character; on
    MySQL the column's binary collation decides).
    """
    prefix = bindparam(name, type_=String)
    return func.substr(column, literal_column("1"), char_length(prefix)) == prefix


def event_page(
    events: Table,
    timestamp: Any,
    *,
    prefix: bool,
    types_in: TypesIn | None,
    below: Any = None,
    spelled: bool = False,
) -> Select[Any]:
    """Events after the place bound as ``after_*``, up to ``stop_*``, ``limit`` of them.

    ``prefix``: only entity ids starting with the string bound as ``prefix``.
    ``types_in``: only rows whose ``event_type`` is in the bound list, or unknown
    (``NULL``: the caller decodes them to tell). ``below``: a further bound of
    ``(era, transaction_id)`` (PostgreSQL's horizon). ``spelled``: the places compared
    column by column (MySQL, see :func:`_beyond`).
    """
    order = global_order(events)
    statement = (
        select(*order, events.c.entity_id, events.c.sequence_nr, events.c.payload)
        .add_columns(timestamp, events.c.event_type)
        .where(_beyond(order, "after", above=True, spelled=spelled))
        .where(_beyond(order, "stop", above=False, spelled=spelled))
    )
    if below is not None:
        statement = statement.where(tuple_(events.c.era, events.c.transaction_id) < below)
    if prefix:
        statement = statement.where(starts_with(events.c.entity_id, "prefix"))
    if types_in is not None:
        column = events.c.event_type
        statement = statement.where(types_in(column) | column.is_(None))
    # an explicit OFFSET: SQLite's compiler binds one of its own otherwise
    return statement.order_by(*order).limit(bindparam("limit")).offset(literal_column("0"))


def event_backlog(
    events: Table,
    timestamp: Any,
    *,
    prefix: bool,
    types_in: TypesIn | None,
    spelled: bool = False,
) -> Any:
    """How many events follow the place bound as ``after`` (counted up to ``limit``), and
    the oldest ``timestamp`` among them: a projection's lag, at the cost of ``limit``
    steps through the global-order index at most.

    The filters are :func:`event_page`'s; rows of an unknown type are counted.
    """
    order = global_order(events)
    following = select(timestamp.label("timestamp")).where(
        _beyond(order, "after", above=True, spelled=spelled)
    )
    if prefix:
        following = following.where(starts_with(events.c.entity_id, "prefix"))
    if types_in is not None:
        column = events.c.event_type
        following = following.where(types_in(column) | column.is_(None))
    page = (
        following.order_by(*order).limit(bindparam("limit")).offset(literal_column("0"))
    ).subquery("following")
    return select(func.count(), func.min(page.c.timestamp)).select_from(page)


def entity_id_walk(events: Table, *, contiguous_prefix: bool) -> Select[Any]:
    """Up to ``limit`` entity ids after the one bound as ``after``, in the column's order.

    A recursive CTE steps from one id to the next through the primary key
    (``min(entity_id) WHERE entity_id > previous``: one index probe per id, never a
    scan of each entity's events). ``contiguous_prefix``: the column's collation
    compares bytes (ids with a prefix are contiguous and follow it), so the walk
    starts at the prefix bound as ``prefix`` and stops at the first id without it.
    The caller filters the ids by prefix in every case.
    """
    after = _first_id(events, lambda column: column > bindparam("after", type_=String))
    first = select(after.label("entity_id"))
    if contiguous_prefix:
        # the later of two probes with one bound each: given both bounds in one probe,
        # SQLite seeks to one and steps over every row below the other (the events of
        # every id between them); a NULL (no id after) stays NULL
        at_prefix = _first_id(events, lambda column: column >= bindparam("prefix", type_=String))
        probes = select(after.label("next_id"), at_prefix.label("prefix_id")).subquery("probes")
        next_id, prefix_id = probes.c.next_id, probes.c.prefix_id
        later = case((next_id < prefix_id, prefix_id), else_=next_id)
        first = select(later.label("entity_id"))
    walk = first.add_columns(literal_column("1").label("n")).cte("walk", recursive=True)
    step_from = events.alias("next_entity")
    step = select(
        select(func.min(step_from.c.entity_id))
        .where(step_from.c.entity_id > walk.c.entity_id)
        .scalar_subquery(),
        walk.c.n + literal_column("1"),
    ).where(walk.c.entity_id.is_not(None), walk.c.n < bindparam("limit"))
    if contiguous_prefix:
        step = step.where(starts_with(walk.c.entity_id, "prefix"))
    walk = walk.union_all(step)
    return select(walk.c.entity_id).where(walk.c.entity_id.is_not(None)).order_by(walk.c.n)


def _first_id(
    events: Table, bound: Callable[[ColumnElement[Any]], ColumnElement[bool]]
) -> ColumnElement[Any]:
    """The lowest entity id within ``bound`` (or NULL): one probe of the primary key."""
    column = events.alias("following").c.entity_id
    return select(func.min(column)).where(bound(column)).scalar_subquery()


def highest_sequence_nr(events: Table) -> Select[Any]:
    """The highest sequence number stored for the entity bound as ``entity_id`` and
    ``tombstone_id`` (the same id twice; NULL for none), its deleted ones counted (the
    tombstone: :mod:`casty_sa.retention`)."""
    tombstones = tombstone_table(events.schema)
    both = union_all(
        select(func.max(events.c.sequence_nr).label("n")).where(
            events.c.entity_id == bindparam("entity_id", type_=String)
        ),
        select(tombstones.c.sequence_nr.label("n")).where(
            tombstones.c.entity_id == bindparam("tombstone_id", type_=String)
        ),
    ).subquery()
    return select(func.max(both.c.n))
