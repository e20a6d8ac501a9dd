"""The event contract: JSON envelopes, the packaged sources' typed payloads, and what makes a message poison.

Pure: no NATS, no Dagster, no DuckDB. `validate(body, rule)` either returns an `Event` ready to
store or raises `PoisonMessage` whose text is the dead-letter reason a person reads. A `Rule` is
what one subject's messages must be: `feature_pipeline.contract` makes them from the registry's
sources (the packaged ones use the models below; a team's source names its own).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, NotRequired

import pydantic_core
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

# Ids and names are printed in logs, the CLI and the Dagster UI: no control characters.
_Name = Annotated[
    str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$")
]
_BIGINT = 2**63 - 1  # tasks_* are BIGINT in DuckDB
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


class PoisonMessage(ValueError):
    """A message that can never be stored as it is; the text is its dead-letter reason."""


class Envelope(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    id: _Name
    type: _Name
    # Lax here because the before-validator hands pydantic a Python str; it admits only RFC 3339 strings.
    occurred_at: Annotated[AwareDatetime, Field(strict=False)]
    user_id: _Name
    schema_version: Annotated[int, Field(ge=1, le=2**31 - 1)]
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _rfc3339(cls, value: object) -> object:
        if not isinstance(value, str) or not _RFC3339.match(value):
            raise ValueError("must be an RFC 3339 timestamp with a zone, like 2026-11-27T05:00:00Z")
        return value


class _Data(BaseModel):
    # Producers may add fields before we know them; the fields we read must be right.
    model_config = ConfigDict(strict=True, extra="allow")


class TaskSynced(_Data):
    provider: _Name
    tasks_total: Annotated[int, Field(ge=0, le=_BIGINT)]
    tasks_completed: Annotated[int, Field(ge=0, le=_BIGINT)]


class TaskCompleted(_Data):
    task_id: _Name


class SessionStarted(_Data):
    pass


class RecommendationEvent(_Data):
    recommendation_id: _Name
    item_id: _Name


# The packaged sources' models (`models = "feature_pipeline.envelopes:SIGNAL_MODELS"`): event type -> `data`.
SIGNAL_MODELS: dict[str, type[BaseModel]] = {
    "task.synced": TaskSynced,
    "task.completed": TaskCompleted,
    "session.started": SessionStarted,
}
FEEDBACK_MODELS: dict[str, type[BaseModel]] = {
    "recommendation.shown": RecommendationEvent,
    "recommendation.accepted": RecommendationEvent,
    "recommendation.dismissed": RecommendationEvent,
}


@dataclass(frozen=True, slots=True)
class Event:
    """A valid event, in the shape the raw tables store it."""

    event_id: str
    type: str
    user_id: str
    occurred_at: datetime  # UTC
    schema_version: int
    data_json: str  # canonical JSON of `data`: no NaN/Infinity, so DuckDB can always parse it
    known_type: bool


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        shown = repr(err.get("input"))
        if len(shown) > 80:
            shown = shown[:77] + "..."
        text = f"{where}: {err['msg']}"
        if err["type"] not in ("missing", "json_invalid") and where != "body":
            text += f" (got {shown})"
        parts.append(text)
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


class _FastEnvelope(TypedDict):
    """The envelope's fields as the fast path reads them (same constraints as Envelope)."""

    __pydantic_config__ = ConfigDict(strict=True, extra="ignore")  # type: ignore[misc]
    id: _Name
    type: _Name
    occurred_at: str
    user_id: _Name
    schema_version: Annotated[int, Field(ge=1, le=2**31 - 1)]
    data: NotRequired[dict[str, Any]]


def _fast_data(model: type[_Data]) -> TypeAdapter[Any]:
    """A TypedDict twin of a data model: validates the dict without building a model instance."""
    fields = {name: info.rebuild_annotation() for name, info in model.model_fields.items()}
    typed = TypedDict(f"_Fast{model.__name__}", fields)  # type: ignore[misc]
    typed.__pydantic_config__ = ConfigDict(strict=True, extra="ignore")  # type: ignore[attr-defined]
    return TypeAdapter(typed)


_FAST_ENVELOPE = TypeAdapter(_FastEnvelope)


@dataclass(frozen=True)
class Rule:
    """What the messages of one subject must be: the envelope, of type `event_type`, with `data` valid for `model`.
    Without a model, the event is stored as an unknown type, or is poison when `unknown_is_poison`."""

    subject: str
    event_type: str  # "" when the subject is not one of its source's (the message is poison)
    model: type[BaseModel] | None = None
    unknown_is_poison: bool = False
    source: str = ""
    models_path: str = ""
    fast: TypeAdapter[Any] | None = field(default=None, compare=False)  # the model's TypedDict twin

    @classmethod
    def make(cls, subject: str, type_: str, model: type[BaseModel] | None, **kw: Any) -> Rule:
        """The fast twin is made only for the packaged models (strict, extra allowed: the twin agrees with
        them exactly); a team's model, whatever its configuration, is run as it is."""
        fast = _fast_data(model) if model is not None and issubclass(model, _Data) else None
        return cls(subject, type_, model, fast=fast, **kw)


# The common shapes only; any other RFC 3339 spelling takes the full path.
_FAST_TIME = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})$"
)
_NOT_CANONICAL = re.compile(rb"[0-9][eE]|NaN|Infinity|0\.0000")


def _canonical_json(data: dict[str, Any]) -> str:
    """The full path's `json.dumps(..., separators=(",", ":"), ensure_ascii=False)`, about 10x cheaper.

    pydantic_core writes the same text except for floats in exponent form (1e16 vs 1e+16), floats
    below 1e-4 (0.00001 vs 1e-05) and NaN/Infinity; an exponent, four zeros after "0." or those words
    anywhere send it to json.dumps.
    """
    if not data:
        return "{}"
    out = pydantic_core.to_json(data, inf_nan_mode="constants")
    if _NOT_CANONICAL.search(out):
        return json.dumps(data, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    return out.decode()


def _fast(body: bytes, rule: Rule) -> Event | None:
    """One validate_json pass and no model instances, for messages that are valid (nearly all).

    Returns None (or raises) whenever it is not sure; `validate` then runs the full models,
    which decide and word the reason. It must never accept what the full path rejects.
    """
    env = _FAST_ENVELOPE.validate_json(body)
    type_ = env["type"]
    if type_ != rule.event_type or not type_:
        return None
    at = env["occurred_at"]
    if not _FAST_TIME.match(at):
        return None
    data = env.get("data", {})
    if rule.fast is not None:
        rule.fast.validate_python(data)
    elif rule.model is not None:
        rule.model.model_validate(data)
    elif rule.unknown_is_poison:
        return None
    return Event(
        event_id=env["id"],
        type=type_,
        user_id=env["user_id"],
        occurred_at=datetime.fromisoformat(at).astimezone(UTC),
        schema_version=env["schema_version"],
        data_json=_canonical_json(data),
        known_type=rule.model is not None,
    )


def validate(body: bytes, rule: Rule) -> Event:
    """Check one message against the contract."""
    if body:
        try:
            event = _fast(body, rule)
        except Exception:  # the full path below decides, and says why
            event = None
        if event is not None:
            return event
    return validate_full(body, rule)


def validate_full(body: bytes, rule: Rule) -> Event:
    """The contract through the pydantic models: the reference `_fast` must agree with, and the reasons."""
    if not body:
        raise PoisonMessage("empty body: expected a JSON envelope")
    try:
        env = Envelope.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise PoisonMessage(f"not valid JSON: {exc.errors()[0]['msg']}") from None
        raise PoisonMessage(f"invalid envelope: {_describe(exc)}") from None
    subject, wanted, model = rule.subject, rule.event_type, rule.model
    if not wanted:
        raise PoisonMessage(f"subject {subject!r} is not one of source {rule.source!r}'s subjects")
    if env.type != wanted:
        raise PoisonMessage(f"type {env.type!r} does not match subject {subject!r} (expected {wanted!r})")
    if model is not None:
        try:
            model.model_validate(env.data)
        except ValidationError as exc:
            raise PoisonMessage(f"invalid {env.type} data: {_describe(exc)}") from None
    elif rule.unknown_is_poison:
        raise PoisonMessage(
            f"unknown event type {env.type!r}: source {rule.source!r} dead-letters types that its models "
            f"({rule.models_path or 'none'}) do not name"
        )
    try:
        data_json = json.dumps(env.data, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        raise PoisonMessage("data contains NaN or Infinity, which JSON does not allow") from None
    try:
        occurred_at = env.occurred_at.astimezone(UTC)
    except OverflowError:
        raise PoisonMessage(f"occurred_at: {env.occurred_at.isoformat()} is out of range in UTC") from None
    return Event(
        event_id=env.id,
        type=env.type,
        user_id=env.user_id,
        occurred_at=occurred_at,
        schema_version=env.schema_version,
        data_json=data_json,
        known_type=model is not None,
    )


def make_envelope(
    event_id: str, type_: str, user_id: str, occurred_at: datetime, data: dict[str, Any] | None = None
) -> bytes:
    """Build a contract-conforming body (used by `feature-pipeline publish`, tests and benchmarks)."""
    return json.dumps(
        {
            "id": event_id,
            "type": type_,
            "occurred_at": occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "user_id": user_id,
            "schema_version": 1,
            "data": data or {},
        },
        separators=(",", ":"),
    ).encode()
