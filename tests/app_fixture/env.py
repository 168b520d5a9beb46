"""Alembic env of a stand-in application with its own models and history.

It is run only through ``alembic.command`` with a sync connection handed over
in ``config.attributes``, the way apps run migrations from code.
"""

from __future__ import annotations

from typing import Any

from alembic import context

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=config.attributes["target_metadata"],
    include_object=config.attributes.get("include_object"),
    compare_type=True,
)


def _run() -> Any:
    with context.begin_transaction():
        context.run_migrations()


_run()
