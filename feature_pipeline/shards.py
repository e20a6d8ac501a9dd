"""Which store a user belongs to: the shard map, and where each shard keeps its files.

With FEATURE_PIPELINE_SHARDS=N the users are split across N stores, each its own DuckDB file with its own
staged batches and its own single writer. Every feature is per user and a point-in-time join reads one
user's events, so nothing crosses between shards.

The map is `crc32(utf-8 bytes of user_id) mod N`: CRC-32 (IEEE 802.3, zlib's) is a fixed standard, so the
same id maps to the same shard on every host, every Python version and every release of this package
(Python's own `hash()` of a string changes from process to process). Changing N moves users between shards,
so it is never done silently: the layout is recorded (in each store file and beside the online store) and a
different N is refused until `feature-pipeline reshard` has rebuilt the stores.

A message is routed by the `user_id` of its JSON body, read as the contract's models read it (the last of
duplicate keys wins, escapes decoded); a body with no string `user_id` (poison, mostly) goes to shard 0,
whose run dead-letters it. Dead-letter copies follow their original's body, so a dead letter is recorded in
the shard of the user it was about.

N = 1 is the layout the pipeline always had: FEATURE_STORE_PATH itself, the staging folder itself.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from feature_pipeline.settings import Settings

HASH = "crc32-utf8"  # recorded with the layout: a future map under another name is refused, not mixed
SHARD_TAG = "feature_pipeline/shard"  # the run tag that names a run's shard (N > 1)
_PART = re.compile(r"\.shard-(\d+)-of-(\d+)$")


class LayoutError(RuntimeError):
    """The stores were made for another number of shards; the text says what to do."""


def shard_of(user_id: str, shards: int) -> int:
    """The shard of a user id (see the module docstring)."""
    if shards <= 1:
        return 0
    return zlib.crc32(user_id.encode("utf-8", "surrogatepass")) % shards


def routing_user(body: bytes) -> str | None:
    """The user id a message is routed by: its body's top-level string `user_id`, or None."""
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses and Python's parser reads (NaN, Infinity, lone surrogates): the models decide
            doc = json.loads(body)
        except (ValueError, RecursionError):
            return None
    user = doc.get("user_id") if isinstance(doc, dict) else None
    return user if isinstance(user, str) else None


def shard_of_body(body: bytes, shards: int) -> int:
    if shards <= 1:
        return 0
    user = routing_user(body)
    return 0 if user is None else shard_of(user, shards)


def split(bodies: Sequence[bytes], shards: int) -> list[int]:
    """The shard of each body, in order."""
    return [shard_of_body(b, shards) for b in bodies]


# -- where a shard keeps its files -----------------------------------------------------------------------


def part_name(path: str | Path, shard: int, shards: int) -> Path:
    """`feature_store.duckdb` -> `feature_store.shard-1-of-2.duckdb`; the path itself when N = 1. N is in the
    name, so the files of another layout are never opened as this one's."""
    path = Path(path)
    if shards <= 1:
        return path
    suffix = "".join(path.suffixes[-1:])
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f"{stem}.shard-{shard}-of-{shards}{suffix}")


def staging_dir(root: str | Path, shard: int, shards: int) -> Path:
    """A shard's staged batches: the staging folder itself when N = 1, else `shard-K-of-N/` in it."""
    return Path(root) if shards <= 1 else Path(root) / f"shard-{shard}-of-{shards}"


def for_shard(settings: Settings, shard: int) -> Settings:
    """The settings of one shard: its store file, its Parquet export part and its archive folder. Everything
    that works on one store (the run, snapshots, archive, export, replay, redrive) takes these."""
    n = settings.shards
    if not 0 <= shard < n:
        raise ValueError(f"shard {shard} does not exist: FEATURE_PIPELINE_SHARDS={n} has shards 0..{n - 1}")
    if n == 1:
        return settings
    return dataclasses.replace(
        settings,
        feature_store_path=str(part_name(settings.feature_store_path, shard, n)),
        serving_path=str(part_name(settings.serving_path, shard, n)),
        archive_path=str(Path(settings.archive_path) / f"shard-{shard}-of-{n}"),
    )


def every_shard(settings: Settings) -> list[Settings]:
    return [for_shard(settings, k) for k in range(settings.shards)]


def layouts_beside(store_path: str | Path) -> dict[int, list[Path]]:
    """Store files in the folder of FEATURE_STORE_PATH, by the number of shards they were made for."""
    base = Path(store_path)
    found: dict[int, list[Path]] = {}
    if base.exists():
        found[1] = [base]
    if not base.parent.is_dir():
        return found
    suffix = "".join(base.suffixes[-1:])
    stem = base.name[: len(base.name) - len(suffix)] if suffix else base.name
    for entry in sorted(base.parent.glob(f"{stem}.shard-*-of-*{suffix}")):
        match = _PART.search(entry.name[: len(entry.name) - len(suffix)] if suffix else entry.name)
        if match and entry.name.startswith(stem + "."):
            found.setdefault(int(match.group(2)), []).append(entry)
    return found


def local_layout_problem(settings: Settings) -> str | None:
    """Why this host's store files say the shards changed, or None (see `new_file_problem`)."""
    return new_file_problem(settings.feature_store_path, settings.shards)


def new_file_problem(store_path: str | Path, shards: int) -> str | None:
    """Why no store of `shards` shards may be made beside FEATURE_STORE_PATH, or None: files of another layout
    are there and none of this one. (A host that holds some of this layout's files is on it; a fresh host, or
    one that holds other shards' files only, holds none of another layout.)"""
    found = layouts_beside(store_path)
    if found.get(shards):
        return None
    other = sorted(n for n in found if n != shards)
    if not other:
        return None
    files = ", ".join(str(p) for n in other for p in found[n])
    return refusal(shards, other[0], f"this host holds {files}")


def refusal(wanted: int, recorded: int, evidence: str) -> str:
    """The words of a refused change of N: what was found, and the two ways on."""
    return (
        f"FEATURE_PIPELINE_SHARDS={wanted}, but the feature store is split into {recorded} shard(s) ({evidence}): "
        f"changing the number of shards moves users between stores, so it is not done silently. Set "
        f"FEATURE_PIPELINE_SHARDS={recorded} again, or stop ingestion and run `feature-pipeline reshard --to "
        f"{wanted}` (docs/deploy.md, Shards)"
    )


QUEUE_TAG = "dagster-celery/queue"  # dagster-celery's: the Celery queue a run is sent to


def queue_of(queue: str, shard: int, shards: int) -> str:
    """The Celery queue of a shard's runs: one worker, the one that owns the shard's file, serves it."""
    return queue if shards <= 1 else f"{queue}-shard-{shard}"


def run_tags(settings: Settings, shard: int) -> dict[str, str]:
    """The tags that send a run to a shard's store: its shard, and with warm workers its worker's queue. None
    with one store, whose runs carry the tags they always did."""
    if settings.shards <= 1:
        return {}
    tags = {SHARD_TAG: str(shard)}
    if settings.celery_queue:
        tags[QUEUE_TAG] = queue_of(settings.celery_queue, shard, settings.shards)
    return tags


def local_shards(settings: Settings, tagged: int | None = None) -> list[int]:
    """The shards a run works on: the one its tag names; without a tag, every shard, which must all be on this
    host (one box). On a host that holds only some of them that is an error naming the tag to set: a store is
    never made where its shard does not live."""
    if tagged is not None:
        for_shard(settings, tagged)  # a shard that exists
        return [tagged]
    every = list(range(settings.shards))
    if settings.shards == 1:
        return every
    here = [k for k in every if Path(for_shard(settings, k).feature_store_path).exists()]
    if here and len(here) < len(every):
        missing = ", ".join(str(k) for k in every if k not in here)
        raise LayoutError(
            f"this run works on every shard, but the store of shard(s) {missing} is not on this host: run it once per "
            f"shard with the run tag {SHARD_TAG}=<shard> (the schedules do), so it goes to the worker that owns it"
        )
    return every


def describe(shard: int, shards: int) -> str:
    """`shard 1 of 2`, for log lines and check descriptions; empty when there is one store."""
    return f"shard {shard} of {shards}" if shards > 1 else ""
