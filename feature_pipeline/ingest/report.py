"""What one tick did, for the sensor's log line, its run requests and its observations."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from feature_pipeline.health import StreamStats
from feature_pipeline.ingest.staging import Manifest


@dataclass
class TickReport:
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    kept_alive: int = 0
    settled_batches: int = 0
    fetched: dict[str, int] = field(default_factory=dict)
    staged: list[Manifest] = field(default_factory=list)
    in_flight: int = 0
    problem: str | None = None
    stats: list[StreamStats] = field(default_factory=list)
    # Seconds spent per phase of the tick, in the log line: where a slow tick went.
    seconds: dict[str, float] = field(default_factory=dict)
    holding: str | None = None  # a batch still waiting for its run to start: no new batch this tick
    # Staged batches that need a run: the new ones and those whose request was lost. Requesting one
    # again is harmless: the batch id is the run key, so the orchestrator never starts two.
    to_request: list[str] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # retries among to_request: batch id -> attempt
    # Batches whose last run failed outside their messages: staged, kept alive, retried with backoff;
    # no new batch is fetched while there is one (it would only wait behind the same outage).
    retrying: list[str] = field(default_factory=list)
    bisected: list[str] = field(default_factory=list)  # batches split after a run their messages failed
    held: bool = False  # no shard could take a new batch: nothing was fetched
    shard_of: dict[str, int] = field(default_factory=dict)  # staged or requested batch id -> its shard
    merged: list[str] = field(default_factory=list)  # parked batches merged into one now that their shard is free

    def stage(self, manifest: Manifest, shard: int) -> None:
        """A batch this tick staged (a new one, a half of a split, a merge of parked ones)."""
        self.staged.append(manifest)
        self.shard_of[manifest.batch_id] = shard

    def request(self, batch_id: str, shard: int) -> None:
        """The batch needs its run (requested again if it has none: the batch id is the run key)."""
        if batch_id not in self.to_request:
            self.to_request.append(batch_id)
        self.shard_of[batch_id] = shard

    def lap(self, phase: str, since: float) -> float:
        now = time.monotonic()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - since, 2)
        return now

    def count_fetched(self, stream: str, n: int = 1) -> None:
        self.fetched[stream] = self.fetched.get(stream, 0) + n

    def summary(self) -> str:
        parts = [*self._fetch_parts(), *self._settle_parts(), f"{self.in_flight} batch(es) in flight"]
        if self.seconds:
            parts.append("took " + ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()))
        text = "; ".join(parts)
        return f"{self.problem}; {text}" if self.problem else text

    def _fetch_parts(self) -> list[str]:
        parts = []
        if self.fetched:
            parts.append("fetched " + ", ".join(f"{n} from {s}" for s, n in self.fetched.items()))
        elif self.retrying and self.held:
            parts.append("not fetching while a run fails outside its messages: " + "; ".join(self.retrying))
        elif self.holding:
            parts.append(f"not fetching while batch {self.holding} waits for its run to start")
        elif not self.problem:
            parts.append("no new messages")
        if self.retrying and not self.held:  # other shards are free: this one's part of each pull waits parked
            parts.append("retrying " + "; ".join(self.retrying))
        if self.staged:
            parts.append(f"staged {len(self.staged)} batch(es) of {sum(m.size for m in self.staged)} messages")
        parked = [m for m in self.staged if m.parked]
        if parked:
            shards = ", ".join(str(self.shard_of.get(m.batch_id, 0)) for m in parked)
            parts.append(f"parked {sum(m.size for m in parked)} of them while shard(s) {shards} are busy")
        parts += self.merged
        return parts

    def _settle_parts(self) -> list[str]:
        parts = []
        if self.settled_batches:
            parts.append(
                f"settled {self.settled_batches} batch(es): acked {self.acked}, NAKed {self.nacked}, "
                f"dead-lettered {self.dead_lettered}"
            )
        parts += self.bisected
        if self.kept_alive:
            parts.append(f"kept {self.kept_alive} in-flight messages alive")
        return parts
