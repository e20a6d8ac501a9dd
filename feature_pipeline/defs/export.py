"""The Parquet export of user_features for bulk readers: a job, and an hourly schedule (stopped by default).

Point lookups read the online store; a reader of every user (analysis, batch scoring) reads this file
instead. Writing it costs O(users), so no batch writes it: it is written on demand (this job, or
`feature-pipeline export`) or by the schedule once switched on. With several shards each writes its part,
`<name>.shard-K-of-N.parquet` beside FEATURE_PIPELINE_SERVING_PATH, on its own host; `read_export` reads them all.
"""

import dagster as dg

from feature_pipeline import shards
from feature_pipeline.defs.names import Names, one_op_job
from feature_pipeline.defs.runs import per_shard_schedule, shards_of_run
from feature_pipeline.store.feature_store import FeatureStore


def build_export(names: Names) -> tuple[dg.JobDefinition, dg.ScheduleDefinition]:
    @dg.op(
        name=names.of("export"),
        pool=names.pool,  # a reader of the file waits for (and would delay) a batch's transaction otherwise
        required_resource_keys={names.resource_key},
        description="Write user_features to FEATURE_PIPELINE_SERVING_PATH as Parquet (temp file, then rename).",
    )
    def export_op(context: dg.OpExecutionContext) -> None:
        cfg = names.settings(context)
        for shard in shards_of_run(context, cfg):
            out = shards.for_shard(cfg, shard).serving_path
            rows, as_of = FeatureStore.from_settings(cfg, shard).export(out)
            context.log.info(f"exported {rows} rows (valid as of {as_of}) to {out}")

    export_job = one_op_job(
        names,
        export_op,
        "export",
        "export_user_features",
        "Writes the Parquet export of user_features for bulk readers (point lookups read the online store).",
    )

    schedule = per_shard_schedule(
        names,
        export_job,
        names.of("export_user_features_hourly"),
        "15 * * * *",
        "Every hour at :15, once switched on: refresh the Parquet export for bulk readers.",
    )
    return export_job, schedule
