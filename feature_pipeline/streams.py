"""The one stream table: every JetStream stream the pipeline reads, and what it becomes in the store.

Every module that needs a stream's name, subjects, durable consumer, raw table or the dead-letter
headers reads them here, so adding or renaming a stream is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamSpec:
    key: str  # "signals": consumer suffix, asset key nats/<key>, feature `source`
    name: str  # the JetStream stream
    subject: str  # what it captures
    table: str  # the DuckDB table its messages land in
    carries_events: bool  # contract envelopes (validated); False: dead-letter copies
    table_description: str  # what the table asset says in the Dagster UI

    @property
    def prefix(self) -> str:
        """The subjects' first token: `signals` for `signals.>`."""
        return self.subject.split(".", 1)[0]


SIGNALS = StreamSpec(
    "signals",
    "SIGNALS",
    "signals.>",
    "signal_events",
    True,
    "One row per signal event id: subject, stream sequence, occurred_at, received_at, user_id, type, payload.",
)
FEEDBACK = StreamSpec(
    "feedback",
    "FEEDBACK",
    "feedback.>",
    "feedback_events",
    True,
    "One row per recommendation-feedback event id.",
)
DEADLETTER = StreamSpec(
    "deadletter",
    "DEADLETTER",
    "deadletter.>",
    "dead_letters",
    False,
    "Messages that could not be stored, with the reason: poison input or too many failed runs.",
)

STREAMS: tuple[StreamSpec, ...] = (SIGNALS, FEEDBACK, DEADLETTER)
EVENT_STREAMS: tuple[StreamSpec, ...] = tuple(s for s in STREAMS if s.carries_events)
BY_NAME = {s.name: s for s in STREAMS}
BY_KEY = {s.key: s for s in STREAMS}

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
    return f"{DEADLETTER.prefix}.{original_subject}"
