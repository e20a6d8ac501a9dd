"""Which days user_feature_snapshots can be made for, and keeping Dagster's list of them current.

The days run from the store's first day (the earliest stored event's day, `store.first_day`; or
FEATURE_PIPELINE_SNAPSHOT_START when set) to yesterday, the last day that is over. They are Dagster
dynamic partitions, not a daily partitions definition: a time window's start is fixed when the code
location loads, so days that become reachable later (a new store replaying weeks of retained events, older
events arriving after the store was made) would need a reload to appear. Dynamic partitions are read from
the instance each time, so the ingest runs and the stream monitor add the days as the history grows, and
the UI and the CLI see them at once. A fresh install stores no event yet and so offers no day.

Plain Python: `instance` is anything with Dagster's get/add/delete_dynamic_partitions (the DagsterInstance).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from feature_pipeline import shards
from feature_pipeline.settings import Settings
from feature_pipeline.store.first_day import read_first_day

START_SETTING = "FEATURE_PIPELINE_SNAPSHOT_START"


def yesterday(now: datetime | None = None) -> date:
    """The last day that is over (UTC): the last day a snapshot can be made for."""
    return (now or datetime.now(UTC)).astimezone(UTC).date() - timedelta(days=1)


def first_day(settings: Settings) -> tuple[date | None, str]:
    """The first day snapshots can be made for, and where it comes from, in words (None: no event stored)."""
    if settings.snapshot_start:
        return date.fromisoformat(settings.snapshot_start), f"{START_SETTING}={settings.snapshot_start}"
    days = [read_first_day(s.feature_store_path) for s in shards.every_shard(settings)]
    recorded = min((d for d in days if d), default=None)
    where = f"the day of the earliest event stored in {_stores(settings)}"
    return (date.fromisoformat(recorded), where) if recorded else (None, where)


def _stores(settings: Settings) -> str:
    n = settings.shards
    return settings.feature_store_path if n == 1 else f"the {n} shards of {settings.feature_store_path}"


def available(settings: Settings, now: datetime | None = None) -> list[str]:
    """Every day a snapshot can be made for now, oldest first."""
    first, _ = first_day(settings)
    return days_between(first, yesterday(now)) if first else []


def days_between(first: date, last: date) -> list[str]:
    return [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]


def refusal(start: date, end: date, settings: Settings, now: datetime | None = None) -> str | None:
    """Why start..end cannot be snapshotted, in words a user can act on; None when it can."""
    first, where = first_day(settings)
    last = yesterday(now)
    if end < start:
        return f"the range {start}..{end} ends before it starts"
    if first is None:
        return (
            f"no snapshot day yet: no event is stored in {_stores(settings)}, and the days begin with the "
            f"earliest stored event's day; let the ingest sensor store events first, or set {START_SETTING}=YYYY-MM-DD"
        )
    if start < first:
        return (
            f"{start} is before the first snapshot day, {first} ({where}); request {first} or later, or set "
            f"{START_SETTING}={start} to offer earlier days (their snapshots hold only the events stored before them)"
        )
    if end > last:
        return f"{end} is not over yet: the last snapshot day is yesterday, {last} (UTC)"
    return None


def register(instance: Any, partitions: str, wanted: list[str]) -> list[str]:
    """Add the wanted days Dagster does not list yet (returns them), keeping the list in day order: Dagster
    lists dynamic partitions in the order they were added, so days older than listed ones are added with
    the later ones re-added after them (their materializations are kept; they are recorded by key)."""
    have = list(instance.get_dynamic_partitions(partitions))
    missing = sorted(set(wanted) - set(have))
    if not missing:
        return []
    later = [day for day in have if day > missing[0]]
    for day in later:
        instance.delete_dynamic_partition(partitions, day)
    instance.add_dynamic_partitions(partitions, sorted({*later, *missing}))
    return missing
