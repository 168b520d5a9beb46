"""``casty-sa upgrade``, ``downgrade``, ``current``, ``check``, ``history`` and ``heads``.

The work is :mod:`casty_sa.migrate`'s and :mod:`casty_sa.revisions`'s; this
module parses the arguments and prints what they return.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from casty_sa import migrate, migration_runs
from casty_sa.cli.common import Commands, ExitCode, UsageError, optional_url, url, where
from casty_sa.errors import DatabaseUnavailable
from casty_sa.health import health_of
from casty_sa.revisions import (
    SchemaState,
    check_revision,
    describe_revision,
    history,
    schema_state,
    script_directory,
)
from casty_sa.transfer import require_existing_database

__all__ = ["CHECK_WITHIN", "register"]

#: Seconds ``casty-sa check`` waits for the database's answer (a connection's own timeouts
#: end an unreachable one sooner).
CHECK_WITHIN = 60.0


def register(commands: Commands) -> None:
    """Add the migration commands to ``casty-sa``."""
    database = commands.database
    upgrade = commands.add("upgrade", "migrate the database up to REV (default: head)", database)
    upgrade.add_argument("revision", nargs="?", default="head", metavar="REV")
    upgrade.add_argument(
        "--sql",
        action="store_true",
        help="print the DDL for the URL's dialect instead of running it (no connection; "
        "--url postgresql://, mysql://, mariadb:// or sqlite:// is enough); REV may be a "
        "FROM:TO range",
    )
    upgrade.set_defaults(handler=_cmd_upgrade)

    downgrade = commands.add(
        "downgrade",
        "migrate the database down to REV (default: base, which drops casty-sa's tables "
        "and nothing else)",
        database,
    )
    downgrade.add_argument("revision", nargs="?", default="base", metavar="REV")
    downgrade.add_argument(
        "--sql",
        action="store_true",
        help="print the DDL instead of running it; REV is a FROM:TO range (default head:base)",
    )
    downgrade.add_argument(
        "--yes",
        action="store_true",
        help="confirm dropping tables that hold events or projection offsets",
    )
    downgrade.set_defaults(handler=_cmd_downgrade)

    for name, help, handler in (
        ("current", "print the database's casty-sa revision", _cmd_current),
        ("check", "exit 0 when the database is at head, 1 when not", _cmd_check),
        ("history", "list casty-sa's migrations (with --url: mark the current one)", _cmd_history),
    ):
        commands.add(name, help, database).set_defaults(handler=handler)
    commands.add("heads", "print the newest revision this casty-sa knows").set_defaults(
        handler=_cmd_heads
    )


def _revision(revision: str, *, down: bool = False) -> str:
    """``revision``, refused before anything is touched when casty-sa does not have it."""
    if "://" in revision:
        raise UsageError("the revision looks like a database URL; pass the URL with --url")
    try:
        check_revision(revision, down=down)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return revision


def _write_sql(args: argparse.Namespace, database: str, revision: str) -> int:
    """Print the DDL of a migration for the URL's dialect; connects to nothing."""
    try:
        migrate.write_sql(
            database, revision, sys.stdout, down=args.command == "downgrade", schema=args.schema
        )
    except migrate.SchemaNotSupported as exc:
        raise UsageError(str(exc)) from None
    return ExitCode.OK


def _cmd_upgrade(args: argparse.Namespace) -> int:
    """``casty-sa upgrade [REV] [--sql]``."""
    revision = _revision(args.revision)
    database = url(args)
    if args.sql:
        return _write_sql(args, database, revision)
    return _migrate(args, database, revision)


def _cmd_downgrade(args: argparse.Namespace) -> int:
    """``casty-sa downgrade [REV] [--sql] [--yes]``."""
    revision = args.revision
    if args.sql and ":" not in revision:
        revision = f"head:{revision}"
    _revision(revision, down=True)
    database = url(args)
    if args.sql:
        return _write_sql(args, database, revision)
    require_existing_database(database)
    return _migrate(args, database, revision)


def _migrate(args: argparse.Namespace, database: str, revision: str) -> int:
    """Run ``upgrade`` or ``downgrade`` online and say where the database went."""
    down = args.command == "downgrade"
    try:
        before, after = asyncio.run(
            migration_runs.migrate_between(
                database,
                revision,
                down=down,
                schema=args.schema,
                keep_data=down and not args.yes,
                connect_timeout=args.connect_timeout,
            )
        )
    except migration_runs.DataWouldBeDropped as exc:
        raise UsageError(_refusal(where(database), exc)) from None
    done = "downgraded" if down else "upgraded"
    verb = "already at" if before == after else f"{done} from {describe_revision(before)} to"
    print(f"{where(database)}: {verb} {describe_revision(after)}")
    return ExitCode.OK


def _refusal(database: str, dropped: migration_runs.DataWouldBeDropped) -> str:
    """Why ``downgrade`` refused, what it would drop, and what to do first."""
    held, then = [], []
    if dropped.events:
        held.append(f"{dropped.events:,} events")
        then.append("Export them first (casty-sa export)")
    if dropped.projections:
        held.append(f"the offsets of {dropped.projections:,} projections")
        then.append(
            "Without their offsets the projections rebuild their read models from the first "
            "event (casty-sa projections lists them)"
        )
    drops = (
        "downgrading to base drops casty-sa's tables and every event in them"
        if dropped.events
        else "downgrading below 0003 drops casty_sa_projection_offsets"
    )
    return (
        f"{database} holds {' and '.join(held)}; {drops}. "
        f"{'. '.join(then)}, then pass --yes to proceed"
    )


def _read_state(args: argparse.Namespace, database: str) -> SchemaState:
    """Where an existing database stands (a missing SQLite file is not created)."""
    require_existing_database(database)
    return asyncio.run(schema_state(database, args.schema, connect_timeout=args.connect_timeout))


def _cmd_current(args: argparse.Namespace) -> int:
    """``casty-sa current``: print the database's revision."""
    state = _read_state(args, url(args))
    if state.app_managed:
        print("none (casty-sa's tables were made by the application's own migrations)")
    else:
        print(describe_revision(state.revision))
    return ExitCode.OK


def _cmd_check(args: argparse.Namespace) -> int:
    """``casty-sa check``: exit 0 at head, 1 otherwise, saying what to run; the check is
    ``journal.health()``'s (a database error exits as any command's, 2)."""
    database = url(args)
    require_existing_database(database)
    options = {"schema": args.schema, "connect_timeout": args.connect_timeout}
    health = asyncio.run(health_of(database, within=CHECK_WITHIN, **options))
    if health.error is not None:
        raise health.error
    if not health.reachable:  # no answer in time
        raise DatabaseUnavailable(health.message)
    print(health.message)
    return ExitCode.OK if health.ok else ExitCode.NOT_AT_HEAD


def _cmd_history(args: argparse.Namespace) -> int:
    """``casty-sa history``: the migrations, newest first, marking the current."""
    database = optional_url(args)
    current = None if database is None else _read_state(args, database).revision
    for down, revision, head, title in history():
        marks = (" (head)" if head else "") + (" (current)" if revision == current else "")
        print(f"{down or '<base>'} -> {revision}{marks}, {title}")
    return ExitCode.OK


def _cmd_heads(args: argparse.Namespace) -> int:
    """``casty-sa heads``: the newest revision this casty-sa knows."""
    for head in script_directory().get_heads():
        print(f"{head} (head)")
    return ExitCode.OK
