"""The journal through aiomysql, MySQL's second driver, on the suite's MariaDB.

A representative part of the protocol, semantics, read-side and MySQL suites (persist
and load, snapshots, conflicts, concurrent and cancelled writers, the read side, exact
ids, large payloads) runs here again with ``mysql+aiomysql://`` and
``mariadb+aiomysql://`` URLs: the tests are the other modules' own, each taken as it
is; only the database they get differs (the ``[mariadb]`` setup, its URL given the
aiomysql driver). The full suites run on asyncmy alone, which keeps the suite's time.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import test_journal_protocol as protocol
import test_journal_semantics as semantics
import test_mysql as mysql_suite
import test_read_side as read_side
from sqlalchemy import URL


@pytest.fixture(autouse=True, params=["mysql+aiomysql", "mariadb+aiomysql"])
def aiomysql_url(request: pytest.FixtureRequest) -> str:
    """The driver name every database of the test is reached with."""
    name: str = request.param
    return name


@pytest.fixture
def new_mysql_db(
    new_mysql_db: Callable[..., Awaitable[URL]], aiomysql_url: str
) -> Iterator[Callable[..., Awaitable[URL]]]:
    """The suite's factory of MariaDB databases, its URLs on aiomysql (``new_server_db``
    and ``db_url`` take theirs from it on the ``[mariadb]`` setup)."""

    async def create(*, migrated: bool = True) -> URL:
        return (await new_mysql_db(migrated=migrated)).set(drivername=aiomysql_url)

    yield create


def on_mariadb(test: Callable[..., Any]) -> Callable[..., Any]:
    """``test`` (a function or a method of a test class) as a test of this module on the
    ``[mariadb]`` setup, its own marks (``parametrize``) kept; the original is untouched."""
    parameters = list(inspect.signature(test).parameters.values())
    bound = parameters[:1] and parameters[0].name == "self"

    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> Any:
        return await (test(None, *args, **kwargs) if bound else test(*args, **kwargs))

    run.__signature__ = inspect.Signature(parameters[1:] if bound else parameters)  # type: ignore[attr-defined]
    marked: Callable[..., Any] = pytest.mark.only_backends("mysql")(run)
    return marked


test_persist_then_load = on_mariadb(protocol.test_persist_then_load_returns_events_in_order)
test_load_from_is_inclusive = on_mariadb(protocol.test_load_from_sequence_nr_is_inclusive)
test_persist_appends = on_mariadb(protocol.test_persist_appends_across_calls)
test_entities_are_isolated = on_mariadb(protocol.test_entities_are_isolated)
test_timestamps_round_trip = on_mariadb(protocol.test_timestamps_round_trip_bit_for_bit)
test_timestamps_refused = on_mariadb(protocol.test_timestamps_mysql_cannot_hold_are_refused)
test_snapshot_round_trip = on_mariadb(protocol.test_snapshot_round_trip_and_replace)
test_older_snapshot = on_mariadb(protocol.test_older_snapshot_never_replaces_newer)
test_entity_ids_are_opaque = on_mariadb(protocol.test_entity_ids_are_opaque)
test_large_payloads = on_mariadb(protocol.test_large_payloads_round_trip)
test_like_casty_in_memory = on_mariadb(protocol.test_same_answers_as_casty_in_memory_journal)

test_conflict_stores_nothing = on_mariadb(
    semantics.TestAtomicPersist.test_conflict_stores_nothing_of_the_call
)
test_conflict_in_the_middle = on_mariadb(
    semantics.TestAtomicPersist.test_conflict_in_the_middle_names_the_stored_number
)
test_two_journals_conflict = on_mariadb(
    semantics.TestSharedDatabase.test_two_journals_see_each_other_and_conflict
)
test_racing_writers = on_mariadb(
    semantics.TestSharedDatabase.test_racing_writers_of_one_sequence_number_one_wins
)
test_many_concurrent_writers = on_mariadb(semantics.TestConcurrency.test_many_concurrent_writers)
test_cancelled_persist = on_mariadb(
    semantics.TestCancellation.test_cancelled_persist_is_all_or_nothing
)

test_every_event_once = on_mariadb(read_side.test_every_event_once_in_order_and_resumable)
test_live_reader = on_mariadb(read_side.test_live_reader_gets_new_events_and_resumes)
test_entity_ids = on_mariadb(read_side.test_entity_ids_and_highest_sequence_nr)
test_late_commit = on_mariadb(
    read_side.test_a_late_commit_is_never_passed_and_a_rollback_never_seen
)

test_three_entities = on_mariadb(
    mysql_suite.test_ids_differing_in_case_or_trailing_spaces_are_three_entities
)
test_past_64_kb = on_mariadb(mysql_suite.test_a_payload_past_64_kb_round_trips_bit_for_bit)
test_nothing_sent_is_refused = on_mariadb(
    mysql_suite.test_a_value_the_driver_cannot_escape_is_refused_before_anything_is_sent
)
