"""`feature-pipeline features | serve | training-set`: reading features out, with the configured registry."""

from __future__ import annotations

import argparse
import json
import time

from feature_pipeline.cli.common import EXIT_DEGRADED, EXIT_OK, fail, load_settings
from feature_pipeline.store.db import StoreBusy
from feature_pipeline.store.feature_store import FeatureStore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    feat = sub.add_parser("features", help="print one user's feature row")
    feat.add_argument("user_id")
    feat.set_defaults(func=cmd_features)

    serve = sub.add_parser("serve", help="current features from the serving copy (what get_features returns)")
    serve.add_argument("user_ids", nargs="+")
    serve.set_defaults(func=cmd_serve)

    train = sub.add_parser("training-set", help="point-in-time features for labels (user_id, ts, ...)")
    train.add_argument("labels", help="a .parquet or .csv file with columns user_id, ts and any label columns")
    train.add_argument("--out", required=True, help="output .parquet (or .csv)")
    train.add_argument(
        "--received-cutoff", action="store_true", help="also exclude events the stream received after each ts"
    )
    train.set_defaults(func=cmd_training_set)


def cmd_features(args: argparse.Namespace) -> int:
    cfg = load_settings()
    try:
        row = FeatureStore.from_settings(cfg).user_features(args.user_id)
    except (FileNotFoundError, StoreBusy) as exc:
        return fail(str(exc))
    if row is None:
        return fail(f"no features for user {args.user_id!r} in {cfg.feature_store_path}", EXIT_DEGRADED)
    print(json.dumps(row, default=str, indent=2))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from feature_pipeline.read.serving import ServingCopyMissing, get_features

    cfg = load_settings()
    try:
        frame = get_features(args.user_ids, path=cfg.serving_path)
    except ServingCopyMissing as exc:
        return fail(str(exc))
    print(frame.to_json(orient="records", date_format="iso", indent=2))
    return EXIT_OK


def cmd_training_set(args: argparse.Namespace) -> int:
    from feature_pipeline.read.training import LabelsError, training_set, write_table

    store = FeatureStore.from_settings(load_settings())
    started = time.monotonic()
    try:
        table = training_set(args.labels, store=store, received_cutoff=args.received_cutoff)
        write_table(table, args.out)
    except (LabelsError, FileNotFoundError, StoreBusy, OSError) as exc:
        return fail(str(exc))
    cutoff = " (events received after each ts excluded)" if args.received_cutoff else ""
    print(
        f"wrote {table.num_rows} rows x {table.num_columns} columns to {args.out} "
        f"in {time.monotonic() - started:.1f} s{cutoff}"
    )
    return EXIT_OK
