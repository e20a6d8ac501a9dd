"""The asset graph: the NATS streams (external, observed by the sensor) feed the DuckDB tables.

One multi-asset writes all four tables of a batch in one DuckDB transaction; it sits in the
`duckdb` pool (`<prefix>_duckdb` in a prefixed instance), limited to one at a time in dagster.yaml,
so two runs never fight over the file's write lock. A run does one of three things, chosen by its
tags: store the staged batch named by its batch tag (the sensor's runs), move the window clock (the
schedule's runs), or, launched by hand with neither, rebuild every user_features row.
"""

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import dagster as dg

from feature_pipeline import faults, shards
from feature_pipeline.defs import metadata
from feature_pipeline.defs.checks import Checks
from feature_pipeline.defs.names import AssetJob, Names
from feature_pipeline.defs.runs import BATCH_TAG, CAUSE_KEY, shards_of_run, tagged_shard
from feature_pipeline.defs.snapshots import keep_days_current
from feature_pipeline.ingest import shard_checks
from feature_pipeline.ingest.failures import Cause, cause_of
from feature_pipeline.ingest.online import SyncResult, Writer, sync_with
from feature_pipeline.ingest.poison import Copier
from feature_pipeline.ingest.shared_staging import open_staging
from feature_pipeline.settings import Settings
from feature_pipeline.store.feature_store import BatchResult, FeatureStore, Refresh, StoreHealth
from feature_pipeline.streams import DEADLETTER

REFRESH_TAG = "feature_pipeline/refresh"  # "windows": only move the clock (the schedule's runs)
LOGGED_IDS = 20
RunOutput = Iterator[dg.MaterializeResult | dg.AssetCheckResult]
_CAUSE_WORDS = {
    Cause.MESSAGES: "caused by its messages: their deliveries are spent",
    Cause.INFRASTRUCTURE: "not caused by its messages: the batch stays staged and is retried",
}


def table_specs(names: Names) -> dict[str, dg.AssetSpec]:
    """The DuckDB tables a batch writes, by table name."""
    specs = {
        s.table: dg.AssetSpec(
            names.table(s.table),
            deps=[names.stream(s)],
            description=s.table_description,
            group_name=names.of("feature_store"),
            kinds={"duckdb"},
            skippable=True,  # a window-refresh run observes user_features and materializes nothing
        )
        for s in names.streams
    }
    specs["user_features"] = dg.AssetSpec(
        names.user_features,
        deps=[names.table(s.table) for s in names.sources],
        description="One row per user, every feature of the registry (feature_defs.toml), correct as of the last "
        "run's clock (valid_as_of in the metadata); updated_at is when the row was last recomputed.",
        group_name=names.of("feature_store"),
        kinds={"duckdb"},
        skippable=True,
    )
    return specs


def with_freshness(
    assets_def: dg.AssetsDefinition, key: dg.AssetKey, warn_seconds: int, fail_seconds: int
) -> dg.AssetsDefinition:
    """user_features must be materialized every so often; the freshness daemon grades it."""
    policy = dg.FreshnessPolicy.time_window(
        fail_window=timedelta(seconds=fail_seconds), warn_window=timedelta(seconds=warn_seconds)
    )
    return assets_def.map_asset_specs(
        lambda spec: spec.replace_attributes(freshness_policy=policy) if spec.key == key else spec
    )


class Ingest:
    """One pipeline instance's ingest asset and job: what its runs do, under its names."""

    def __init__(self, names: Names, checks: Checks, shard_count: int = 1) -> None:
        """With several shards the runs of different shards store side by side, so they hold no pool: the run
        tag feature_pipeline/shard limits each shard to one run at a time (dagster.yaml), and with warm workers
        each shard's queue has one worker."""
        self.names, self.checks = names, checks
        self.pool = names.pool if shard_count == 1 else None
        self.specs = table_specs(names)

    def asset(self) -> dg.AssetsDefinition:
        names = self.names

        @dg.multi_asset(
            specs=list(self.specs.values()),
            check_specs=self.checks.in_ingest_runs,
            pool=self.pool,
            can_subset=False,
            name=names.of("ingest_batch"),
            required_resource_keys={names.resource_key},
        )
        def ingest_batch(context: dg.AssetExecutionContext) -> RunOutput:
            """Store the staged batch named by the run's batch tag; without one, move the window clock (tag
            feature_pipeline/refresh=windows) or, launched by hand, rebuild user_features."""
            settings = names.settings(context)
            batch_id = context.run.tags.get(BATCH_TAG)
            if batch_id is not None:
                yield from self.store_batch(context, settings, batch_id, tagged_shard(context, settings) or 0)
                return
            every = shards_of_run(context, settings)
            if context.run.tags.get(REFRESH_TAG) == "windows":
                yield from self.move_clock(context, settings, every)
            else:
                yield from self.rebuild(context, settings, every)

        return ingest_batch

    def job(self, asset: dg.AssetsDefinition) -> AssetJob:
        return dg.define_asset_job(
            self.names.ingest_job,
            # The asset's own checks, not the on-demand ones of user_features (they read the instance, for no batch).
            selection=dg.AssetSelection.assets(asset).without_checks()
            | dg.AssetSelection.checks(*(c.key for c in self.checks.in_ingest_runs)),
            # One process per run: the default multiprocess executor adds ~4 s per micro-batch.
            executor_def=dg.in_process_executor,
            description=f"Stores one staged micro-batch; launched by {self.names.ingest_sensor}, which settles it "
            "afterwards.",
        )

    def store_batch(
        self, context: dg.AssetExecutionContext, settings: Settings, batch_id: str, shard: int
    ) -> RunOutput:
        """The batch's events into its shard's store, or a Failure that says whether its messages caused it
        (which decides whether settling spends their deliveries: see `ingest.failures`)."""
        try:
            outputs = list(self._store_batch(context, settings, batch_id, shard))
        except Exception as exc:
            cause = cause_of(exc)
            raise dg.Failure(
                description=f"storing batch {batch_id} failed ({_CAUSE_WORDS[cause]}): {type(exc).__name__}: {exc}",
                metadata={CAUSE_KEY: cause.value},
            ) from exc
        yield from outputs

    def _store_batch(
        self, context: dg.AssetExecutionContext, settings: Settings, batch_id: str, shard: int
    ) -> RunOutput:
        with open_staging(settings, shard) as staging:
            manifest = staging.manifest(batch_id)
            if manifest is None:
                yield from self._already_settled(context, settings, shard, batch_id, staging.where)
                return
            with staging.local_copy(batch_id) as folder:
                started = time.monotonic()
                store, online = self._store_and_writer(settings, shard)
                result = store.apply_batch(
                    folder,
                    batch_id,
                    consistency_sample=settings.consistency_sample,
                    consistency_every=settings.consistency_every_seconds,
                    before_commit=faults.before_commit(settings.fault_set),
                    after_commit=faults.after_commit(settings.fault_set, store.path, online),
                    dead_letter=Copier(settings),
                    pipeline=settings.durable_prefix,
                )
                applied = time.monotonic() - started
        synced = self._logged(context, online)
        self._log_batch(context, result, settings, shard)
        self._snapshot_days(context, settings)
        context.instance.add_run_tags(context.run_id, metadata.run_tags(result, manifest))
        timing = {"apply_seconds": round(applied, 2), **self._queue_wait(context), **metadata.online(synced)}
        timing.update(metadata.shard(shard, settings.shards))
        for key, extra in metadata.batch_per_table(result, store.registry.event_streams).items():
            asset_key = self.specs[key].key
            if key == "user_features":  # the batch's summary, once: on the asset it describes
                yield dg.MaterializeResult(
                    asset_key=asset_key, metadata={**metadata.batch_common(result, manifest), **timing, **extra}
                )
            elif extra.pop("changed"):  # a table the batch added no row to keeps its last materialization
                yield dg.MaterializeResult(asset_key=asset_key, metadata=extra)
        yield from self._checks(context, settings, shard, result.health, synced)

    def _checks(
        self, context: dg.AssetExecutionContext, settings: Settings, shard: int, health: StoreHealth, synced: SyncResult
    ) -> Iterator[dg.AssetCheckResult]:
        """The store checks of one shard's run, graded over every shard (see `ingest.shard_checks`)."""
        health, synced, problem = shard_checks.share(settings, shard, health, synced)
        if problem:
            context.log.warning(f"{problem}; the checks grade shard {shard} alone this run")
        yield from self.checks.store_results(health, settings)
        yield self.checks.online_result(synced)

    def _snapshot_days(self, context: dg.AssetExecutionContext, settings: Settings) -> None:
        """List the snapshot days the stored history now reaches (older events may just have arrived). The
        batch is stored whatever happens here: a failure is logged and the next run or monitor tick retries."""
        try:
            added = keep_days_current(context.instance, self.names, settings)
        except Exception as exc:
            context.log.warning(f"could not list the new snapshot days in Dagster: {type(exc).__name__}: {exc}")
            return
        if added:
            context.log.info(added)

    @staticmethod
    def _queue_wait(context: dg.AssetExecutionContext) -> dict[str, float]:
        """Seconds from the run's creation (the sensor's request) to its start: what the run list's duration hides."""
        record = context.instance.get_run_record_by_id(context.run_id)
        if record is None or record.start_time is None:
            return {}
        return {"queue_wait_seconds": round(record.start_time - record.create_timestamp.timestamp(), 2)}

    def _already_settled(
        self, context: dg.AssetExecutionContext, settings: Settings, shard: int, batch_id: str, where: str
    ) -> Iterator[dg.AssetCheckResult]:
        """A re-execution of a run whose batch the sensor has already settled: nothing to do, and not a failure."""
        store, online = self._store_and_writer(settings, shard)
        stored_at, health = store.batch_state(batch_id, settings.consistency_sample)
        sync_with(online, store)  # the rows of a run that died after its commit
        synced = self._logged(context, online)
        what = (
            f"was stored at {stored_at.isoformat()} and acked"
            if stored_at
            else "was never stored: its messages went back to NATS and are stored by a later batch"
        )
        context.log.warning(f"nothing to do: batch {batch_id} is no longer staged in {where}; it {what}")
        yield from self._checks(context, settings, shard, health, synced)

    def _log_batch(
        self, context: dg.AssetExecutionContext, result: BatchResult, settings: Settings, shard: int
    ) -> None:
        self._log_refresh(context, result.refresh)
        if result.late_events:
            context.log.warning(
                f"{result.late_events} event(s) arrived more than {settings.allowed_lateness_seconds} s after they "
                f"occurred (up to {result.max_lateness_seconds:.0f} s), on {', '.join(result.late_days)}: stored and "
                "counted; snapshots of those days taken before now miss them until backfilled"
            )
        shown = ", ".join(result.event_ids[:LOGGED_IDS])
        took = ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in result.seconds.items())
        more = len(result.event_ids) - LOGGED_IDS
        of = shards.describe(shard, settings.shards)
        context.log.info(
            f"stored batch {result.batch_id}{f' in {of}' if of else ''}: {result.events_in_batch} events "
            f"({result.new_summary()}, "
            f"{result.duplicates_absorbed} duplicates absorbed), "
            f"{len(result.poison)} poison (copied to DEADLETTER), "
            f"{result.dead_letters_inserted} dead letters, {result.conflicting_duplicates} conflicting duplicates, "
            f"{result.users_touched} users refreshed; took {took}; "
            f"events: {shown}{f' and {more} more' if more > 0 else ''}"
        )

    def move_clock(
        self, context: dg.AssetExecutionContext, settings: Settings, every: list[int]
    ) -> Iterator[dg.AssetCheckResult]:
        """The window refresh of each shard the run works on: rows change as time passes, but no data arrived, so
        user_features gets an observation, not a materialization: its freshness keeps telling whether ingest is
        alive."""
        done = self._refresh_each(context, settings, every, rebuild=False)
        for shard, refresh, _, synced in done:
            meta = {**metadata.refresh(refresh), **metadata.online(synced), **metadata.shard(shard, settings.shards)}
            context.log_event(dg.AssetObservation(asset_key=self.names.user_features, metadata=meta))
        yield from self._checks_of(context, settings, [(k, h, s) for k, _, h, s in done])

    def rebuild(self, context: dg.AssetExecutionContext, settings: Settings, every: list[int]) -> RunOutput:
        """Every user_features row recomputed from the raw tables, in each shard the run works on (a
        materialization by hand, no batch)."""
        done = self._refresh_each(context, settings, every, rebuild=True)
        health = StoreHealth.combine([h for _, _, h, _ in done])
        synced = SyncResult.combine([s for _, _, _, s in done])
        for key, spec in self.specs.items():
            meta: dict[str, Any] = {"refresh": "rebuild"}
            if key == "user_features":
                meta.update(
                    {**metadata.refresh(Refresh.combine([r for _, r, _, _ in done])), **metadata.online(synced)}
                )
            if key == DEADLETTER.table:
                meta.update(metadata.dead_letters(health))
            yield dg.MaterializeResult(asset_key=spec.key, metadata=meta)
        yield from self._checks_of(context, settings, [(k, h, s) for k, _, h, s in done])

    def _refresh_each(
        self, context: dg.AssetExecutionContext, settings: Settings, every: list[int], *, rebuild: bool
    ) -> list[tuple[int, Refresh, StoreHealth, SyncResult]]:
        """Each shard's clock moved to now (or, with `rebuild`, every row recomputed), and its changed rows
        written to the online store."""
        done = []
        for shard in every:
            store, online = self._store_and_writer(settings, shard)
            sample = settings.consistency_sample
            if rebuild:
                refresh, health = store.recompute_all(sample, after_commit=online)
            else:
                refresh, health = store.advance(consistency_sample=sample, after_commit=online)
            synced = self._logged(context, online)
            self._log_refresh(context, refresh)
            of = shards.describe(shard, settings.shards)
            at, n = refresh.valid_as_of.isoformat(), refresh.rows_written
            context.log.info(
                f"rebuilt user_features{f' of {of}' if of else ''} as of {at}: {n} rows recomputed from the raw tables"
                if rebuild
                else f"moved the clock{f' of {of}' if of else ''} to {at}: {n} rows whose windows moved were recomputed"
            )
            done.append((shard, refresh, health, synced))
        return done

    def _checks_of(
        self, context: dg.AssetExecutionContext, settings: Settings, done: list[tuple[int, StoreHealth, SyncResult]]
    ) -> Iterator[dg.AssetCheckResult]:
        """A run of one shard grades every shard through the others' published figures; a run of every shard
        has them all."""
        if len(done) == 1:
            yield from self._checks(context, settings, *done[0])
            return
        yield from self.checks.store_results(StoreHealth.combine([h for _, h, _ in done]), settings)
        yield self.checks.online_result(SyncResult.combine([s for _, _, s in done]))

    @staticmethod
    def _store_and_writer(settings: Settings, shard: int) -> tuple[FeatureStore, Writer]:
        """A shard's store, and what writes the rows a run changed to the online store right after its commit,
        on the same connection, before the run reports success (see `ingest.online`)."""
        store = FeatureStore.from_settings(settings, shard)
        compare, every = settings.consistency_sample, settings.consistency_every_seconds
        return store, Writer(settings, store, compare=compare, compare_every=every)

    @staticmethod
    def _logged(context: dg.AssetExecutionContext, online: Writer) -> SyncResult:
        synced = online.result
        assert synced is not None, "the store did not call the online writer after its commit"
        context.log.info(
            f"online store {synced.bucket}: wrote {synced.written} rows"
            + (f", deleted {synced.deleted} keys" if synced.deleted else "")
            + (" (every row: the bucket had no state)" if synced.everything else "")
            + f" in {synced.seconds:.2f} s"
        )
        return synced

    @staticmethod
    def _log_refresh(context: dg.AssetExecutionContext, refresh: Refresh) -> None:
        for line in refresh.sources_changed:
            context.log.warning(line)
        if refresh.schema_changes:
            context.log.info(
                "feature definitions changed (" + "; ".join(refresh.schema_changes) + "): rebuilt every row"
            )
