"""The replay job: re-read a range of a stream and store it idempotently (see feature_pipeline.replay).

Launch it from the UI (Jobs > replay_stream > Launchpad) with config like
`ops: {replay_range: {config: {stream: SIGNALS, start_seq: 1}}}`. It holds the `duckdb` pool
like an ingest run, so live ingest waits for it rather than failing.
"""

from datetime import datetime
from pathlib import Path

import dagster as dg

from feature_pipeline.defs.names import Names, one_op_job
from feature_pipeline.defs.runs import shards_of_run
from feature_pipeline.ingest.online import sync
from feature_pipeline.ingest.replay import ReplayError, ReplayRange, ReplayReport, replay
from feature_pipeline.store.feature_store import FeatureStore


class ReplayConfig(dg.Config):
    """stream: a source's stream (SIGNALS, FEEDBACK, …) or DEADLETTER; start at start_seq or start_time
    (RFC 3339), default the first message; stop at end_seq or end_time, default the last message when the
    run starts."""

    stream: str
    start_seq: int | None = None
    start_time: str | None = None
    end_seq: int | None = None
    end_time: str | None = None
    chunk: int = 50_000


def _time(name: str, raw: str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        raise ReplayError(f"{name} must be an RFC 3339 time like 2026-11-27T00:00:00Z, got {raw!r}") from None


def build_replay(names: Names) -> dg.JobDefinition:
    @dg.op(
        name=names.of("replay_range"),
        pool=names.pool,
        required_resource_keys={names.resource_key},
        description="Read the range with an ephemeral ordered consumer and store it.",
    )
    def replay_range(context: dg.OpExecutionContext, config: ReplayConfig) -> None:
        rng = _range(config, names)
        settings = names.settings(context)
        stores = [FeatureStore.from_settings(settings, k) for k in shards_of_run(context, settings)]
        report = replay(
            settings.nats_url,
            settings.nats_auth,
            stores,
            rng,
            chunk=max(1, config.chunk),
            work_root=Path(settings.staging_dir).parent / "replay-work",
            run_id=context.run.run_id[:8],
            log=context.log.info,
        )
        for store in stores:  # replay ends with a rebuild of every row
            synced = sync(settings, store)
            context.log.info(
                f"online store {synced.bucket}: wrote {synced.written} rows, deleted {synced.deleted} keys"
                + (f" ({store.name})" if settings.shards > 1 else "")
            )
        _record(context, names, rng, report)

    replay_stream = one_op_job(
        names, replay_range, "replay_range", "replay_stream", "Re-read a stream range into the store, idempotently."
    )

    return replay_stream


def _range(config: ReplayConfig, names: Names) -> ReplayRange:
    """The range asked for; the stream's name in any case (`signals` is SIGNALS)."""
    known = {s.name.lower(): s.name for s in names.streams}
    try:
        rng = ReplayRange(
            known.get(config.stream.lower(), config.stream),
            config.start_seq,
            _time("start_time", config.start_time),
            config.end_seq,
            _time("end_time", config.end_time),
        )
        rng.check(names.sources)
    except ReplayError as exc:
        raise dg.Failure(f"replay config: {exc}") from None
    return rng


def _record(context: dg.OpExecutionContext, names: Names, rng: ReplayRange, report: ReplayReport) -> None:
    """The run log says what was restored; the stream's table and user_features get a materialization."""
    context.log.info(
        f"replay of {rng.stream} done ({report.stopped}): read {report.read} messages "
        f"(#{report.first_seq}-#{report.last_seq}), {report.stored} were missing and are stored now, "
        f"{report.already_stored} were already stored, {report.poison} poison (not dead-lettered again)"
    )
    for example in report.poison_examples:
        context.log.warning(f"poison in the replayed range: {example}")
    meta = {
        "replayed_from_seq": report.first_seq or 0,
        "replayed_to_seq": report.last_seq or 0,
        "messages_read": report.read,
        "restored": report.stored,
        "already_stored": report.already_stored,
        "poison": report.poison,
    }
    for key in (names.table(names.by_name(rng.stream).table), names.user_features):
        context.log_event(dg.AssetMaterialization(asset_key=key, metadata=meta))
