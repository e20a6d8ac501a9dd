"""Serving reads: current features from the Parquet copy each run publishes, never from DuckDB.

A model server must not wait on (or block) the DuckDB writer, so every successful run writes
`user_features` to a temp file and renames it over FEATURE_PIPELINE_SERVING_PATH (rename is
atomic on one filesystem: a reader sees the old copy or the new one, never half of one).
The copy is loaded once and reloaded when the file changes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from feature_pipeline import settings


class ServingCopyMissing(FileNotFoundError):
    """No run has published the serving copy yet (or the path is wrong)."""


class FeatureReader:
    """Point lookups on the serving copy; safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._frame: pd.DataFrame | None = None

    def _load(self) -> pd.DataFrame:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise ServingCopyMissing(
                f"no serving copy at {self.path}: it is written after each successful ingest run "
                "(check FEATURE_PIPELINE_SERVING_PATH and that the pipeline has run)"
            ) from None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if key != self._key or self._frame is None:
                # The inode changes on every publish (rename), so an open handle never sees a mix.
                # Arrow-backed dtypes: integer features stay integers when unknown users add empty rows.
                self._frame = pq.read_table(self.path).to_pandas(types_mapper=pd.ArrowDtype).set_index("user_id")
                self._key = key
            return self._frame

    def get(self, user_ids: Iterable[str]) -> pd.DataFrame:
        """One row per requested id, in order; unknown users get empty (NA) features."""
        frame = self._load()
        ids = [str(u) for u in user_ids]
        out = frame.reindex(ids)
        out.index.name = "user_id"
        return out.reset_index()


_readers: dict[str, FeatureReader] = {}


def get_features(user_ids: Iterable[str], path: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Current features of `user_ids` from the serving copy (FEATURE_PIPELINE_SERVING_PATH by default).

    Columns: user_id, every registry feature, updated_at (when the row was last recomputed) and
    valid_as_of (the clock of the run that published the copy: every row is correct as of it).
    """
    where = str(path or settings.load().serving_path)
    reader = _readers.get(where)
    if reader is None:
        reader = _readers.setdefault(where, FeatureReader(where))
    return reader.get(user_ids)
