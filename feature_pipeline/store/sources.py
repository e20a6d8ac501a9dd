"""Sources as data: one `[[source]]` entry of the feature registry per JetStream stream of events.

A source names its stream and subjects, the raw table its events land in, optionally the team's own
pydantic models of each event type's `data` (`models = "myteam.events:PAYLOADS"`), and whether an
event type without a model is stored or dead-lettered. Features name their source; topology, the
raw tables, the feature SQL, asset keys and health all follow from the list. Pure: the models are
imported by `feature_pipeline.contract`, when the registry is loaded.

Subjects are literal tokens followed by `.>` (`orders.>`, `shop.orders.>`): the event type is what
the `>` matched, so `orders.created` carries events of type `created`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from feature_pipeline import streams

_TOKEN = r"[A-Za-z0-9_-]+"
_SUBJECT = re.compile(rf"^{_TOKEN}(\.{_TOKEN})*\.>$")
# Tables the store keeps for itself; a source's raw table must not take one of their names.
STORE_TABLES = frozenset(
    {
        "user_features", "user_feature_snapshots", "dead_letters", "event_index", "feature_state",
        "ingested_batches", "consistency_state", "redrives", "feature_distinct", "partials_state", "archive_files",
        "archive_runs", "online_pending", "online_check_state", "known_sources",
        # temp tables of a run, which would hide a table of the same name
        "batch_events", "touched_users", "fresh_ids", "repeated_copies", "stored_versions", "feature_rows",
        "feature_points", "pit_features", "time_users", "partials_delta",
    }
)  # fmt: skip
RESERVED_STREAMS = frozenset({streams.DEADLETTER.name, streams.DEADLETTER_BODIES})


class SourceDef(BaseModel):
    """One stream of contract envelopes and the raw table it fills."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,30}$")]
    stream: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    subjects: tuple[str, ...] = Field(min_length=1)
    table: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
    models: str = ""
    unknown_types: Literal["store", "dead_letter"] = "store"
    description: str = ""

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for s in value:
            if not _SUBJECT.match(s):
                raise ValueError(f"subject {s!r} must be literal tokens followed by '.>', like 'orders.>'")
            if s.split(".", 1)[0] == streams.DEADLETTER.prefixes[0]:
                raise ValueError(f"subject {s!r} is captured by the pipeline's own dead-letter stream (deadletter.>)")
        return value

    @field_validator("stream")
    @classmethod
    def _stream(cls, value: str) -> str:
        if value in RESERVED_STREAMS or value.startswith(("KV_", "OBJ_")):
            raise ValueError(f"stream {value!r} is the pipeline's own or NATS's (KV_*, OBJ_*): choose another name")
        return value

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        if value in STORE_TABLES or value.startswith(("partials_", "new_", "pit_")) or value.endswith("_history"):
            raise ValueError(f"table {value!r} is one the store keeps for itself: choose another name")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError(f"models must look like 'package.module:NAME', got {value!r}")
        return value

    @property
    def spec(self) -> streams.StreamSpec:
        return streams.StreamSpec(
            self.name,
            self.stream,
            self.subjects,
            self.table,
            True,
            self.description or f"One row per {self.name} event id.",
            models=self.models,
            dead_letter_unknown=self.unknown_types == "dead_letter",
        )


def packaged() -> tuple[SourceDef, ...]:
    """The sources a registry without [[source]] entries reads: today's signals and feedback."""
    return tuple(
        SourceDef(
            name=s.key,
            stream=s.name,
            subjects=s.subjects,
            table=s.table,
            models=s.models,
            description=s.table_description,
        )
        for s in streams.PACKAGED
    )


def overlap(a: str, b: str) -> bool:
    """Two `<tokens>.>` patterns capture a common subject when one's tokens start the other's."""
    ta, tb = a.removesuffix(".>").split("."), b.removesuffix(".>").split(".")
    n = min(len(ta), len(tb))
    return ta[:n] == tb[:n]


def conflicts(sources: tuple[SourceDef, ...]) -> list[str]:
    """What makes a list of sources unusable together, in words naming the entries."""
    out = []
    for field in ("name", "stream", "table"):
        seen: dict[str, int] = {}
        for i, s in enumerate(sources):
            value = getattr(s, field)
            if value in seen:
                out.append(f"source #{i + 1} ({s.name!r}) has the same {field} {value!r} as source #{seen[value] + 1}")
            seen.setdefault(value, i)
    for i, a in enumerate(sources):
        for j, b in enumerate(sources[:i]):
            both = [(x, y) for x in a.subjects for y in b.subjects if overlap(x, y)]
            if both:
                x, y = both[0]
                out.append(
                    f"source #{i + 1} ({a.name!r}) subject {x!r} overlaps source #{j + 1} ({b.name!r}) subject {y!r}: "
                    "a message must belong to one stream"
                )
    return out
