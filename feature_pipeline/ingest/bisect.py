"""Bisecting a batch whose run failed because of its messages, until the failing ones are alone.

Storing a batch is deterministic, so when a run fails because of its messages (see `failures`),
the same batch would fail again on every retry and take all its messages towards the dead letter.
Instead the batch is staged again as two halves, each with its own run; a half that succeeds is
acked, a half that fails is split again. Only a batch of one message that fails spends its
delivery (NAK, then the dead letter with the run's error as the reason), as AWS Lambda's stream
sources do with BisectBatchOnFunctionError. A batch of N messages with one culprit is settled in
about 2·log2(N) runs.

The halves' ids are derived from the batch's, so a split that was interrupted (a crash between
writing the halves and removing the batch) is finished, not done twice.
"""

from __future__ import annotations

from feature_pipeline.ingest.staging import BatchWriter, Manifest, Staging, delivery_from_row


def halves_of(batch_id: str) -> tuple[str, str]:
    return f"{batch_id}-a", f"{batch_id}-b"


def split(staging: Staging, manifest: Manifest, chunk: int) -> list[Manifest]:
    """Stage the batch's messages as two halves (the first `size // 2` rows, then the rest) and remove it."""
    ids = halves_of(manifest.batch_id)
    found = [staging.manifest(i) for i in ids]
    writers: list[BatchWriter | None] = [None if f else staging.writer(i) for f, i in zip(found, ids, strict=True)]
    first = manifest.size // 2
    try:
        seen = 0
        for rows in staging.iter_deliveries(manifest.batch_id, chunk=chunk):
            parts = (rows[: max(first - seen, 0)], rows[max(first - seen, 0) :])
            for writer, part in zip(writers, parts, strict=True):
                if writer is not None and part:
                    writer.add([delivery_from_row(r) for r in part])
            seen += len(rows)
        halves = [f or _close(w) for f, w in zip(found, writers, strict=True)]
    except BaseException:
        for w in writers:
            if w is not None:
                w.abort()
        raise
    staging.remove(manifest.batch_id)
    return halves


def _close(writer: BatchWriter | None) -> Manifest:
    assert writer is not None
    return writer.close()
