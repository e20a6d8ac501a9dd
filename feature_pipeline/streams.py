"""What a JetStream stream the pipeline reads is, and what it becomes in the store.

The event streams are the registry's sources (`[[source]]` in the feature registry, see
`store.registry`); `Registry.sources` is the one table every module reads them from. The dead-letter
stream, its headers and the durable consumer names are the pipeline's own and live here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamSpec:
    key: str  # "signals": consumer suffix, asset key nats/<key>, feature `source`
    name: str  # the JetStream stream
    subjects: tuple[str, ...]  # what it captures: literal tokens then `.>` (`signals.>`, `shop.orders.>`)
    table: str  # the DuckDB table its messages land in
    carries_events: bool  # contract envelopes (validated); False: dead-letter copies
    table_description: str  # what the table asset says in the Dagster UI
    models: str = ""  # "module:ATTR", a dict of event type -> pydantic model of `data` (see `contract`)
    dead_letter_unknown: bool = False  # an event type without a model is poison (else stored, known_type false)

    @property
    def prefixes(self) -> tuple[str, ...]:
        """Each subject without its `.>`: `signals` for `signals.>`."""
        return tuple(s.removesuffix(".>") for s in self.subjects)

    def event_type(self, subject: str) -> str:
        """The tokens a subject has after its pattern's literal part: `signals.task.synced` carries events of
        type `task.synced`. Empty when the subject is not one of this stream's."""
        for prefix in self.prefixes:
            if subject.startswith(prefix + "."):
                return subject[len(prefix) + 1 :]
        return ""


SIGNALS = StreamSpec(
    "signals",
    "SIGNALS",
    ("signals.>",),
    "signal_events",
    True,
    "One row per signal event id: subject, stream sequence, occurred_at, received_at, user_id, type, payload.",
    models="feature_pipeline.envelopes:SIGNAL_MODELS",
)
FEEDBACK = StreamSpec(
    "feedback",
    "FEEDBACK",
    ("feedback.>",),
    "feedback_events",
    True,
    "One row per recommendation-feedback event id.",
    models="feature_pipeline.envelopes:FEEDBACK_MODELS",
)
# The packaged sources: what a registry without [[source]] entries reads (feature_defs.toml declares them).
PACKAGED: tuple[StreamSpec, ...] = (SIGNALS, FEEDBACK)
DEADLETTER = StreamSpec(
    "deadletter",
    "DEADLETTER",
    ("deadletter.>",),
    "dead_letters",
    False,
    "Messages that could not be stored, with the reason: poison input or too many failed runs.",
)


def with_dead_letters(sources: tuple[StreamSpec, ...]) -> tuple[StreamSpec, ...]:
    """Every stream a pipeline reads: its sources, then the dead-letter stream, which is always its own."""
    return (*sources, DEADLETTER)


def by_name(sources: tuple[StreamSpec, ...]) -> dict[str, StreamSpec]:
    return {s.name: s for s in with_dead_letters(sources)}


# Headers a dead-letter copy carries; the dead_letters table is filled from them.
H_STREAM = "FP-Original-Stream"
H_SUBJECT = "FP-Original-Subject"
H_SEQUENCE = "FP-Original-Sequence"
H_DELIVERIES = "FP-Delivery-Count"
H_REASON = "FP-Reason"
H_AT = "FP-Dead-Lettered-At"
H_STORED = "FP-Original-Time"
# NATS_DURABLE_PREFIX of the pipeline that made the copy. Pipelines sharing the streams (two Component
# instances) all read DEADLETTER; each records only its own copies and those of other clients.
H_PIPELINE = "FP-Pipeline"
H_BODY_OBJECT = "FP-Body-Object"  # set when the body did not fit the copy: where the whole body is kept
# Bodies too large to be copied to DEADLETTER with their headers are kept whole here (object store).
DEADLETTER_BODIES = "DEADLETTER_BODIES"


def consumer_name(prefix: str, spec: StreamSpec) -> str:
    """The durable pull consumer of `spec` for one deployment (NATS_DURABLE_PREFIX)."""
    return f"{prefix}-{spec.key}"


def advisory_stream(prefix: str) -> str:
    """The stream (and its durable consumer) that keeps the server's MAX_DELIVERIES advisories."""
    return f"{prefix}-advisories"


def dead_letter_subject(original_subject: str) -> str:
    return f"{DEADLETTER.prefixes[0]}.{original_subject}"
