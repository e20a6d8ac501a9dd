"""The redrive job: dead letters' originals published again (see feature_pipeline.ingest.redrive).

Launch it from the UI (Jobs > redrive_dead_letters > Launchpad) with config like
`ops: {redrive: {config: {reason: "fail-marked", dry_run: false}}}`. dry_run is true unless set, so
launching it with the defaults only lists what would be redriven. It holds the `duckdb` pool, as it
records what it redrove in the store.
"""

from datetime import datetime

import dagster as dg

from feature_pipeline import shards
from feature_pipeline.defs.names import Names, one_op_job
from feature_pipeline.defs.runs import tagged_shard
from feature_pipeline.ingest.redrive import RedriveFilter, parse_time, redrive

LISTED = 50  # dead letters named one by one in the run log


class RedriveConfig(dg.Config):
    """Filters (all optional): a part of the reason, a NATS subject pattern, dead-lettered from `since`
    and before `until` (RFC 3339), at most `limit` (0: all). dry_run lists without publishing."""

    reason: str = ""
    subject: str = ""
    since: str | None = None
    until: str | None = None
    limit: int = 0
    dry_run: bool = True


def _time(name: str, raw: str | None) -> datetime | None:
    try:
        return parse_time(raw) if raw else None
    except ValueError:
        example = "2026-11-27T00:00:00Z"
        raise dg.Failure(f"redrive config: {name} must be an RFC 3339 time like {example}, got {raw!r}") from None


def build_redrive(names: Names) -> dg.JobDefinition:
    @dg.op(
        name=names.of("redrive"),
        pool=names.pool,
        required_resource_keys={names.resource_key},
        description="Publish the matching dead letters' originals again and record them.",
    )
    def redrive_op(context: dg.OpExecutionContext, config: RedriveConfig) -> None:
        f = RedriveFilter(
            config.reason, config.subject, _time("since", config.since), _time("until", config.until), config.limit
        )
        settings = names.settings(context)
        try:
            report = redrive(settings, f, dry_run=config.dry_run, shard=tagged_shard(context, settings))
        except shards.LayoutError as exc:
            raise dg.Failure(str(exc)) from None
        for r in report.matched[:LISTED]:
            context.log.info(f"{r['original_stream']} #{r['original_seq']} {r['original_subject']}: {r['reason']}")
        context.log.info(report.summary(config.dry_run))

    redrive_job = one_op_job(
        names,
        redrive_op,
        "redrive",
        "redrive_dead_letters",
        "Publish dead letters' originals again (filters and dry_run in the config; dry_run by default).",
    )

    return redrive_job
