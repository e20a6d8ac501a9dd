"""`feature-pipeline features | export | training-set`: reading features out, with the configured registry."""

from __future__ import annotations

import argparse
import json
import time

import duckdb
import pyarrow.parquet as pq

from feature_pipeline.broker.auth import redact
from feature_pipeline.cli.common import EXIT_DEGRADED, EXIT_OK, add_shard, fail, load_settings
from feature_pipeline.shards import LayoutError, for_shard, local_shards, part_name, shard_of
from feature_pipeline.store.db import StoreBusy
from feature_pipeline.store.feature_store import FeatureStore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    feat = sub.add_parser(
        "features", help="users' current feature rows from the online store (what get_features returns)"
    )
    feat.add_argument("user_ids", nargs="+", metavar="user_id")
    feat.add_argument(
        "--from-store", action="store_true", help="read the DuckDB store instead (on its host; waits for its lock)"
    )
    feat.set_defaults(func=cmd_features)

    export = sub.add_parser("export", help="write user_features to the Parquet export, for bulk readers")
    export.add_argument(
        "--out", help="the file (default FEATURE_PIPELINE_SERVING_PATH; with shards, each writes its part beside it)"
    )
    add_shard(export)
    export.set_defaults(func=cmd_export)

    train = sub.add_parser("training-set", help="point-in-time features for labels (user_id, ts, ...)")
    train.add_argument("labels", help="a .parquet or .csv file with columns user_id, ts and any label columns")
    train.add_argument("--out", required=True, help="output .parquet (or .csv)")
    train.add_argument(
        "--received-cutoff", action="store_true", help="also exclude events the stream received after each ts"
    )
    train.add_argument(
        "--shard",
        type=int,
        help="join only this shard's labels, on its file here: a part for --parts (on hosts that hold one shard each)",
    )
    train.add_argument("--parts", nargs="+", metavar="PART", help="merge the parts written with --shard into --out")
    train.set_defaults(func=cmd_training_set)


def cmd_features(args: argparse.Namespace) -> int:
    """Prints each user's row as JSON; exits 1 when a user has none, saying where it looked."""
    cfg = load_settings()
    if args.from_store:
        where = cfg.feature_store_path + (f" ({cfg.shards} shards)" if cfg.shards > 1 else "")
        try:
            rows = [FeatureStore.from_settings(cfg, shard_of(u, cfg.shards)).user_features(u) for u in args.user_ids]
        except (FileNotFoundError, StoreBusy) as exc:
            return fail(str(exc))
    else:
        from feature_pipeline.broker.kv import OnlineStoreError, bucket_for
        from feature_pipeline.read.online import OnlineReader

        where = f"the online store {bucket_for(cfg.durable_prefix)} (NATS at {redact(cfg.nats_url)})"
        reader = OnlineReader(cfg)
        try:
            rows = list(reader.get_rows(args.user_ids))
        except OnlineStoreError as exc:
            return fail(str(exc))
        finally:
            reader.close()
    missing = [u for u, r in zip(args.user_ids, rows, strict=True) if r is None]
    for row in rows:
        if row is not None:
            print(json.dumps(row, default=str, indent=2))
    if missing:
        return fail(f"no features for {', '.join(map(repr, missing))} in {where}", EXIT_DEGRADED)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Each shard on this host writes its part (with one store: the file itself)."""
    cfg = load_settings()
    started = time.monotonic()
    try:
        every = local_shards(cfg, args.shard)
    except (LayoutError, ValueError) as exc:
        return fail(str(exc))
    for shard in every:
        out = part_name(args.out, shard, cfg.shards) if args.out else for_shard(cfg, shard).serving_path
        try:
            rows, as_of = FeatureStore.from_settings(cfg, shard).export(out)
        except (FileNotFoundError, StoreBusy, OSError, duckdb.Error) as exc:
            return fail(f"could not write the export {out}: {exc}")
        print(f"wrote {rows} rows (valid as of {as_of}) to {out} in {time.monotonic() - started:.1f} s")
    return EXIT_OK


def cmd_training_set(args: argparse.Namespace) -> int:
    from feature_pipeline.read.training import LabelsError, merge_parts, part_of_shard, training_set, write_table

    cfg = load_settings()
    started = time.monotonic()
    try:
        if args.parts:
            table = merge_parts([pq.read_table(p) for p in args.parts])
        elif args.shard is not None:
            table = part_of_shard(args.labels, FeatureStore.from_settings(cfg, args.shard), args.received_cutoff)
        else:
            table = training_set(args.labels, received_cutoff=args.received_cutoff)
        write_table(table, args.out)
    except (LabelsError, FileNotFoundError, StoreBusy, OSError, ValueError) as exc:
        return fail(str(exc))
    cutoff = " (events received after each ts excluded)" if args.received_cutoff else ""
    what = f"shard {args.shard}'s part: " if args.shard is not None and not args.parts else ""
    print(
        f"wrote {what}{table.num_rows} rows x {table.num_columns} columns to {args.out} "
        f"in {time.monotonic() - started:.1f} s{cutoff}"
    )
    return EXIT_OK
