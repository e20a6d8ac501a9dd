"""The contract of a pipeline's sources: for each message, the `Rule` its subject's events must follow.

A source's `models` (`"package.module:NAME"`) names a dict of event type -> pydantic model of the
envelope's `data`; it is imported when the registry is loaded, so a wrong path stops the load, not a
run. `Contract.validate` is what the sensor and replay call for every message: one dict lookup for
the subject's rule (made once per subject), then `envelopes.validate`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping, Sequence

from pydantic import BaseModel

from feature_pipeline import envelopes, streams
from feature_pipeline.envelopes import Event, Rule
from feature_pipeline.streams import StreamSpec

RULES_KEPT = 10_000  # subjects whose rule is kept; past that (a producer spraying subjects) rules are made per call


class ContractError(ValueError):
    """A source's models cannot be used; the text says which and why."""


def load_models(spec: StreamSpec) -> Mapping[str, type[BaseModel]]:
    """Import `spec.models` and check that it maps event types to pydantic models."""
    if not spec.models:
        return {}
    module_name, _, attr = spec.models.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own error while importing
        why = f"{type(exc).__name__}: {exc}"
        raise ContractError(f"models {spec.models!r}: cannot import {module_name} ({why})") from None
    if not hasattr(module, attr):
        raise ContractError(f"models {spec.models!r}: module {module_name} has no {attr}")
    found = getattr(module, attr)
    if not isinstance(found, Mapping):
        raise ContractError(
            f"models {spec.models!r} must be a dict of event type -> pydantic model, got {type(found).__name__}"
        )
    for type_, model in found.items():
        if not isinstance(type_, str) or not type_:
            raise ContractError(f"models {spec.models!r}: key {type_!r} is not an event type like 'order.created'")
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ContractError(f"models {spec.models!r}: {type_!r} maps to {model!r}, which is not a pydantic model")
    return dict(found)


class Contract:
    """The rules of one list of sources (a registry's), made once per subject."""

    def __init__(self, sources: Sequence[StreamSpec]) -> None:
        self._sources = {s.name: (s, load_models(s)) for s in sources}
        self._rules: dict[tuple[str, str], Rule] = {}

    def rule(self, stream: str, subject: str) -> Rule:
        found = self._rules.get((stream, subject))
        if found is not None:
            return found
        spec, models = self._sources[stream]
        type_ = spec.event_type(subject)
        made = Rule.make(
            subject,
            type_,
            models.get(type_),
            unknown_is_poison=spec.dead_letter_unknown,
            source=spec.key,
            models_path=spec.models,
        )
        if len(self._rules) < RULES_KEPT:
            self._rules[(stream, subject)] = made
        return made

    def validate(self, stream: str, subject: str, body: bytes) -> Event:
        """Raises PoisonMessage (the dead-letter reason); KeyError for a stream that is not a source."""
        return envelopes.validate(body, self.rule(stream, subject))


@functools.lru_cache(maxsize=16)
def contract_for(sources: tuple[StreamSpec, ...]) -> Contract:
    """One contract per list of sources and process (the rules are kept with it)."""
    return Contract(sources)


def _packaged_stream(subject: str) -> str:
    return next((s.name for s in streams.PACKAGED if s.event_type(subject)), streams.SIGNALS.name)


def validate(subject: str, body: bytes) -> Event:
    """A message of the packaged sources (tests, `publish`, benchmarks): the stream follows from the subject."""
    return contract_for(streams.PACKAGED).validate(_packaged_stream(subject), subject, body)


def validate_full(subject: str, body: bytes) -> Event:
    """The same through the pydantic models only: the reference the fast path must agree with."""
    return envelopes.validate_full(body, contract_for(streams.PACKAGED).rule(_packaged_stream(subject), subject))
