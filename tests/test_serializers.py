"""The safe JSON serializer: exact round trips, an explicit registry, and no code execution.

The security test writes a crafted pickle straight into the events table, as anyone with
write access to the database could, and shows that the default pickle journal runs it
while a journal using :class:`~casty_sa.serializers.JsonSerializer` refuses it.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import itertools
import pathlib
import pickle
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL, text

from casty_sa import JournalError, PayloadDecodeError, PayloadEncodeError, SAJournal
from casty_sa.serializers import JsonSerializer, SerializationError, UnknownTypeError


class Currency(enum.Enum):
    EUR = "EUR"
    BRL = "BRL"


@dataclass(frozen=True)
class Money:
    cents: int
    currency: Currency = Currency.EUR


@dataclass(frozen=True)
class Deposited:
    amount: Money
    note: str = ""


@dataclass(frozen=True)
class Withdrawn:
    amount: Money
    tags: tuple[str, ...] = ()


@dataclass
class Account:
    owner: str
    balance: Money
    history: list[Deposited | Withdrawn] = field(default_factory=list)
    limits: dict[Currency, int] = field(default_factory=dict)
    audited: int = field(default=0, init=False)


@dataclass(frozen=True)
class Unregistered:
    x: int


class Stray(enum.Enum):
    A = 1


@pytest.fixture
def serializer() -> JsonSerializer:
    return JsonSerializer(types=[Deposited, Withdrawn, Account, Money, Currency])


def round_trip(s: JsonSerializer, value: Any) -> Any:
    data = s.serialize(value)
    assert isinstance(data, bytes)
    return s.deserialize(data)


# -- round trips -------------------------------------------------------------------------------

VALUES: dict[str, Any] = {
    "none": None,
    "bools": [True, False],
    "ints": [0, -1, 2**63, -(2**200), 10**40],
    "floats": [0.1 + 0.2, -0.0, 1e-300, 1.7976931348623157e308],
    "infinities": [float("inf"), float("-inf")],
    "str": "plain ascii",
    "unicode": "üñí名前🙂\u202e",
    "lone-surrogates": "a\ud800b\udfff",
    "nul": "a\x00b",
    "bytes": bytes(range(256)),
    "empty-containers": ([], (), {}, set(), frozenset(), b"", ""),
    "tuple-vs-list": ([1, 2], (1, 2), [(1,), [2]]),
    "nested-tuples": ((1, (2, (3, ()))),),
    "int-keys": {1: "one", -2: "minus two"},
    "mixed-keys": {(1, 2): "tuple", None: "none", True: "true", 1.5: "float", b"k": "bytes"},
    "dollar-keys": {"$type": "Deposited", "$fields": {}, "$$x": 1, "$": 2, "plain": 3},
    "sets": ({1, 2, 3}, frozenset({"a", "b"}), {(1, 2), (3, 4)}),
    "datetimes": (
        datetime.datetime(2026, 11, 27, 14, 30, 1, 123456),
        datetime.datetime(2026, 11, 27, 14, 30, tzinfo=datetime.UTC),
        datetime.date(1999, 12, 31),
        datetime.time(23, 59, 59, 999999),
        datetime.timedelta(days=-3, seconds=5, microseconds=7),
    ),
    "decimal": [decimal.Decimal("1.10"), decimal.Decimal("-0.000"), decimal.Decimal("NaN")],
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
}


def canonical(value: Any) -> str:
    """``value`` rendered with every type named (tuple from list, -0.0 from 0.0, 1 from True)
    and sets sorted, so the rendering does not depend on hash order (``PYTHONHASHSEED``)."""
    kind = type(value).__name__
    if isinstance(value, set | frozenset):
        return f"{kind}{{{', '.join(sorted(canonical(item) for item in value))}}}"
    if isinstance(value, list | tuple):
        return f"{kind}[{', '.join(canonical(item) for item in value)}]"
    if isinstance(value, dict):
        pairs = (f"{canonical(k)}: {canonical(v)}" for k, v in value.items())
        return f"{kind}{{{', '.join(pairs)}}}"
    return f"{kind}:{value!r}"


@pytest.mark.parametrize("value", list(VALUES.values()), ids=list(VALUES))
def test_supported_values_round_trip_exactly(serializer: JsonSerializer, value: Any) -> None:
    back = round_trip(serializer, value)
    assert canonical(back) == canonical(value)
    if "NaN" not in repr(value):  # NaN never compares equal
        assert back == value


def test_nan_round_trips(serializer: JsonSerializer) -> None:
    back = round_trip(serializer, [float("nan")])
    assert len(back) == 1 and back[0] != back[0]


def test_registered_dataclasses_and_enums_round_trip(serializer: JsonSerializer) -> None:
    account = Account(
        "ana",
        Money(1050, Currency.BRL),
        [Deposited(Money(1000), "salary"), Withdrawn(Money(50, Currency.BRL), ("atm",))],
        {Currency.EUR: 100, Currency.BRL: 0},
    )
    account.audited = 3  # not an init field: not stored, back to its default
    back = round_trip(serializer, account)
    assert type(back) is Account
    assert back.audited == 0
    back.audited = 3
    assert back == account
    withdrawn = back.history[1]
    assert isinstance(withdrawn, Withdrawn) and type(withdrawn.tags) is tuple
    assert back.limits[Currency.BRL] == 0


def test_output_is_plain_ascii_json_with_readable_type_names(serializer: JsonSerializer) -> None:
    data = serializer.serialize(Deposited(Money(5), "café"))
    assert data.isascii()
    assert b'"$type":"Deposited"' in data and b'"$type":"Money"' in data


# -- the registry ------------------------------------------------------------------------------


def test_unregistered_class_is_refused_when_encoding(serializer: JsonSerializer) -> None:
    for value in (Unregistered(1), [1, {"k": Unregistered(2)}], Stray.A):
        with pytest.raises(UnknownTypeError, match="not registered") as info:
            serializer.serialize(value)
        assert isinstance(info.value, JournalError)


@pytest.mark.parametrize(
    "value",
    [object(), lambda: 1, pathlib.Path("x"), 1 + 2j, bytearray(b"x"), range(3)],
    ids=["object", "lambda", "path", "complex", "bytearray", "range"],
)
def test_unsupported_values_are_refused(serializer: JsonSerializer, value: Any) -> None:
    with pytest.raises(SerializationError, match="cannot store"):
        serializer.serialize({"nested": [value]})


def test_subclasses_of_supported_types_are_refused_not_changed(
    serializer: JsonSerializer,
) -> None:
    class Name(str):
        pass

    with pytest.raises(SerializationError):
        serializer.serialize(Name("x"))


def test_unknown_type_name_is_an_error_never_an_import(
    serializer: JsonSerializer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    module = f"casty_sa_evil_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass Thing:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # importable, if anything tried
    for name in (f"{module}.Thing", module, "os.system", "builtins.eval", "Unregistered"):
        crafted = b'{"v":1,"value":{"$type":"' + name.encode() + b'","$fields":{"command":"id"}}}'
        with pytest.raises(UnknownTypeError, match="not registered") as info:
            serializer.deserialize(crafted)
        assert info.value.type_name == name
        assert "Account" in str(info.value)  # says what is registered
    assert not marker.exists()
    assert module not in sys.modules


def test_renamed_class_loads_when_registered_under_its_old_name() -> None:
    old = JsonSerializer(types=[Deposited, Money, Currency])
    data = old.serialize(Deposited(Money(7), "x"))

    @dataclass(frozen=True)
    class Deposit:  # the new name of Deposited
        amount: Money
        note: str = ""

    with pytest.raises(UnknownTypeError, match="'Deposited'"):
        JsonSerializer(types=[Deposit, Money, Currency]).deserialize(data)
    new = JsonSerializer(types={"Deposited": Deposit, "Money": Money, "Currency": Currency})
    assert new.deserialize(data) == Deposit(Money(7), "x")


def test_added_field_with_default_loads_old_rows_removed_field_is_an_error() -> None:
    @dataclass(frozen=True)
    class Event:
        a: int

    data = JsonSerializer(types={"Event": Event}).serialize(Event(1))

    @dataclass(frozen=True)
    class Grown:
        a: int
        b: str = "default"

    assert JsonSerializer(types={"Event": Grown}).deserialize(data) == Grown(1, "default")

    @dataclass(frozen=True)
    class Shrunk:
        b: str = ""

    with pytest.raises(SerializationError, match="field"):
        JsonSerializer(types={"Event": Shrunk}).deserialize(data)


def test_registry_is_validated() -> None:
    with pytest.raises(TypeError, match="dataclasses and Enum"):
        JsonSerializer(types=[dict])
    with pytest.raises(TypeError, match="dataclasses and Enum"):
        JsonSerializer(types=[Money(1)])  # type: ignore[list-item]  # an instance
    other: Any = dataclass(type("Deposited", (), {"__annotations__": {"x": int}}))
    assert other.__qualname__ == Deposited.__qualname__
    with pytest.raises(ValueError, match="two types"):
        JsonSerializer(types=[Deposited, other])
    both = JsonSerializer(types={"Deposited": Deposited, "OtherDeposited": other})
    assert both.names == ("Deposited", "OtherDeposited")
    assert type(both.deserialize(both.serialize(other(1)))) is other
    with pytest.raises(ValueError, match="twice"):
        JsonSerializer(types={"A": Deposited, "B": Deposited})


# -- malformed and hostile bytes ---------------------------------------------------------------

MALFORMED = {
    "pickle": pickle.dumps({"a": 1}),
    "not-json": b"\x00\x01garbage",
    "json-but-not-ours": b'{"a": 1}',
    "wrong-version": b'{"v": 2, "value": 1}',
    "extra-top-level": b'{"v": 1, "value": 1, "x": 2}',
    "unknown-tag": b'{"v":1,"value":{"$eval":"1+1"}}',
    "two-tags": b'{"v":1,"value":{"$tuple":[],"$set":[]}}',
    "bad-base64": b'{"v":1,"value":{"$bytes":"***"}}',
    "bad-date": b'{"v":1,"value":{"$date":"yesterday"}}',
    "bad-enum": b'{"v":1,"value":{"$type":"Currency","$value":"XXX"}}',
    "type-not-str": b'{"v":1,"value":{"$type":1,"$fields":{}}}',
    "fields-not-object": b'{"v":1,"value":{"$type":"Money","$fields":[1]}}',
    "missing-field": b'{"v":1,"value":{"$type":"Money","$fields":{}}}',
    "unhashable-set": b'{"v":1,"value":{"$set":[[1]]}}',
    "deep": b'{"v":1,"value":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge-int": b'{"v":1,"value":' + b"9" * 10_000 + b"}",
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_payloads_are_a_clear_error(serializer: JsonSerializer, data: bytes) -> None:
    with pytest.raises(SerializationError):
        serializer.deserialize(data)


def test_too_deep_values_are_refused_when_encoding(serializer: JsonSerializer) -> None:
    value: list[Any] = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(SerializationError, match="deeply"):
        serializer.serialize(value)


# -- inside a journal (both backends) ----------------------------------------------------------


async def test_journal_with_the_safe_serializer(
    db_url: URL, make_journal: Callable[..., SAJournal], serializer: JsonSerializer
) -> None:
    journal = make_journal(
        db_url, serialize=serializer.serialize, deserialize=serializer.deserialize
    )
    events = [
        PersistedEvent(1, Deposited(Money(100), "first"), 1.5),
        PersistedEvent(2, Withdrawn(Money(30), ("atm", "night")), 2.5),
    ]
    await journal.persist("acct", events)
    state = Account("ana", Money(70), [e.event for e in events])
    await journal.save_snapshot("acct", Snapshot(2, state, 3.0))
    assert await journal.load("acct") == events
    assert await journal.load_snapshot("acct") == Snapshot(2, state, 3.0)

    with pytest.raises(PayloadEncodeError) as info:
        await journal.persist("acct", [PersistedEvent(3, Unregistered(1), 4.0)])
    assert isinstance(info.value.__cause__, UnknownTypeError)
    with pytest.raises(PayloadEncodeError):
        await journal.save_snapshot("acct", Snapshot(3, object(), 4.0))
    assert len(await journal.load("acct")) == 2


class _Exploit:
    """Pickles to a call of ``Path.touch``: unpickling it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


_PLANTED = itertools.count()


async def _plant(journal: SAJournal, table: str, entity_id: str, payload: bytes) -> None:
    """Write a row past the journal, as anyone with INSERT on the table could."""
    columns = "(entity_id, sequence_nr, timestamp, payload) VALUES (:e, 1, 1.0, :p)"
    if table == "casty_sa_events":  # a place in the global order of its own
        place = -1_000_000 - next(_PLANTED)
        columns = columns.replace(") VALUES", ", position) VALUES").replace(":p)", f":p, {place})")
    async with journal.engine.begin() as conn:
        await conn.execute(text(f"INSERT INTO {table} {columns}"), {"e": entity_id, "p": payload})


async def test_crafted_pickle_in_the_table_is_not_executed_by_the_safe_serializer(
    db_url: URL,
    make_journal: Callable[..., SAJournal],
    serializer: JsonSerializer,
    tmp_path: Path,
) -> None:
    pickled = make_journal(db_url)  # the default: pickle
    safe = make_journal(db_url, serialize=serializer.serialize, deserialize=serializer.deserialize)

    # control: the crafted bytes are live; pickle runs them on load
    control = tmp_path / "ran-under-pickle"
    await _plant(pickled, "casty_sa_events", "control", pickle.dumps(_Exploit(control)))
    await pickled.load("control")
    assert control.exists(), "the crafted pickle should run under pickle (control)"

    marker = tmp_path / "ran-under-json"
    await _plant(safe, "casty_sa_events", "victim", pickle.dumps(_Exploit(marker)))
    await _plant(safe, "casty_sa_snapshots", "victim", pickle.dumps(_Exploit(marker)))
    with pytest.raises(PayloadDecodeError) as info:
        await safe.load("victim")
    assert (info.value.entity_id, info.value.sequence_nr) == ("victim", 1)
    assert isinstance(info.value.__cause__, SerializationError)
    with pytest.raises(PayloadDecodeError, match="snapshot"):
        await safe.load_snapshot("victim")
    assert not marker.exists(), "the safe serializer executed a pickle"

    # a JSON payload naming an arbitrary callable is refused the same way
    crafted = b'{"v":1,"value":{"$type":"pathlib.Path.touch","$fields":{"self":"x"}}}'
    await _plant(safe, "casty_sa_events", "json-victim", crafted)
    with pytest.raises(PayloadDecodeError) as info:
        await safe.load("json-victim")
    assert isinstance(info.value.__cause__, UnknownTypeError)
    await safe.persist("fine", [PersistedEvent(1, Deposited(Money(1)), 1.0)])
    assert len(await safe.load("fine")) == 1
