"""A safe serializer: JSON for dataclass events and states, with a registry of allowed types.

casty-sa stores payloads with :mod:`pickle` by default (what casty's own journals do).
Unpickling runs whatever code the bytes name, so anyone who can write to the journal's
tables can run code on every node that loads them. :class:`JsonSerializer` closes that
door: payloads are JSON, and the only classes it ever instantiates are the ones you list.
A type name that is not on the list is an error, never an import.

Supported values
    ``None``, ``bool``, ``int`` (any size), ``float`` (including ``nan``, ``inf`` and
    ``-0.0``), ``str`` (any, lone surrogates included), ``bytes``, ``list``, ``tuple``,
    ``dict`` (with keys of any supported hashable type), ``set``, ``frozenset``,
    ``datetime.datetime`` / ``date`` / ``time`` / ``timedelta``, ``decimal.Decimal``,
    ``uuid.UUID``, and instances of the registered dataclasses and ``enum.Enum``
    classes, nested in any way. Types are kept exactly: a tuple comes back a tuple, a
    ``str`` subclass or a ``NamedTuple`` is refused instead of silently changing type.

Format
    ``{"v": 1, "value": ...}`` in ASCII JSON. A dataclass is
    ``{"$type": "Deposited", "$fields": {...}}`` (only its ``init`` fields), an enum member
    ``{"$type": "Color", "$value": ...}``; other non-JSON values are one-key objects
    tagged ``"$tuple"``, ``"$bytes"`` (base64), and so on. A dict key starting with ``$``
    is stored with the ``$`` doubled, so user data can never pose as a tag.

Evolving classes
    A field added with a default is filled in for old rows; a stored field the class no
    longer has is an error (it would otherwise be lost silently). A renamed class keeps
    loading when registered under its old name: ``types={"Deposited": Deposit}``.

Examples
--------
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Deposited:
...     amount: int
...     note: str = ""
>>> s = JsonSerializer(types=[Deposited])
>>> s.serialize(Deposited(10))
b'{"v":1,"value":{"$type":"Deposited","$fields":{"amount":10,"note":""}}}'
>>> s.deserialize(s.serialize((Deposited(5, "tip"), {1: b"raw"})))
(Deposited(amount=5, note='tip'), {1: b'raw'})
>>> s.deserialize(b'{"v":1,"value":{"$type":"os.system","$fields":{}}}')
... # doctest: +ELLIPSIS
Traceback (most recent call last):
...
casty_sa.serializers.UnknownTypeError: stored type 'os.system' is not registered with ...

Use it with a journal::

    serializer = JsonSerializer(types=[Deposited, Withdrawn, Account])
    journal = SAJournal(url, serialize=serializer.serialize,
                        deserialize=serializer.deserialize)
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import json
import math
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from casty_sa.errors import JournalError

__all__ = ["FORMAT_VERSION", "JsonSerializer", "SerializationError", "UnknownTypeError"]

#: The ``"v"`` of every document this module writes.
FORMAT_VERSION = 1


class SerializationError(JournalError, ValueError):
    """A value :class:`JsonSerializer` cannot encode, or bytes it cannot decode.

    Raised from ``serialize``/``deserialize``; inside a journal call the journal wraps
    it in :class:`~casty_sa.errors.PayloadEncodeError` or
    :class:`~casty_sa.errors.PayloadDecodeError`, which add the entity and sequence
    number.
    """


class UnknownTypeError(SerializationError):
    """A class that is not in the serializer's registry.

    When encoding: the object's class was not registered. When decoding: the stored
    type name is not registered, and the serializer refuses to look it up anywhere
    else (no import by name, ever).

    Parameters
    ----------
    type_name : str
        The unregistered name.
    """

    def __init__(self, message: str, type_name: str) -> None:
        super().__init__(message)
        self.type_name = type_name


_Encoder = Callable[[Any], Any]
_Decoder = Callable[[Any], Any]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _float_tag(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


class JsonSerializer:
    """JSON serialization of dataclass events and states, limited to registered types.

    Parameters
    ----------
    types : Iterable[type] | Mapping[str, type]
        The dataclasses and ``Enum`` classes that may be stored and loaded. Each is
        known by its ``__qualname__``, or by the key under which it is given in a
        mapping (to keep loading rows of a class that was renamed, or to tell apart
        two classes with the same name).

    Raises
    ------
    TypeError
        A registered type is neither a dataclass nor an ``Enum``.
    ValueError
        Two types share one name, or one type has two names.
    """

    def __init__(self, types: Iterable[type] | Mapping[str, type]) -> None:
        pairs: list[tuple[Any, Any]] = (
            list(types.items())
            if isinstance(types, Mapping)
            else [(getattr(cls, "__qualname__", None), cls) for cls in types]
        )
        self._by_name: dict[str, type] = {}
        self._by_type: dict[type, str] = {}
        for name, cls in pairs:
            if not isinstance(cls, type) or not (
                dataclasses.is_dataclass(cls) or issubclass(cls, enum.Enum)
            ):
                raise TypeError(
                    f"JsonSerializer registers dataclasses and Enum classes, not {cls!r}"
                )
            if not isinstance(name, str) or not name:
                raise ValueError(f"the name of {cls.__qualname__} must be a non-empty str")
            if name in self._by_name:
                raise ValueError(
                    f"two types are registered as {name!r}: {self._by_name[name]!r} and "
                    f"{cls!r}; give them distinct names with types={{'name': cls, ...}}"
                )
            if cls in self._by_type:
                raise ValueError(f"{cls!r} is registered twice")
            self._by_name[name] = cls
            self._by_type[cls] = name
        self._tags: dict[str, _Decoder] = {
            "$tuple": lambda v: tuple(self._decode_list(v)),
            "$set": lambda v: set(self._decode_list(v)),
            "$frozenset": lambda v: frozenset(self._decode_list(v)),
            "$bytes": lambda v: base64.b64decode(_need(v, str), validate=True),
            "$float": lambda v: float(_need(v, str)),
            "$dict": self._decode_pairs,
            "$datetime": lambda v: datetime.datetime.fromisoformat(_need(v, str)),
            "$date": lambda v: datetime.date.fromisoformat(_need(v, str)),
            "$time": lambda v: datetime.time.fromisoformat(_need(v, str)),
            "$timedelta": lambda v: datetime.timedelta(*_need(v, list)),
            "$decimal": lambda v: decimal.Decimal(_need(v, str)),
            "$uuid": lambda v: uuid.UUID(_need(v, str)),
        }

    @property
    def names(self) -> tuple[str, ...]:
        """The registered type names, sorted."""
        return tuple(sorted(self._by_name))

    def __repr__(self) -> str:
        return f"JsonSerializer(types=[{', '.join(self.names)}])"

    # -- encoding ----------------------------------------------------------------------------

    def serialize(self, obj: Any) -> bytes:
        """Encode ``obj`` as JSON bytes.

        Raises
        ------
        UnknownTypeError
            ``obj`` contains an instance of an unregistered class.
        SerializationError
            ``obj`` contains a value of a type this serializer does not support.
        """
        try:
            document = {"v": FORMAT_VERSION, "value": self._encode(obj)}
            text = json.dumps(document, separators=(",", ":"), allow_nan=False)
        except RecursionError:
            raise SerializationError("the value is nested too deeply to serialize") from None
        except SerializationError:
            raise
        except ValueError as exc:  # e.g. an int beyond Python's digit limit for str()
            raise SerializationError(f"cannot serialize the value: {exc}") from exc
        return text.encode("ascii")

    def _encode(self, obj: Any) -> Any:
        kind = type(obj)
        if obj is None or kind is bool or kind is int or kind is str:
            return obj
        if kind is float:
            return obj if math.isfinite(obj) else {"$float": _float_tag(obj)}
        if kind is list:
            return [self._encode(item) for item in obj]
        if kind is dict:
            if all(type(key) is str for key in obj):
                return {_escape(key): self._encode(value) for key, value in obj.items()}
            return {"$dict": [[self._encode(k), self._encode(v)] for k, v in obj.items()]}
        simple = _SIMPLE_ENCODERS.get(kind)
        if simple is not None:
            return simple(self, obj)
        name = self._by_type.get(kind)
        if name is None:
            if dataclasses.is_dataclass(kind) or isinstance(obj, enum.Enum):
                raise UnknownTypeError(
                    f"{kind.__module__}.{kind.__qualname__} is not registered with this "
                    f"JsonSerializer (registered: {', '.join(self.names) or 'none'}); add it "
                    "to JsonSerializer(types=...)",
                    kind.__qualname__,
                )
            raise SerializationError(
                f"JsonSerializer cannot store a {kind.__module__}.{kind.__qualname__} "
                "(supported: None, bool, int, float, str, bytes, list, tuple, dict, set, "
                "frozenset, datetime, date, time, timedelta, Decimal, UUID and registered "
                "dataclasses and enums)"
            )
        if isinstance(obj, enum.Enum):
            return {"$type": name, "$value": self._encode(obj.value)}
        fields = {
            f.name: self._encode(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init
        }
        return {"$type": name, "$fields": fields}

    # -- decoding ----------------------------------------------------------------------------

    def deserialize(self, data: bytes) -> Any:
        """Decode bytes written by :meth:`serialize`.

        Only registered classes are instantiated; nothing is imported.

        Raises
        ------
        UnknownTypeError
            The data names a type that is not registered.
        SerializationError
            The bytes are not a document of this serializer (for example a pickle).
        """
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SerializationError(
                f"the payload is not JSON written by JsonSerializer ({exc}); if these rows "
                "were written with pickle, load them with the serializer that wrote them"
            ) from None
        except RecursionError:
            raise SerializationError("the payload is nested too deeply to load") from None
        if (
            type(document) is not dict
            or document.get("v") != FORMAT_VERSION
            or set(document) != {"v", "value"}
        ):
            raise SerializationError(
                f"the payload is not a JsonSerializer document of format {FORMAT_VERSION}"
            )
        try:
            return self._decode(document["value"])
        except SerializationError:
            raise
        except RecursionError:
            raise SerializationError("the payload is nested too deeply to load") from None
        except (ValueError, TypeError, KeyError, OverflowError, decimal.InvalidOperation) as exc:
            raise SerializationError(
                f"the payload is malformed: {type(exc).__name__}: {exc}"
            ) from exc

    def _decode(self, node: Any) -> Any:
        if type(node) is list:
            return self._decode_list(node)
        if type(node) is not dict:
            return node  # None, bool, int, float, str
        tags = [key for key in node if _is_tag(key)]
        if not tags:
            return {_unescape(key): self._decode(value) for key, value in node.items()}
        if "$type" in node:
            return self._decode_registered(node)
        if len(node) != 1 or tags[0] not in self._tags:
            raise SerializationError(f"unknown tag in payload: {sorted(node)[:5]}")
        return self._tags[tags[0]](node[tags[0]])

    def _decode_list(self, value: Any) -> list[Any]:
        return [self._decode(item) for item in _need(value, list)]

    def _decode_pairs(self, value: Any) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        for pair in _need(value, list):
            key, item = _need(pair, list)
            result[self._decode(key)] = self._decode(item)
        return result

    def _decode_registered(self, node: dict[str, Any]) -> Any:
        name = node["$type"]
        if type(name) is not str:
            raise SerializationError("the $type of a stored object must be a string")
        cls = self._by_name.get(name)
        if cls is None:
            raise UnknownTypeError(
                f"stored type {name[:200]!r} is not registered with this JsonSerializer "
                f"(registered: {', '.join(self.names) or 'none'}); nothing is imported by "
                "name: add the class to JsonSerializer(types=...)",
                name,
            )
        if issubclass(cls, enum.Enum):
            if set(node) != {"$type", "$value"}:
                raise SerializationError(f"stored enum {name!r} is malformed")
            return cls(self._decode(node["$value"]))
        stored = node.get("$fields")
        if set(node) != {"$type", "$fields"} or type(stored) is not dict:
            raise SerializationError(f"stored object {name!r} is malformed")
        init_fields = {f.name for f in dataclasses.fields(cast(Any, cls)) if f.init}
        unknown = sorted(set(stored) - init_fields)
        if unknown:
            raise SerializationError(
                f"stored {name} has field(s) {', '.join(unknown)} that {cls.__qualname__} "
                "does not have (the class changed since the row was written); add them "
                "back, or load with a class that has them"
            )
        kwargs = {key: self._decode(value) for key, value in stored.items()}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise SerializationError(
                f"could not rebuild {name} from its stored fields: {exc}"
            ) from exc


def _need(value: Any, kind: type) -> Any:
    if type(value) is not kind:
        raise SerializationError(
            f"malformed payload: expected {kind.__name__}, found {type(value).__name__}"
        )
    return value


def _is_tag(key: str) -> bool:
    return key.startswith("$") and not key.startswith("$$")


def _escape(key: str) -> str:
    return "$" + key if key.startswith("$") else key


def _unescape(key: str) -> str:
    return key[1:] if key.startswith("$$") else key


_SIMPLE_ENCODERS: dict[type, Callable[[JsonSerializer, Any], Any]] = {
    tuple: lambda s, v: {"$tuple": [s._encode(item) for item in v]},
    set: lambda s, v: {"$set": [s._encode(item) for item in v]},
    frozenset: lambda s, v: {"$frozenset": [s._encode(item) for item in v]},
    bytes: lambda s, v: {"$bytes": _b64(v)},
    datetime.datetime: lambda s, v: {"$datetime": v.isoformat()},
    datetime.date: lambda s, v: {"$date": v.isoformat()},
    datetime.time: lambda s, v: {"$time": v.isoformat()},
    datetime.timedelta: lambda s, v: {"$timedelta": [v.days, v.seconds, v.microseconds]},
    decimal.Decimal: lambda s, v: {"$decimal": str(v)},
    uuid.UUID: lambda s, v: {"$uuid": str(v)},
}
