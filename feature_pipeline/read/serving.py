"""Serving reads: `get_features` answers from the online store (JetStream KV), on any host that reaches NATS.

Model servers ask for a few users per request: `get_features` (and `read.online`'s async reader and
in-process replica) read one key per user, so a lookup costs the same at 10 000 users as at 10 M. Bulk
readers (analysis, batch scoring of every user) read the Parquet export instead (`read_export`),
written by `feature-pipeline export` or the export schedule, never per batch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from feature_pipeline import settings, shards
from feature_pipeline.read.online import OnlineReader


class ExportMissing(FileNotFoundError):
    """No Parquet export has been written yet (or the path is wrong)."""


_readers: dict[tuple[str, str], OnlineReader] = {}
_lock = threading.Lock()


def get_features(user_ids: Iterable[str], cfg: settings.Settings | None = None) -> pd.DataFrame:
    """Current features of `user_ids` from the online store: one row per id, in order; an unknown user
    gets an empty (NA) row.

    Columns: user_id, every registry feature, updated_at (when the row was last recomputed) and
    valid_as_of (the clock of the run that wrote it: the row is correct as of then, and stays so until a
    run changes it). NATS_URL, its credentials and NATS_DURABLE_PREFIX come from the environment unless
    `cfg` is given. Raises `OnlineStoreError` within about a second when NATS cannot be reached."""
    cfg = cfg or settings.load()
    where = (cfg.nats_url, cfg.durable_prefix)
    with _lock:
        reader = _readers.get(where)
        if reader is None:
            reader = _readers[where] = OnlineReader(cfg)
    return reader.get_features(user_ids)


def read_export(path: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Every user's row from the Parquet export (FEATURE_PIPELINE_SERVING_PATH by default; with shards, every
    shard's part beside it), for bulk readers; its valid_as_of column is the store's clock when it was written."""
    cfg = settings.load()
    base = Path(path or cfg.serving_path)
    parts = [shards.part_name(base, k, cfg.shards) for k in range(cfg.shards)]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise ExportMissing(
            f"no export at {', '.join(map(str, missing))}: write it with `feature-pipeline export` (or run the "
            "export_user_features job; with shards, each shard writes its part on its host: copy them here); "
            "point lookups read the online store with get_features"
        )
    table = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="permissive")
    if len(parts) > 1:  # in user order, as one store's export is
        table = table.sort_by("user_id")
    return table.to_pandas(types_mapper=pd.ArrowDtype)
