"""Sample events that follow the contract: what `feature-pipeline publish`, the benchmarks and the soak run send."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from feature_pipeline.broker import topology
from feature_pipeline.broker.auth import NatsAuth
from feature_pipeline.broker.client import Broker
from feature_pipeline.envelopes import make_envelope
from feature_pipeline.streams import PACKAGED, StreamSpec


def sample_data(subject: str, rng: random.Random) -> dict[str, Any]:
    """A valid `data` object for a subject, with random values."""
    if subject == "signals.task.synced":
        total = rng.randint(0, 40)
        return {"provider": rng.choice(["todoist", "asana", "linear"]), "tasks_total": total,
                "tasks_completed": rng.randint(0, total)}  # fmt: skip
    if subject == "signals.task.completed":
        return {"task_id": f"task-{rng.randint(1, 10_000)}"}
    if subject.startswith("feedback.recommendation."):
        return {"recommendation_id": f"rec-{uuid.uuid4().hex[:8]}", "item_id": f"item-{rng.randint(1, 500)}"}
    return {}


# The packaged sources' subjects `publish` mixes by default.
SAMPLE_SUBJECTS = (
    "signals.task.synced", "signals.task.completed", "signals.session.started", "feedback.recommendation.shown",
    "feedback.recommendation.accepted", "feedback.recommendation.dismissed",
)  # fmt: skip


class NotASourceSubject(ValueError):
    """A subject no source of the registry captures."""


def event_type_of(subject: str, sources: Sequence[StreamSpec]) -> str:
    """The event type a subject carries under the registry's sources (`orders.created` -> `created`)."""
    for spec in sources:
        if type_ := spec.event_type(subject):
            return type_
    captured = ", ".join(s for spec in sources for s in spec.subjects)
    raise NotASourceSubject(f"no source captures subject {subject!r}; the sources capture {captured}")


def sample_event(
    subject: str,
    user_id: str,
    occurred_at: datetime,
    rng: random.Random,
    sources: Sequence[StreamSpec] = PACKAGED,
    data: dict[str, Any] | None = None,
) -> tuple[str, bytes]:
    """(event id, body) of one sample event; the id is also what to send as Nats-Msg-Id. `data` defaults to
    random values for the packaged subjects (an empty object for any other)."""
    event_id = f"evt-{uuid.uuid4().hex}"
    payload = sample_data(subject, rng) if data is None else data
    return event_id, make_envelope(event_id, event_type_of(subject, sources), user_id, occurred_at, payload)


async def publish_events(
    url: str,
    *,
    subjects: list[str],
    users: list[str],
    count: int,
    rate: float | None,
    seed: int | None = None,
    auth: NatsAuth | None = None,
    spread: timedelta = timedelta(0),
    sources: Sequence[StreamSpec] = PACKAGED,
    data: dict[str, Any] | None = None,
) -> list[str]:
    """Publish `count` contract-conforming events; returns their ids. Each id is also the Nats-Msg-Id."""
    rng = random.Random(seed)
    ids: list[str] = []
    for subject in subjects:
        event_type_of(subject, sources)  # before connecting: a subject no source captures is a usage error
    async with await Broker.connect(url, "feature-pipeline-publish", auth) as broker:
        await topology.ensure_streams(broker, sources)
        start = time.monotonic()
        pending = []
        for i in range(count):
            subject = rng.choice(subjects)
            occurred = datetime.now(UTC) - spread * rng.random()
            event_id, body = sample_event(subject, rng.choice(users), occurred, rng, sources, data)
            pending.append(await broker.js.publish_async(subject, body, headers={"Nats-Msg-Id": event_id}))
            ids.append(event_id)
            if len(pending) >= 500:
                await asyncio.gather(*pending)
                pending.clear()
            if rate:
                ahead = (i + 1) / rate - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.gather(*pending)
                    pending.clear()
                    await asyncio.sleep(ahead)
        await asyncio.gather(*pending)
    return ids
