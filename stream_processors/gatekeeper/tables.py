"""The values of the gatekeeper's faust tables, with names, and how they are stored.

faust keeps each table in memory and changelogs it as JSON to a compacted topic, so a value is stored as
a JSON object: `to_table` writes one with full field names and `from_table` reads it back. Entries
written before the values had names use single-letter keys (``{"o", "t", "d", "x", "p"}`` in ``seen``,
``{"r", "c", "t"}`` in ``buckets``); the changelog topics still hold them, so `from_table` reads both
shapes. `TypedTable` puts the conversion between a faust table and the code that reads it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, Self, TypeVar

from schemas.records import CompletionStatus, ModerationVerdict

# A table value as faust stores it: a JSON object.
TableJson = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """A terminal decision of the gatekeeper, kept in the ``seen`` entry so a redelivery replays it."""

    status: CompletionStatus  # REJECTED, CANCELLED or EXPIRED
    reason_code: str
    message: str
    validated: bool  # the request passed validation, so its reply topic and webhook URL may be used
    retry_after_ms: int | None = None
    moderation: ModerationVerdict | None = None

    def to_table(self) -> TableJson:
        """The decision as stored: a JSON object with the Completion's field names."""
        return {
            "status": self.status,
            "reason_code": self.reason_code,
            "message": self.message,
            "validated": self.validated,
            "retry_after_ms": self.retry_after_ms,
            "moderation": None if self.moderation is None else self.moderation.to_avro(),
        }

    @classmethod
    def from_table(cls, value: Mapping[str, Any]) -> Self:
        """The decision from its stored JSON object (the keys were always these; the last two optional)."""
        moderation = value.get("moderation")
        return cls(
            status=value["status"],
            reason_code=value["reason_code"],
            message=value["message"],
            validated=value["validated"],
            retry_after_ms=value.get("retry_after_ms"),
            moderation=None if moderation is None else ModerationVerdict.from_avro(dict(moderation)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Seen:
    """The ``seen`` entry of a request_id: where and when it was first consumed, and what was decided."""

    origin: str  # topic:partition:offset where the request was consumed (kept across retries)
    first_seen: int  # epoch ms
    decision: Decision | None = None  # None: accepted
    partition: int | None = None  # the request partition whose events expire the entry

    @property
    def accepted(self) -> bool:
        """Whether the request was accepted (fanned out) rather than decided terminally."""
        return self.decision is None

    def to_table(self) -> TableJson:
        """The entry as stored in the table and its changelog."""
        return {
            "origin": self.origin,
            "first_seen": self.first_seen,
            "accepted": self.accepted,
            "decision": None if self.decision is None else self.decision.to_table(),
            "partition": self.partition,
        }

    @classmethod
    def from_table(cls, value: Mapping[str, Any]) -> Self:
        """The entry from its stored JSON object, either shape (full names, or the old single letters:
        o origin, t first seen, d "A" accepted or "R" rejected, x the decision when rejected, p partition)."""
        if "o" in value:
            decision = None if value["d"] == "A" else Decision.from_table(value["x"])
            return cls(origin=value["o"], first_seen=value["t"], decision=decision, partition=value.get("p"))
        stored = value.get("decision")
        return cls(
            origin=value["origin"],
            first_seen=value["first_seen"],
            decision=None if stored is None else Decision.from_table(stored),
            partition=value.get("partition"),
        )


@dataclass(frozen=True, slots=True)
class Bucket:
    """A tenant's token buckets: request and cost tokens left, as counted at epoch ms ``counted_at``."""

    requests: float
    cost: float
    counted_at: float

    def to_table(self) -> TableJson:
        """The buckets as stored in the table and its changelog."""
        return {"requests": self.requests, "cost": self.cost, "counted_at": self.counted_at}

    @classmethod
    def from_table(cls, value: Mapping[str, Any]) -> Self:
        """The buckets from their stored JSON object, either shape (full names, or the old r, c, t)."""
        if "r" in value:
            return cls(float(value["r"]), float(value["c"]), float(value["t"]))
        return cls(float(value["requests"]), float(value["cost"]), float(value["counted_at"]))


class TableValue(Protocol):
    """A value a `TypedTable` holds: it converts itself to and from the JSON object faust stores."""

    def to_table(self) -> TableJson:
        """The value as stored."""
        ...

    @classmethod
    def from_table(cls, value: Mapping[str, Any]) -> Self:
        """The value from its stored JSON object."""
        ...


V = TypeVar("V", bound=TableValue)


class TypedTable(MutableMapping[str, V], Generic[V]):
    """A faust table (or any mapping of JSON objects) seen as a mapping of typed values.

    Reading converts with ``from_table`` and writing with ``to_table``; deleting and iterating go to the
    table unchanged, so a faust table still changelogs every write and delete.
    """

    def __init__(self, table: MutableMapping[str, Any], kind: type[V]) -> None:
        self.table = table
        self.kind = kind

    def __getitem__(self, key: str) -> V:
        return self.kind.from_table(self.table[key])

    def __setitem__(self, key: str, value: V) -> None:
        self.table[key] = value.to_table()

    def __delitem__(self, key: str) -> None:
        del self.table[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)

    def entries(self) -> Iterator[tuple[str, V]]:
        """Every key and its value, read from the table once."""
        for key, value in list(self.table.items()):
            yield key, self.kind.from_table(value)
