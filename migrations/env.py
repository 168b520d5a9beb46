"""Alembic environment of casty-sa's own migrations (async, own version table).

The database comes from, in order: a connection handed over by
``casty_sa.upgrade`` (``config.attributes["connection"]``), a URL attribute
(the ``casty-sa`` command), ``-x url=…`` on the alembic command line, the
``CASTY_SA_URL`` environment variable, or ``sqlalchemy.url`` in alembic.ini.
Plain ``sqlite://`` and ``postgresql://`` URLs get their async driver.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import URL, Connection, PrimaryKeyConstraint, Table, text

from casty_sa.engine import bind_schema, open_engine
from casty_sa.migrate import unsupported_schema
from casty_sa.models import VERSION_TABLE, metadata
from casty_sa.urls import to_async_url

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str | URL:
    url = (
        config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("CASTY_SA_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise SystemExit(
            "no database URL: pass -x url=postgresql://user@host/db (or sqlite:///file.db), "
            "or set CASTY_SA_URL"
        )
    return url


def _schema() -> str | None:
    schema = (
        config.attributes.get("schema")
        or context.get_x_argument(as_dictionary=True).get("schema")
        or os.environ.get("CASTY_SA_SCHEMA")
    )
    return str(schema) if schema else None


def _include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """Only casty-sa's own tables: an application's tables are none of our business."""
    if type_ == "table":
        return name in metadata.tables
    return True


def _name_version_key() -> None:
    """Name the version table's primary key by casty-sa's convention, ``pk_<table>``.

    Alembic names it ``<table>_pkc`` and offers no option for the name, only
    ``version_table_pk`` to have none; so the table is configured without one
    and given ours, for new databases. Existing databases keep their
    ``casty_sa_alembic_version_pkc``: nothing refers to the name, so renaming
    it would be a migration for nothing.
    """
    version: Table = context.get_context()._version
    version.append_constraint(PrimaryKeyConstraint("version_num", name=f"pk_{VERSION_TABLE}"))


def _drop_version_table_at_base(connection: Connection) -> None:
    """Leave no version table behind once casty-sa's last table is gone (online)."""
    if context.get_context().get_current_heads():
        return
    version: Table = context.get_context()._version
    version.drop(connection, checkfirst=True)


def _refuse_unsupported_schema(dialect: str, schema: str | None) -> None:
    reason = unsupported_schema(dialect, schema)
    if reason is not None:
        raise SystemExit(reason)


def _configure(connection: Connection) -> None:
    schema = _schema()
    _refuse_unsupported_schema(connection.dialect.name, schema)
    if schema is not None:
        # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema is
        # there: look first, so a DBA can hand a migrator a schema made for it
        exists = connection.exec_driver_sql(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1", (schema,)
        ).first()
        if exists is None:
            connection.exec_driver_sql(f"CREATE SCHEMA {_quote(connection, schema)}")
        connection = bind_schema(connection, schema)
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        version_table_pk=False,
        include_object=_include_object,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    _name_version_key()
    with context.begin_transaction():
        context.run_migrations()
        _drop_version_table_at_base(connection)


def _quote(connection: Connection, name: str) -> str:
    return connection.dialect.identifier_preparer.quote_identifier(name)


def run_offline() -> None:
    url = to_async_url(_url())
    schema = _schema()
    _refuse_unsupported_schema(url.get_backend_name(), schema)
    context.configure(
        url=url,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        version_table_pk=False,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    _name_version_key()
    with context.begin_transaction():
        if schema is not None:
            # what the online run does with schema_translate_map, in the script's own words:
            # the schema (made when the script starts from nothing), and the unqualified
            # tables of the migrations inside it
            quoted = context.get_context().dialect.identifier_preparer.quote(schema)
            if context.get_starting_revision_argument() is None:
                context.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
            context.execute(f"SET LOCAL search_path TO {quoted}")
        context.run_migrations()
        if context.get_revision_argument() is None:  # down to base: no version table left
            context.execute(text(f"DROP TABLE {_qualified(schema)}"))


def _qualified(schema: str | None) -> str:
    """The version table's name for offline DDL, with its schema when it has one."""
    preparer = context.get_context().dialect.identifier_preparer
    name = preparer.quote(VERSION_TABLE)
    return name if schema is None else f"{preparer.quote(schema)}.{name}"


async def _run_online_async() -> None:
    engine, _owned = open_engine(_url())
    try:
        async with engine.connect() as connection:
            # begun here, not by a context manager: a migration may commit on the way
            # (0002 on PostgreSQL does, to keep its locks short), then what follows is
            # committed at the end
            await connection.begin()
            await connection.run_sync(_configure)
            await connection.commit()
    finally:
        await engine.dispose()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
    else:
        asyncio.run(_run_online_async())


if context.is_offline_mode():
    run_offline()
else:
    run_online()
