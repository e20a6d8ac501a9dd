"""Redrive: dead letters' originals published again to their subjects, to go through the normal path.

For messages dead-lettered by a cause that has since been fixed (a feature SQL bug, a schema the
contract now accepts). Safe to repeat: each redriven dead letter is recorded in the `redrives`
table (and skipped by later redrives), the copy carries a Nats-Msg-Id the stream deduplicates, and
an event that was stored meanwhile is absorbed by its id. Redriving poison only dead-letters it again.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from feature_pipeline import shards, streams
from feature_pipeline.broker.client import Broker
from feature_pipeline.settings import Settings
from feature_pipeline.store.feature_store import FeatureStore

H_REDRIVEN_FROM = "FP-Redriven-From"
_WHOLE_BODY_NOTE = f"kept whole in object store {streams.DEADLETTER_BODIES}/"


@dataclass(frozen=True)
class RedriveFilter:
    """Which dead letters: every one not yet redriven, narrowed by each filter that is set."""

    reason: str = ""  # a part of the reason, any case
    subject: str = ""  # a NATS subject pattern: signals.task.*, feedback.>
    since: datetime | None = None  # dead-lettered at or after
    until: datetime | None = None  # dead-lettered before
    limit: int = 0  # 0: no limit


@dataclass
class RedriveReport:
    matched: list[dict[str, Any]] = field(default_factory=list)
    redriven: int = 0

    def summary(self, dry_run: bool) -> str:
        verb = "would redrive" if dry_run else f"redrove {self.redriven} of"
        return f"{verb} {len(self.matched)} dead letter(s)"


def parse_time(text: str) -> datetime:
    """ISO 8601 / RFC 3339; a time without a zone is UTC."""
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def subject_regex(pattern: str) -> str:
    """A NATS subject pattern as a regular expression: `*` is one token, a final `>` one or more."""
    tokens = pattern.split(".")
    parts = []
    for i, token in enumerate(tokens):
        if token == ">" and i == len(tokens) - 1:
            parts.append(r"[^.]+(\.[^.]+)*")
        elif token == "*":
            parts.append(r"[^.]+")
        else:
            parts.append(re.escape(token))
    return "^" + r"\.".join(parts) + "$"


def select(store: FeatureStore, f: RedriveFilter) -> list[dict[str, Any]]:
    """The matching dead letters of event streams that were not redriven yet, oldest first."""
    where = ["list_contains($sources, d.original_stream)", "r.original_seq IS NULL"]
    params: dict[str, Any] = {"sources": [s.name for s in store.registry.event_streams]}
    if f.reason:
        where.append("contains(lower(d.reason), lower($reason))")
        params["reason"] = f.reason
    if f.subject:
        where.append("regexp_full_match(d.original_subject, $subject)")
        params["subject"] = subject_regex(f.subject)
    if f.since:
        where.append("d.dead_lettered_at >= $since")
        params["since"] = f.since
    if f.until:
        where.append("d.dead_lettered_at < $until")
        params["until"] = f.until
    sql = (
        "SELECT d.original_stream, d.original_seq, d.original_subject, d.reason, d.dead_lettered_at, d.body "
        f"FROM {streams.DEADLETTER.table} d LEFT JOIN redrives r "
        "ON r.original_stream = d.original_stream AND r.original_seq = d.original_seq "
        f"WHERE {' AND '.join(where)} ORDER BY d.dead_lettered_at, d.original_stream, d.original_seq"
        + (f" LIMIT {int(f.limit)}" if f.limit > 0 else "")
    )
    con = store.connect()  # read-write: a store from before redrive existed gets its `redrives` table
    try:
        cur = con.execute(sql, params)
        names = [c[0] for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


def redrive(settings: Settings, f: RedriveFilter, *, dry_run: bool = False, shard: int | None = None) -> RedriveReport:
    """Publish the matching dead letters' originals again, then record them in `redrives`: of one shard's store,
    or of every shard's (all on this host), oldest first."""
    found: list[tuple[FeatureStore, dict[str, Any]]] = []
    for k in shards.local_shards(settings, shard):
        store = FeatureStore.from_settings(settings, k)
        found += [(store, r) for r in (select(store, f) if store.path.exists() else [])]
    found.sort(key=lambda sr: (sr[1]["dead_lettered_at"], sr[1]["original_stream"], sr[1]["original_seq"]))
    found = found[: f.limit] if f.limit > 0 else found
    report = RedriveReport(matched=[r for _, r in found])
    if dry_run or not found:
        return report
    new_seqs = asyncio.run(_publish(settings, report.matched))
    now = datetime.now(UTC)
    for store in {id(s): s for s, _ in found}.values():
        rows = [(r, seq) for (s, r), seq in zip(found, new_seqs, strict=True) if s is store]
        _record(store, rows, now)
    report.redriven = len(new_seqs)
    return report


def _record(store: FeatureStore, rows: list[tuple[dict[str, Any], int]], now: datetime) -> None:
    con = store.connect()
    try:
        con.executemany(
            "INSERT INTO redrives VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [
                (r["original_stream"], r["original_seq"], r["original_subject"], r["reason"], now, seq)
                for r, seq in rows
            ],
        )
    finally:
        con.close()


async def _publish(settings: Settings, rows: list[dict[str, Any]]) -> list[int]:
    async with await Broker.connect(settings.nats_url, "feature-pipeline-redrive", settings.nats_auth) as broker:
        seqs = []
        for r in rows:
            body = await _whole_body(broker, r)
            headers = {
                "Nats-Msg-Id": f"redrive:{r['original_stream']}:{r['original_seq']}",
                H_REDRIVEN_FROM: f"{r['original_stream']} #{r['original_seq']}",
            }
            ack = await broker.js.publish(r["original_subject"], body, headers=headers)
            seqs.append(int(ack.seq))
        return seqs


async def _whole_body(broker: Broker, row: dict[str, Any]) -> bytes:
    """The body as published: from the object store when it was too large for its dead-letter copy."""
    if _WHOLE_BODY_NOTE not in row["reason"]:
        return bytes(row["body"] or b"")
    store = await broker.js.object_store(streams.DEADLETTER_BODIES)
    found = await store.get(f"{row['original_stream']}.{row['original_seq']}")
    return bytes(found.data or b"")
