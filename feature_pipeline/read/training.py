"""Point-in-time training data: every feature as it was at each label's timestamp.

Labels are rows of (user_id, ts, any label columns). Each row gets the registry's features
computed by the same query as the live table, from events with occurred_at <= ts, so nothing
that happened after ts leaks into its features. `received_cutoff=True` also drops events the
stream received after ts (what a model serving at ts could really have seen: late arrivals
are excluded). Naive timestamps are read as UTC.

The store is opened read-only; an ingest run waiting for the file meanwhile waits (up to its
lock timeout), it does not fail. With several shards, each shard's part is joined on its own file and the
parts are merged (`training_set`); on hosts that hold one shard each, `feature-pipeline training-set
--shard K` writes one part where its file is and `--parts` merges them.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from feature_pipeline import settings
from feature_pipeline import shards as feature_shards
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.store.pit import point_in_time
from feature_pipeline.store.registry import Registry

Labels = str | os.PathLike[str] | pd.DataFrame | pa.Table


class LabelsError(ValueError):
    """The labels cannot be used; the text says which column or row."""


def read_labels(labels: Labels) -> pa.Table:
    """Parquet or CSV file (by suffix), pandas DataFrame or Arrow table."""
    if isinstance(labels, pa.Table):
        return labels
    if isinstance(labels, pd.DataFrame):
        return pa.Table.from_pandas(labels, preserve_index=False)
    path = Path(labels)
    if not path.is_file():
        raise LabelsError(f"labels file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
        if suffix in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            # Ids are text: inferred as numbers, "007" would become 7 and match no user.
            types = pacsv.ConvertOptions(column_types={"user_id": pa.string()})
            return pacsv.read_csv(path, parse_options=opts, convert_options=types)
    except (pa.ArrowInvalid, OSError) as exc:
        raise LabelsError(f"cannot read labels {path}: {exc}") from None
    raise LabelsError(f"labels {path}: expected a .parquet or .csv file")


def _ids_as_text(table: pa.Table) -> pa.Table:
    """User ids are text; numeric ones (a Parquet file or DataFrame of integers) are converted, with a warning."""
    if "user_id" not in table.column_names:
        return table
    kind = table.schema.field("user_id").type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return table
    warnings.warn(f"labels column user_id holds {kind}, not text: read as text (007 would be 7)", stacklevel=3)
    i = table.column_names.index("user_id")
    return table.set_column(i, "user_id", pc.cast(table.column("user_id"), pa.string()))


def _check(table: pa.Table, registry: Registry) -> None:
    names = table.column_names
    missing = [c for c in ("user_id", "ts") if c not in names]
    if missing:
        raise LabelsError(
            f"labels need columns user_id and ts; missing {', '.join(missing)} (have: {', '.join(names)})"
        )
    clash = sorted(set(names) & {*registry.names, "__row"})
    if clash:
        raise LabelsError(f"label columns {', '.join(clash)} have the names of features; rename them")
    for col in ("user_id", "ts"):
        nulls = table.column(col).null_count
        if nulls:
            first = pc.index(pc.is_null(table.column(col)), True).as_py()
            raise LabelsError(f"labels column {col} is empty in {nulls} row(s), the first at row {first + 1}")


def training_set(
    labels: Labels,
    *,
    store: FeatureStore | list[FeatureStore] | str | os.PathLike[str] | None = None,
    received_cutoff: bool = False,
    wait_seconds: float = 120.0,
) -> pa.Table:
    """The labels, in their order, with every feature as of each row's ts.

    `store`: a FeatureStore, the shards' FeatureStores, or the path of a DuckDB file read with the configured
    feature registry; by default every shard of the store the configuration names (FEATURE_STORE_PATH,
    FEATURE_PIPELINE_SHARDS, FEATURE_PIPELINE_FEATURES_FILE). With several shards it is a scatter-gather: each
    shard joins the labels of its users on its own file, side by side, and the parts are put back in the
    labels' order; the answer is the one a single store would give."""
    stores = _stores(store)
    table = _ids_as_text(read_labels(labels))
    _check(table, stores[0].registry)
    table = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    if len(stores) == 1:
        return join_part(stores[0], table, received_cutoff, wait_seconds, keep_row=False)
    parts = split_labels(table, stores[0].shards)
    with ThreadPoolExecutor(len(stores)) as pool:  # DuckDB lets go of the GIL: the shards' joins overlap
        done = list(pool.map(lambda s: join_part(s, parts[s.shard], received_cutoff, wait_seconds), stores))
    return merge_parts(done)


def part_of_shard(labels: Labels, store: FeatureStore, received_cutoff: bool = False) -> pa.Table:
    """One shard's part of a training set, joined on its file (its labels, with `__row`): the scatter half of
    `training_set` for hosts that each hold one shard; `merge_parts` is the gather."""
    table = _ids_as_text(read_labels(labels))
    _check(table, store.registry)
    table = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    return join_part(store, split_labels(table, store.shards)[store.shard], received_cutoff, 120.0)


def split_labels(table: pa.Table, shards: int) -> dict[int, pa.Table]:
    """The label rows of each shard's users (every shard gets a part, maybe empty, so its columns are known)."""
    users = [str(u) for u in table.column("user_id").to_pylist()]  # text, not null: `_check` made sure
    of = {u: feature_shards.shard_of(u, shards) for u in set(users)}
    index = pa.array([of[u] for u in users], pa.int32())
    return {k: table.filter(pc.equal(index, pa.scalar(k, pa.int32()))) for k in range(shards)}


def join_part(
    store: FeatureStore, table: pa.Table, received_cutoff: bool, wait_seconds: float, *, keep_row: bool = True
) -> pa.Table:
    """One store's point-in-time join of these labels (with their `__row`), on its own file."""
    con = store.connect(read_only=True, wait_seconds=wait_seconds)
    try:
        con.register("labels_in", table)
        try:
            con.execute(
                "CREATE TEMP TABLE labels AS SELECT * REPLACE "
                "(CAST(user_id AS VARCHAR) AS user_id, CAST(ts AS TIMESTAMPTZ) AS ts) FROM labels_in"
            )
        except duckdb.ConversionException as exc:
            raise LabelsError(f"labels column ts must hold timestamps like 2026-11-27T12:00:00Z: {exc}") from None
        con.unregister("labels_in")
        relation = point_in_time(con, store.registry, "labels", received_cutoff=received_cutoff, keep_row=keep_row)
        joined: pa.Table = relation.to_arrow_table()
        return joined
    finally:
        con.close()


def merge_parts(parts: list[pa.Table]) -> pa.Table:
    """The shards' parts as one table in the labels' order (by `__row`, which is then dropped)."""
    merged = pa.concat_tables(parts, promote_options="permissive")
    merged = merged.take(pc.sort_indices(merged.column("__row")))
    return merged.drop_columns(["__row"])


def _stores(store: FeatureStore | list[FeatureStore] | str | os.PathLike[str] | None) -> list[FeatureStore]:
    if isinstance(store, FeatureStore):
        return [store]
    if isinstance(store, list):
        return store
    cfg = settings.load()
    if store is None:
        missing = [s for s in feature_shards.every_shard(cfg) if not Path(s.feature_store_path).exists()]
        if cfg.shards > 1 and missing:
            raise FileNotFoundError(
                f"the training set joins every shard's store, and {', '.join(s.feature_store_path for s in missing)} "
                "is not on this host: run `feature-pipeline training-set --shard K` where each shard's file is, "
                "then `--parts` to merge them (docs/features.md, Training sets)"
            )
        return [FeatureStore.from_settings(cfg, k) for k in range(cfg.shards)]
    return [FeatureStore(store, registry=FeatureStore.from_settings(cfg).registry)]


def write_table(table: pa.Table, out: str | os.PathLike[str]) -> None:
    """Parquet, or CSV when `out` ends in .csv; written to a temp name, then renamed into place."""
    path = Path(out)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix.lower() == ".csv":
        pacsv.write_csv(table, tmp)
    else:
        pq.write_table(table, tmp)
    os.replace(tmp, path)
