"""Feature definitions as data: one typed entry per `user_features` column.

The models only: `loader.py` reads them from TOML (the packaged `feature_defs.toml` or the file
named by FEATURE_PIPELINE_FEATURES_FILE), `features.py` turns them into the one SQL query every
path uses (micro-batch update, full rebuild, daily snapshot, point-in-time join). Pure: no
Dagster, no NATS, no DuckDB.
"""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta
from functools import cached_property
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from feature_pipeline.store.sources import SourceDef, conflicts, packaged
from feature_pipeline.streams import StreamSpec

RESERVED = frozenset({"user_id", "updated_at", "valid_as_of", "as_of", "ts", "snapshot_date"})
VALUE_TYPES = ("BIGINT", "DOUBLE", "VARCHAR", "BOOLEAN", "TIMESTAMPTZ")
Aggregation = Literal["count", "sum", "min", "max", "mean", "last", "count_distinct", "ratio"]

_WINDOW = re.compile(r"^(\d+)\s*(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_FIELD = re.compile(r"^(occurred_at|received_at|event_id|type|subject|data(\.[A-Za-z_][A-Za-z0-9_]*)+)$")


def parse_window(raw: str) -> timedelta | None:
    """'1h', '24h', '7d', '30d', '90m', '45s', or 'all' (no window)."""
    text = raw.strip().lower()
    if text in ("all", "all_time", ""):
        return None
    m = _WINDOW.match(text)
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"window must look like 1h, 24h, 7d, 30d, 90m or 'all', got {raw!r}")
    return timedelta(seconds=int(m.group(1)) * _UNIT_SECONDS[m.group(2)])


class FeatureDef(BaseModel):
    """One column of user_features.

    Aggregations run over the events of `source` (optionally only `event_types`, and rows matching
    `where`) whose occurred_at lies in (as_of - window, as_of]; `ratio` divides two other features.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
    aggregation: Aggregation
    description: str = ""
    source: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,30}$")] | None = None  # a [[source]]'s name
    event_types: tuple[str, ...] = ()
    where: str | None = None
    field: str | None = None
    type: Literal["BIGINT", "DOUBLE", "VARCHAR", "BOOLEAN", "TIMESTAMPTZ"] | None = None
    window: str = "all"
    numerator: str | None = None
    denominator: str | None = None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED:
            raise ValueError(f"{value!r} is a reserved column name ({', '.join(sorted(RESERVED))})")
        return value

    @field_validator("window")
    @classmethod
    def _window(cls, value: str) -> str:
        parse_window(value)
        return value

    @field_validator("event_types")
    @classmethod
    def _types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for t in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", t):
                raise ValueError(f"{t!r} is not an event type like 'task.synced'")
        return value

    @field_validator("field")
    @classmethod
    def _field(cls, value: str | None) -> str | None:
        if value is not None and not _FIELD.match(value):
            raise ValueError(
                "field must be occurred_at, received_at, event_id, type, subject or a payload path like "
                f"data.tasks_total, got {value!r}"
            )
        return value

    @field_validator("where")
    @classmethod
    def _where(cls, value: str | None) -> str | None:
        if value is not None and (";" in value or "--" in value):
            raise ValueError("where must be a single SQL condition (no ';' or comments)")
        return value

    @model_validator(mode="after")
    def _shape(self) -> FeatureDef:
        agg = self.aggregation
        if agg == "ratio":
            if not (self.numerator and self.denominator):
                raise ValueError("a ratio needs numerator and denominator (names of other features)")
            extra = [k for k in ("source", "field", "where", "type") if getattr(self, k) is not None]
            if extra or self.event_types or self.window != "all":
                raise ValueError("a ratio takes only numerator, denominator and description")
            return self
        if self.source is None:
            raise ValueError("source must name one of the registry's [[source]] entries, e.g. 'signals'")
        if self.numerator or self.denominator:
            raise ValueError("numerator/denominator belong to aggregation = 'ratio'")
        if agg == "count":
            if self.field is not None or self.type is not None:
                raise ValueError("count counts events: leave out field and type (use count_distinct for a field)")
            return self
        if self.field is None:
            raise ValueError(f"aggregation {agg!r} needs a field, e.g. data.tasks_total or occurred_at")
        if self.field.startswith("data.") and self.type is None and agg != "count_distinct":
            raise ValueError(f"a payload field needs a type, one of {', '.join(VALUE_TYPES)}")
        if agg in ("sum", "mean") and self.value_type not in ("BIGINT", "DOUBLE"):
            raise ValueError(f"{agg} needs a numeric value (type BIGINT or DOUBLE), got {self.value_type}")
        return self

    @property
    def window_delta(self) -> timedelta | None:
        return parse_window(self.window)

    @property
    def value_type(self) -> str:
        """The SQL type of the aggregated field."""
        if self.type is not None:
            return self.type
        if self.field in ("occurred_at", "received_at"):
            return "TIMESTAMPTZ"
        return "VARCHAR"

    @property
    def column_type(self) -> str:
        """The SQL type of the feature column."""
        if self.aggregation in ("count", "count_distinct"):
            return "BIGINT"
        if self.aggregation in ("mean", "ratio"):
            return "DOUBLE"
        return self.value_type


class Registry(BaseModel):
    """The sources and the ordered feature list; feature order = column order in user_features."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: tuple[FeatureDef, ...] = Field(min_length=1)
    sources: tuple[SourceDef, ...] = Field(default_factory=packaged, min_length=1)

    @model_validator(mode="after")
    def _sources(self) -> Registry:
        problems = conflicts(self.sources)
        if problems:
            raise ValueError("; ".join(problems))
        by_name = {s.name: s for s in self.sources}
        for i, f in enumerate(self.features):
            if f.source is None:
                continue
            source = by_name.get(f.source)
            if source is None:
                raise ValueError(
                    f"feature #{i + 1} ({f.name!r}) reads source {f.source!r}, which is not a [[source]]; "
                    f"the sources are {', '.join(repr(n) for n in by_name)}"
                )
            for t in f.event_types:
                if any(t.startswith(p + ".") for p in source.spec.prefixes):
                    raise ValueError(
                        f"feature #{i + 1} ({f.name!r}): write event types without the subject prefix: "
                        f"{source.spec.event_type(t)!r}, not {t!r}"
                    )
        return self

    @model_validator(mode="after")
    def _references(self) -> Registry:
        seen: dict[str, FeatureDef] = {}
        for f in self.features:
            if f.name in seen:
                raise ValueError(f"feature {f.name!r} is defined twice")
            seen[f.name] = f
        for f in self.features:
            if f.aggregation != "ratio":
                continue
            for part in (f.numerator, f.denominator):
                ref = seen.get(part or "")
                if ref is None:
                    raise ValueError(f"ratio {f.name!r} refers to {part!r}, which is not a feature")
                if ref.aggregation == "ratio" or ref.column_type not in ("BIGINT", "DOUBLE"):
                    raise ValueError(f"ratio {f.name!r}: {part!r} must be a numeric, non-ratio feature")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @cached_property
    def event_streams(self) -> tuple[StreamSpec, ...]:
        """The sources as the stream table every module reads (the dead-letter stream is not among them)."""
        return tuple(s.spec for s in self.sources)

    @cached_property
    def fingerprint(self) -> str:
        """Changes when what a feature computes changes (not its description, nor the sources: a source's
        events are what they are): the store then rebuilds every row once."""
        semantic = self.model_dump_json(include={"features"}, exclude={"features": {"__all__": {"description"}}})
        return hashlib.sha256(semantic.encode()).hexdigest()[:16]

    def windows(self, source: str) -> list[timedelta]:
        """The distinct windows of a source's features: where values change as time passes."""
        found = {w for f in self.features if f.source == source and (w := f.window_delta) is not None}
        return sorted(found)
