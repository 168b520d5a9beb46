"""Print the query plans of every statement the read side runs, and of the writers' place-taking.

Usage::

    python tools/read_plans.py postgresql://user@host/db
    python tools/read_plans.py path/to/journal.db
    python tools/read_plans.py mariadb://root@127.0.0.1:3306/scratch
    python tools/read_plans.py --fill 200000 sqlite:///scratch.db   # fill a scratch table first

Each statement is the backend's own, with real values: the read side's calls
(``event_page`` in every filter variant, from the start, the middle and the end of
the global order; the entity id walks; ``highest_sequence_nr``) are run through
the backend, which records the SQL and parameters it sends to the driver, and each
of them is then explained on the same database. PostgreSQL shows the plan for the
values (a custom plan) and the generic plan a prepared statement switches to after
five runs (asyncpg prepares every statement). The writers' place-taking
(:func:`casty_sa.ordering.current_era` in PostgreSQL's ``INSERT``; on SQLite the
highest position a write group numbers its rows from, :func:`casty_sa.ordering.highest_position`,
and the one-statement :func:`casty_sa.ordering.numbered_insert` of larger groups) is
explained as compiled by the backend.

MySQL/MariaDB: ``EXPLAIN FORMAT=JSON``, summed up as one line per table read
(``TABLE name ACCESS type USING INDEX key``) above the JSON; the two statements of
an event page's packet (the newest place, the page) are explained one by one; the
hot path's reads of an entity's events (one entity, and a batch of them) and the
counter's ``UPDATE`` that takes a write group's positions are explained too. Each
statement is also run, counting the rows the storage engine read
(``Handler_read_*``): what ``LIMIT`` makes of an index walk the plan cannot show.

``tests/test_read_plans.py`` runs :func:`fill` and :func:`read_plans` and checks
that every plan goes through the index it should, never scanning the table.

``--fill N`` first adds ``N`` events over ``N / 100`` entities (one in ten stored as
before migration ``0002``, the rest in groups of 250 per transaction) and a few
journal writes, then ``ANALYZE``: for a scratch database only.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from casty import PersistedEvent
from sqlalchemy import URL, make_url, text

from casty_sa import SAJournal, upgrade
from casty_sa.backends import backend_for
from casty_sa.backends.postgresql import _columns
from casty_sa.backends.read_statements import TOP, Place
from casty_sa.backends.sqlite_rows import flat_events, multi_row
from casty_sa.engine import open_engine
from casty_sa.models import EVENTS_PRIMARY_KEY, GLOBAL_ORDER_INDEX
from casty_sa.urls import to_async_url

__all__ = [
    "NO_TABLE_READ",
    "Plan",
    "Statement",
    "build_parser",
    "fill",
    "full_scans",
    "main",
    "read_plans",
    "uses_index",
]

EVENTS = "casty_sa_events"
#: SQLite names the index of a table's primary key itself
SQLITE_PRIMARY_KEY = "sqlite_autoindex_casty_sa_events_1"
#: the reader's place before every row (``EventStream``'s cursor for ``after=None``)
START: Place = (0, 0, -(2**63))
#: event types of the filled table, the last one rare (one event in 200)
TYPES = ("shop.Deposited", "shop.Withdrawn", "shop.Renamed", "shop.Closed")
PAGE = 1000  # journal.events()'s default batch_size
_XID = "pg_current_xact_id()::text::bigint"
_TABLE_NAME = re.compile(r'"table_name": "([^"]*)"')
_ACCESS = re.compile(r'^\s*"access_type": "([^"]*)"', re.MULTILINE)
_KEY = re.compile(r'^\s*"key": "([^"]*)"', re.MULTILINE)
_ROWS = re.compile(r'^\s*"rows": (\d+)', re.MULTILINE)
#: MySQL's messages of a plan that reads no table, and how the plan's lines say so: a
#: ``MIN``/``MAX`` answered by one look at an index's end (found or not), or a range the
#: optimizer found empty for the values given (``Plan.steps`` shows what was read)
NO_TABLE_READ = {
    "Select tables optimized away": "NO TABLE READ: MIN/MAX from one look at an index",
    "No matching min/max row": "NO TABLE READ: MIN/MAX from one look at an index, none",
    "Impossible WHERE noticed after reading const tables": "NO TABLE READ: an empty range",
}


@dataclass(frozen=True)
class Statement:
    """One statement the journal runs, with the values it runs with."""

    name: str
    sql: str
    args: tuple[Any, ...]
    #: the index the plan must go through
    index: str


@dataclass(frozen=True)
class Plan:
    """A statement's plan, as the database prints it."""

    statement: Statement
    lines: list[str]
    generic: bool = False
    #: SQLite: virtual machine instructions the statement ran (rounded up to hundreds): what
    #: its plan text cannot show, e.g. how far an index seek steps before its first row;
    #: MySQL: the rows the storage engine read for it (``Handler_read_*``)
    steps: int | None = None

    @property
    def title(self) -> str:
        return self.statement.name + (" [generic plan]" if self.generic else "")


def full_scans(plan: Plan) -> list[str]:
    """The lines of ``plan`` that read the events table without an index.

    PostgreSQL: a ``Seq Scan`` of it (under any alias). SQLite: a ``SCAN`` of it
    (``casty_sa_events`` or an alias the statements give it) that names no index.
    MySQL: a table read with access type ``ALL``, or ``index`` (an index read from one
    end) where the optimizer expects to read more than a page of it.
    """
    return [line for line in plan.lines if _full_scan(line.strip().removeprefix("->").split())]


def _full_scan(words: list[str]) -> bool:
    if words[:3] == ["Seq", "Scan", "on"]:
        return words[3] == EVENTS
    if words[:1] == ["SCAN"]:
        return words[1] in (EVENTS, "following", "next_entity") and "INDEX" not in words
    if words[:1] == ["TABLE"]:  # MySQL, see _mysql_tables
        scan = words[3] == "ALL" or (words[3] == "index" and int(words[-1]) > PAGE)
        return words[1] in (EVENTS, "following") and scan
    return False


def uses_index(plan: Plan, index: str) -> bool:
    """Whether ``plan`` reads the events table through ``index`` (MySQL: or reads no table
    at all, see :data:`NO_TABLE_READ`)."""
    return any(
        f"INDEX {index}" in line or f"using {index}" in line or line in NO_TABLE_READ.values()
        for line in plan.lines
    )


# -- the statements ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Places:
    """Places and values of the data the statements are run with."""

    middle: Place
    newest: Place
    entity: str
    prefix: str


async def read_plans(url: str | URL) -> list[Plan]:
    """The plan of every statement of the read side and the writers' place-taking on ``url``."""
    engine, _ = open_engine(url)
    backend: Any = backend_for(engine, None)
    try:
        postgres = engine.dialect.name == "postgresql"
        mysql = engine.dialect.name in ("mysql", "mariadb")
        places = await _places(engine)
        statements = await _read_statements(backend, places, postgres, mysql)
        statements += _write_statements(backend, postgres, mysql)
        plans = []
        for statement in statements:
            if mysql:
                lines = await _explain_mysql(backend, statement)
                plans.append(Plan(statement, lines, steps=await _mysql_reads(backend, statement)))
                continue
            lines = await _explain(backend, statement, postgres)
            if postgres:
                plans.append(Plan(statement, lines))
                plans.append(Plan(statement, await _explain_generic(backend, statement), True))
            else:
                plans.append(Plan(statement, lines, steps=await _steps(backend, statement)))
        return plans
    finally:
        await backend.close()
        await engine.dispose()


async def _places(engine: Any) -> _Places:
    async with engine.connect() as conn:
        count = (await conn.execute(text(f"SELECT count(*) FROM {EVENTS}"))).scalar_one()
        if not count:
            raise SystemExit(f"{EVENTS} holds no event: fill it first (--fill)")
        places = f"SELECT era, transaction_id, position, entity_id FROM {EVENTS} ORDER BY"
        middle = (await conn.execute(text(f"{places} 1, 2, 3 LIMIT 1 OFFSET {count // 2}"))).one()
        newest = (await conn.execute(text(f"{places} 1 DESC, 2 DESC, 3 DESC LIMIT 1"))).one()
        last = (await conn.execute(text(f"SELECT max(entity_id) FROM {EVENTS}"))).scalar_one()
    # the prefix of the last ids: a walk that starts at it skips every id before it
    prefix = last[: max(1, len(last) - 2)]
    return _Places(tuple(middle[:3]), tuple(newest[:3]), str(middle[3]), prefix)


async def _read_statements(
    backend: Any, places: _Places, postgres: bool, mysql: bool
) -> list[Statement]:
    """The statements the read side's calls send (on MySQL also the hot path's reads of
    events), recorded as the backend runs them."""
    order = GLOBAL_ORDER_INDEX
    key = EVENTS_PRIMARY_KEY if postgres else "PRIMARY" if mysql else SQLITE_PRIMARY_KEY
    calls: list[tuple[str, str, Callable[[], Awaitable[Any]]]] = []
    filters = {
        "no filter": (None, None),
        "prefix": (places.prefix, None),
        "types": (None, [TYPES[-1]]),
        "prefix and types": (places.prefix, [TYPES[-1]]),
    }
    ranges = {
        "from the start": (START, TOP),
        "from the middle": (places.middle, places.newest),
        "at the end": (places.newest, places.newest),
    }
    for filtered, (prefix, types) in filters.items():
        for where, (after, stop) in ranges.items():
            page = partial(backend.event_page, after, stop, PAGE, prefix, types)
            calls.append((f"event page, {filtered}, {where}", order, page))
    calls += [
        ("entity ids, from the start", key, lambda: backend.entity_id_page("", PAGE, None)),
        (
            "entity ids, from the middle",
            key,
            lambda: backend.entity_id_page(places.entity, PAGE, None),
        ),
    ]
    for bytewise in (True, False) if postgres or mysql else (True,):
        how = "contiguous" if bytewise else "any collation: every id checked"
        walk = partial(_walk_by_prefix, backend, places.prefix, bytewise, postgres or mysql)
        calls.append((f"entity ids with a prefix ({how})", key, walk))
    calls += [
        ("highest sequence nr", key, lambda: backend.highest_sequence_nr(places.entity)),
        ("highest sequence nr, unknown id", key, lambda: backend.highest_sequence_nr("nobody")),
    ]
    if mysql:
        batch = [(places.entity, 1), (places.prefix + "0", 5), ("nobody", 1)]
        calls += [
            ("load events", key, lambda: backend.fetch_events(places.entity, 1)),
            ("load events, batched", key, lambda: backend._fetch_events_batch(batch)),
            ("conflict, lowest stored", key, lambda: backend.min_stored(places.entity, 1, 9)),
        ]
    statements: list[Statement] = []
    for name, index, call in calls:
        async with _recording(backend, postgres, mysql) as sent:
            await call()
        ran = [(sql, args) for sql, args in sent if EVENTS in sql]
        for k, (sql, args) in enumerate(ran, 1):
            part = f" ({k}/{len(ran)})" if len(ran) > 1 else ""
            statements.append(Statement(name + part, sql, args, index))
    return statements


async def _walk_by_prefix(backend: Any, prefix: str, bytewise: bool, both: bool) -> Any:
    if both:  # both walks, whatever the column's collation here
        backend._bytewise_ids = bytewise
    return await backend.entity_id_page("", PAGE, prefix)


def _write_statements(backend: Any, postgres: bool, mysql: bool) -> list[Statement]:
    """The writers' place-taking, as the backend compiled it."""
    row = ("plans-writer", 1, 0.5, pickle.dumps("event"), "str")
    if mysql:
        # the rows' INSERT reads nothing: its positions count down from LAST_INSERT_ID()
        take = backend._take.split("; ")[-1]
        return [Statement("insert (positions: the counter)", take, (1,), "PRIMARY")]
    if postgres:
        # the position comes from the identity; the era from two probes of the index's end
        return [
            Statement(
                "insert (era: current_era, position: identity)",
                backend._insert,
                tuple(_columns([row])),
                GLOBAL_ORDER_INDEX,
            )
        ]
    return [
        Statement(
            "insert, highest position (a group's first step)", backend._top, (), GLOBAL_ORDER_INDEX
        ),
        Statement(
            "insert (position: numbered_insert)",
            multi_row(backend._insert, 1),
            tuple(flat_events([row])),
            GLOBAL_ORDER_INDEX,
        ),
    ]


@asynccontextmanager
async def _recording(
    backend: Any, postgres: bool, mysql: bool = False
) -> AsyncIterator[list[tuple[str, Any]]]:
    """Record ``(sql, args)`` of every statement the backend sends meanwhile."""
    sent: list[tuple[str, Any]] = []
    if postgres or mysql:
        original = backend.connection
        recorder = _MySQLRecorder if mysql else _Recorder

        @asynccontextmanager
        async def connection() -> AsyncIterator[Any]:
            async with original() as conn:
                yield recorder(conn, sent)

        backend.connection = connection
    else:
        read = backend._read

        async def recorded(sql: str, params: tuple[Any, ...]) -> list[Any]:
            sent.append((sql, tuple(params)))
            return await read(sql, params)  # type: ignore[no-any-return]

        backend._read = recorded
    try:
        yield sent
    finally:
        del backend.__dict__["connection" if postgres or mysql else "_read"]


class _Recorder:
    """An asyncpg connection that notes the statements it runs."""

    def __init__(self, conn: Any, sent: list[tuple[str, Any]]) -> None:
        self._conn, self._sent = conn, sent

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._conn, name)

        async def run(sql: str, *args: Any, **options: Any) -> Any:
            self._sent.append((sql, args))
            return await method(sql, *args, **options)

        return run


class _MySQLRecorder:
    """An asyncmy/aiomysql connection whose cursors note the statements they run, each
    statement of a packet on its own."""

    def __init__(self, conn: Any, sent: list[tuple[str, Any]]) -> None:
        self._conn, self._sent = conn, sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def cursor(self) -> _RecordingCursor:
        return _RecordingCursor(self._conn.cursor(), self._sent)


class _RecordingCursor:
    def __init__(self, cursor: Any, sent: list[tuple[str, Any]]) -> None:
        self._cursor, self._sent = cursor, sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    async def __aenter__(self) -> _RecordingCursor:
        await self._cursor.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._cursor.__aexit__(*exc)

    async def execute(self, sql: str, args: Any = None) -> Any:
        rest = list(args or ())
        for part in sql.split("; "):
            count = part.count("%s")
            self._sent.append((part, tuple(rest[:count])))
            rest = rest[count:]
        return await self._cursor.execute(sql, args)


async def _mysql_rows(backend: Any, sql: str, args: tuple[Any, ...]) -> list[Any]:
    async with backend.connection() as conn:
        async with conn.cursor() as cursor:
            await cursor.execute(sql, args or None)
            rows = list(await cursor.fetchall())
        await conn.rollback()  # the backend's connections go back with no transaction open
        return rows


async def _explain_mysql(backend: Any, statement: Statement) -> list[str]:
    """``EXPLAIN FORMAT=JSON``: a line per table read (see :func:`_mysql_tables`), the JSON."""
    [(plan,)] = await _mysql_rows(backend, f"EXPLAIN FORMAT=JSON {statement.sql}", statement.args)
    return [*_mysql_tables(plan), *plan.splitlines()]


def _mysql_tables(plan: str) -> list[str]:
    """``TABLE name ACCESS type [USING INDEX key] ROWS n`` for each table the plan reads
    (``n``: the rows the optimizer expects to read), and :data:`_OPTIMIZED_AWAY` for a
    plan that reads no table (:data:`NO_TABLE_READ`).

    Read from the text: MariaDB leaves quotes unescaped in the conditions it prints,
    so the plan is not always valid JSON. A table's name, access type, key and rows come
    first in its object, before any table nested in it.
    """
    lines = [line for message, line in NO_TABLE_READ.items() if f'"{message}"' in plan]
    tables = _TABLE_NAME.split(plan)[1:]
    for name, body in zip(tables[::2], tables[1::2], strict=True):
        access, key, rows = _ACCESS.search(body), _KEY.search(body), _ROWS.search(body)
        if access is None:
            continue
        using = f" USING INDEX {key[1]}" if key else ""
        lines.append(f"TABLE {name} ACCESS {access[1]}{using} ROWS {rows[1] if rows else 0}")
    return lines


async def _mysql_reads(backend: Any, statement: Statement) -> int:
    """MySQL: the rows the storage engine read running ``statement`` (rolled back)."""
    async with backend.connection() as conn, conn.cursor() as cursor:
        await cursor.execute("FLUSH STATUS")
        await cursor.execute(statement.sql, statement.args or None)
        await cursor.fetchall()
        await cursor.execute("SHOW SESSION STATUS LIKE 'Handler_read%%'")
        counters = dict(await cursor.fetchall())
        await conn.rollback()
    return sum(int(value) for value in counters.values())


async def _explain(backend: Any, statement: Statement, postgres: bool) -> list[str]:
    async with backend.connection() as conn:
        if postgres:
            rows = await conn.fetch(f"EXPLAIN {statement.sql}", *statement.args)
            return [row[0] for row in rows]
        rows = await conn.execute_fetchall(f"EXPLAIN QUERY PLAN {statement.sql}", statement.args)
    return _sqlite_tree(list(rows))


async def _explain_generic(backend: Any, statement: Statement) -> list[str]:
    """PostgreSQL's generic plan: the one a prepared statement may keep after five runs."""
    nulls = ", ".join(["NULL"] * len(statement.args))
    async with backend.connection() as conn:
        await conn.execute(f"PREPARE casty_sa_plan AS {statement.sql}")
        try:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            execute = f"EXECUTE casty_sa_plan({nulls})" if nulls else "EXECUTE casty_sa_plan"
            rows = await conn.fetch(f"EXPLAIN {execute}")
        finally:
            await conn.execute("RESET plan_cache_mode; DEALLOCATE casty_sa_plan")
    return [row[0] for row in rows]


async def _steps(backend: Any, statement: Statement) -> int:
    """SQLite: the instructions ``statement`` runs (counted by hundreds), rolled back."""
    counted = [0]

    def count() -> int:
        counted[0] += 100
        return 0  # go on

    async with backend.connection() as conn:
        await conn.execute("BEGIN")
        await conn.set_progress_handler(count, 100)
        try:
            await conn.execute_fetchall(statement.sql, statement.args)
        finally:
            await conn.set_progress_handler(None, 100)
            await conn.execute("ROLLBACK")
    return counted[0]


def _sqlite_tree(rows: list[Any]) -> list[str]:
    """``EXPLAIN QUERY PLAN`` rows (id, parent, -, detail) as an indented tree."""
    depth = {0: -1}
    lines = []
    for node, parent, _, detail in rows:
        depth[node] = depth.get(parent, -1) + 1
        lines.append("  " * depth[node] + detail)
    return lines


# -- a table to look at -----------------------------------------------------------------------


async def fill(url: str | URL, events: int = 200_000, *, per_entity: int = 100) -> None:
    """Add ``events`` events over ``events // per_entity`` entities, then ``ANALYZE``.

    One in ten is stored as before migration ``0002`` (transaction id 0, negative
    positions in key order, no type); the rest interleave the entities in groups
    of 250 per transaction id, typed with :data:`TYPES`. Then 50 events through a
    journal (real places), and statistics.
    """
    url = to_async_url(str(url) if isinstance(url, URL) else url)
    await upgrade(url)
    entities = max(1, events // per_entity)
    old_each = per_entity // 10
    engine, _ = open_engine(url)
    postgres = engine.dialect.name == "postgresql"
    mysql = engine.dialect.name in ("mysql", "mariadb")
    try:
        async with engine.begin() as conn:
            statements = (_fill_mysql if mysql else _fill_sql)(postgres, events, entities, old_each)
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()
    journal = SAJournal(url)
    try:
        for n in range(50):
            entity = f"acct-{n % 10:05d}"
            await journal.persist(
                entity, [PersistedEvent(1000 + n // 10, f"{entity}:{n}", float(n))]
            )
    finally:
        await journal.close()
    engine, _ = open_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"ANALYZE {'TABLE ' if mysql else ''}{EVENTS}"))
    finally:
        await engine.dispose()


def _fill_sql(postgres: bool, events: int, entities: int, old_each: int) -> list[str]:
    """Two ``INSERT``: the rows stored before ``0002``, then the rows written since."""
    old, new = entities * old_each, events - entities * old_each
    columns = (
        "entity_id, sequence_nr, timestamp, payload, event_type, era, transaction_id, position"
    )
    entity = "'acct-' || substr('0000' || ({e}), -5, 5)"
    payload = "CAST(randomblob(80) AS BLOB)"
    if postgres:
        entity = "'acct-' || lpad(({e})::text, 5, '0')"
        payload = "decode(md5(k::text) || md5((k + 1)::text) || md5((k + 2)::text), 'hex')"
    kinds = " ".join(f"WHEN {i} THEN '{name}'" for i, name in enumerate(TYPES[:-1]))
    kind = f"CASE WHEN k % 200 = 7 THEN '{TYPES[-1]}' ELSE CASE k % 3 {kinds} END END"
    ks = (
        "generate_series(0, {n} - 1) AS k"
        if postgres
        else "(WITH RECURSIVE s(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM s WHERE k + 1 < {n})"
        " SELECT k FROM s)"
    )
    # rows written since 0002 on PostgreSQL: transaction ids spread below the filling
    # one's (every one of them has ended), positions from the identity; SQLite: 0, 1 + k
    transaction = "0"
    if postgres:
        transaction = f"3 + k * greatest(0, {_XID} - 10) / {new}"
    before = (
        f"INSERT INTO {EVENTS} ({columns}) SELECT "
        f"{entity.format(e=f'k / {old_each}')}, 1 + k % {old_each}, 1.5 * k, {payload}, NULL, "
        f"0, 0, k - {old} FROM {ks.format(n=old)} ORDER BY k"
    )
    since_columns = columns if not postgres else columns.removesuffix(", position")
    since = (
        f"INSERT INTO {EVENTS} ({since_columns}) SELECT "
        f"{entity.format(e=f'k % {entities}')}, {old_each + 1} + k / {entities}, 1.5 * k, "
        f"{payload}, {kind}, 0, {transaction}"
        + ("" if postgres else ", 1 + k")
        + f" FROM {ks.format(n=new)} ORDER BY k"
    )
    return [before, since]


def _fill_mysql(_postgres: bool, events: int, entities: int, old_each: int) -> list[str]:
    """:func:`_fill_sql` on MySQL/MariaDB (numbers from a cross join of digits, no sequence
    engine needed), then the counter moved past the positions taken."""
    old, new = entities * old_each, events - entities * old_each
    columns = (
        "entity_id, sequence_nr, timestamp, payload, event_type, era, transaction_id, `position`"
    )
    digits = "(SELECT 0 AS d UNION ALL " + " UNION ALL ".join(f"SELECT {d}" for d in range(1, 10))

    def ks(n: int) -> str:  # 0 … n - 1, in no particular order (InnoDB sorts by the key)
        places = range(len(str(max(1, n - 1))))
        joined = ", ".join(f"{digits}) AS d{i}" for i in places)
        number = " + ".join(f"d{i}.d * {10**i}" for i in places)
        return f"(SELECT {number} AS k FROM {joined}) AS ks WHERE k < {n}"

    entity = "CONCAT('acct-', LPAD({e}, 5, '0'))"
    payload = "UNHEX(CONCAT(MD5(k), MD5(k + 1), MD5(k + 2)))"
    kinds = " ".join(f"WHEN {i} THEN '{name}'" for i, name in enumerate(TYPES[:-1]))
    kind = f"CASE WHEN MOD(k, 200) = 7 THEN '{TYPES[-1]}' ELSE CASE MOD(k, 3) {kinds} END END"
    before = (
        f"INSERT INTO {EVENTS} ({columns}) SELECT "
        f"{entity.format(e=f'k DIV {old_each}')}, 1 + MOD(k, {old_each}), 1.5 * k, {payload}, "
        f"NULL, 0, 0, k - {old} FROM {ks(old)}"
    )
    since = (
        f"INSERT INTO {EVENTS} ({columns}) SELECT "
        f"{entity.format(e=f'MOD(k, {entities})')}, {old_each + 1} + k DIV {entities}, 1.5 * k, "
        f"{payload}, {kind}, 0, 0, 1 + k FROM {ks(new)}"
    )
    counter = (
        "UPDATE casty_sa_event_counter SET `position` = GREATEST(`position`, "
        f"(SELECT COALESCE(MAX(`position`), 0) FROM {EVENTS})) WHERE id = 1"
    )
    return [before, since, counter]


def _print(plans: list[Plan]) -> None:
    for plan in plans:
        unit = "rows read" if any(line.startswith("{") for line in plan.lines) else "SQLite steps"
        steps = "" if plan.steps is None else f" ({plan.steps:,} {unit})"
        print(f"-- {plan.title}{steps}")
        for line in plan.lines:
            print(line)
        print()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="a database URL, or the path of a SQLite file")
    parser.add_argument("--fill", type=int, metavar="N", help="add N events first (scratch!)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url: str | URL = args.url
    if "://" not in args.url:
        url = make_url(f"sqlite+aiosqlite:///{Path(args.url).resolve()}")
    if args.fill:
        asyncio.run(fill(url, args.fill))
    plans = asyncio.run(read_plans(url))
    _print(plans)
    bad = [plan.title for plan in plans if full_scans(plan)]
    for title in bad:
        print(f"FULL SCAN: {title}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
