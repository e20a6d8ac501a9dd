"""The run's dead-letter copies of its batch's poison, confirmed by the DEADLETTER stream before the run goes on.

The sensor stages messages unparsed, so poison is found by the run (`store.intake`). The run copies it
to DEADLETTER with its reason before it writes anything; the originals are acked with the rest of the
batch once the run has succeeded. A copy that cannot be made fails the run outside its messages, so
the batch stays staged and is retried. A retry copies again under the same `Nats-Msg-Id`, which the
stream drops as a duplicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from feature_pipeline.broker.client import Broker
from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.settings import Settings


class Copier:
    """`FeatureStore.apply_batch`'s `dead_letter` for a run: one NATS connection per batch that has poison."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self, poison: Sequence[tuple[Delivery, str]]) -> int:
        return asyncio.run(self._copy(poison))

    async def _copy(self, poison: Sequence[tuple[Delivery, str]]) -> int:
        s = self.settings
        async with await Broker.connect(s.nats_url, "feature-pipeline-run", s.nats_auth) as broker:
            return await broker.dead_letter(poison, s.durable_prefix, terminate=False)
