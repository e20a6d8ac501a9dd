"""A staged batch's raw messages into typed events, in the run: one vectorized pass in DuckDB, pydantic for the rest.

The sensor stages what it pulled as it came (bodies and NATS metadata, no parsing), so the per-message
work happens here, in the run's process, on the other core. DuckDB checks every body at once and
accepts a message only when it is certain the contract's models would accept it and store the same
values; whatever it is not certain of (a team's own models, non-ASCII names, floats, escapes, unusual
timestamps, poison) goes through `envelopes.validate`, message by message, which decides and words the
reason. The SQL must never accept what the models reject: `test_intake.py` compares the two on every
shape of body it can make.

Messages of the DEADLETTER stream become `dead_letters` rows; those another pipeline wrote (its
`FP-Pipeline` header) are acked with the batch but recorded by that pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import annotated_types
import duckdb
import pyarrow as pa
from pydantic import BaseModel

from feature_pipeline import streams
from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.contract import Contract
from feature_pipeline.envelopes import Envelope, PoisonMessage, Rule
from feature_pipeline.ingest.staging import delivery_from_row
from feature_pipeline.shards import shard_of
from feature_pipeline.streams import StreamSpec

_EVENT_FIELDS: list[tuple[str, pa.DataType]] = [
    ("stream", pa.string()),
    ("subject", pa.string()),
    ("stream_seq", pa.int64()),
    ("num_delivered", pa.int32()),
    ("received_at", pa.timestamp("us", tz="UTC")),
    ("event_id", pa.string()),
    ("type", pa.string()),
    ("user_id", pa.string()),
    ("occurred_at", pa.timestamp("us", tz="UTC")),
    ("schema_version", pa.int32()),
    ("data", pa.string()),
    ("known_type", pa.bool_()),
]
EVENTS_SCHEMA = pa.schema(_EVENT_FIELDS)
_DEAD_LETTER_FIELDS: list[tuple[str, pa.DataType]] = [
    ("original_stream", pa.string()),
    ("original_subject", pa.string()),
    ("original_seq", pa.int64()),
    ("delivery_count", pa.int32()),
    ("reason", pa.string()),
    ("dead_lettered_at", pa.timestamp("us", tz="UTC")),
    ("deadletter_seq", pa.int64()),
    ("body", pa.binary()),
]
DEAD_LETTERS_SCHEMA = pa.schema(_DEAD_LETTER_FIELDS)
STAGED = "staged_events"  # temp table: every valid event message of the batch (copies of one id included)
STAGED_DEAD_LETTERS = "staged_dead_letters"  # temp table: the batch's DEADLETTER messages, as rows
_RULES = "batch_rules"
_RULE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("stream", pa.string()),
    ("subject", pa.string()),
    ("event_type", pa.string()),
    ("kind", pa.int32()),
    ("known_type", pa.bool_()),
]
_RULES_SCHEMA = pa.schema(_RULE_FIELDS)
PYTHON_PATH = -1  # a rule the SQL does not check: every message of its subject goes through the models

# Bodies the SQL leaves to the models: escapes (the SQL would compare decoded text with raw text),
# spellings DuckDB's parser admits and Python's does not (NaN, Infinity, trailing commas), and numbers whose
# text Python would write differently (floats, exponents, integers past 15 digits). A value is what follows a
# key's `":` (without backslashes every `"` delimits a string, so that colon is never inside one) or a `[`
# or `,`; a match inside a string value only sends a valid message the slower way.
_GUARD = r'\\|(?:"\s*:|[\[,])\s*[-+]?(?:(?i:nan|inf)|[0-9]+[.eE]|[0-9]{16})|,\s*[\]}]'
_NAME = r"[\x20-\x7e]*[\x21-\x7e][\x20-\x7e]*"  # printable ASCII, not blank: a subset of envelopes._Name
_TIME = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?"
    r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
)
_INT32_MAX = 2**31 - 1


class UnknownSource(ValueError):
    """A staged batch holds events of a stream that is no longer one of the registry's sources."""


@dataclass
class Intake:
    """What the batch's messages are: valid events (in `STAGED`), dead-letter rows (in `STAGED_DEAD_LETTERS`),
    and poison with its reason, which the run dead-letters before it reports success."""

    events: int = 0
    checked_by_models: int = 0  # event messages the SQL left to the pydantic models
    poison: list[tuple[Delivery, str]] = field(default_factory=list)


def load(
    con: duckdb.DuckDBPyConnection,
    deliveries: str,
    contract: Contract,
    sources: Sequence[StreamSpec],
    pipeline: str | None,
) -> Intake:
    """Fill the temp tables from the staged `deliveries` Parquet file (see the module docstring). `pipeline`: the
    durable prefix whose dead-letter copies are recorded (None: every copy, as a replay of DEADLETTER does)."""
    rules = _rules(con, deliveries, contract, sources)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {STAGED} AS {_accepted_sql(rules)}", {"p": deliveries})
    out = Intake()
    _check_the_rest(con, deliveries, contract, out)
    _dead_letter_rows(con, deliveries, pipeline)
    out.events = int(_scalar(con, f"SELECT count(*) FROM {STAGED}"))
    return out


def keep_shard(con: duckdb.DuckDBPyConnection, deliveries: str, shard: int, shards: int, out: Intake) -> None:
    """With several shards: an event whose user belongs to another shard is poison here, never stored in a store
    that does not own its user. The sensor routes by the body's user_id read as the models read it, so this
    is a guard against a body read two ways (it names the reason), not a path valid events take."""
    users = [u for (u,) in con.execute(f"SELECT DISTINCT user_id FROM {STAGED}").fetchall()]
    stray = [u for u in users if shard_of(u, shards) != shard]
    if not stray:
        return
    found = _arrow(
        con,
        f"SELECT d.*, s.user_id AS staged_user FROM read_parquet($p) d JOIN {STAGED} s USING (stream, stream_seq) "
        "WHERE list_contains($stray, s.user_id)",
        {"p": deliveries, "stray": stray},
    )
    for row in found.to_pylist():
        user = row["staged_user"]
        out.poison.append(
            (
                delivery_from_row(row),
                f"user_id {user!r} belongs to shard {shard_of(user, shards)} of {shards}, but the message was "
                f"routed to shard {shard}: its body reads differently to the router and to the contract",
            )
        )
    con.execute(f"DELETE FROM {STAGED} WHERE list_contains($stray, user_id)", {"stray": stray})
    out.events = int(_scalar(con, f"SELECT count(*) FROM {STAGED}"))


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None) -> Any:
    row = con.execute(sql, params or {}).fetchone()
    return row[0] if row else None


# -- the rules of the batch's subjects --------------------------------------------------------------


def _rules(
    con: duckdb.DuckDBPyConnection, deliveries: str, contract: Contract, sources: Sequence[StreamSpec]
) -> list[tuple[str, str]]:
    """One row per (stream, subject) of the batch in the temp table `batch_rules`: the subject's event type and
    which data check applies (an index into the returned list of (model name, SQL predicate)), or PYTHON_PATH."""
    found = con.execute(
        "SELECT stream, subject, count(*) FROM read_parquet($p) WHERE stream <> $dead GROUP BY ALL",
        {"p": deliveries, "dead": streams.DEADLETTER.name},
    ).fetchall()
    _check_sources(found, sources)
    checks: list[tuple[str, str]] = []
    rows: dict[str, list[Any]] = {"stream": [], "subject": [], "event_type": [], "kind": [], "known_type": []}
    for stream, subject, _ in found:
        rule = contract.rule(stream, subject)
        kind = _kind(rule, checks)
        for name, value in zip(rows, (stream, subject, rule.event_type, kind, rule.model is not None), strict=True):
            rows[name].append(value)
    _from_arrow(con, f"CREATE OR REPLACE TEMP TABLE {_RULES} AS", pa.table(rows, schema=_RULES_SCHEMA))
    return checks


def _check_sources(found: list[tuple[str, str, int]], sources: Sequence[StreamSpec]) -> None:
    """Every event of the batch has a table to go to. A source removed while its batch was staged fails the run
    in words, instead of its events being dropped: a failure outside the messages (`ingest.failures`), so the
    batch stays staged, spends no delivery, and is stored once the source is back."""
    known = {s.name for s in sources}
    stray: dict[str, int] = {}
    for stream, _, n in found:
        if stream not in known:
            stray[stream] = stray.get(stream, 0) + n
    if stray:
        listed = ", ".join(f"{n} from stream {name}" for name, n in sorted(stray.items()))
        raise UnknownSource(
            f"the batch holds events of streams that are not sources in the feature registry ({listed}); "
            "put the [[source]] back to store them"
        )


def _kind(rule: Rule, checks: list[tuple[str, str]]) -> int:
    """Which SQL check the subject's `data` gets, or PYTHON_PATH. Unknown types that are stored need none; the
    packaged models (the ones with a fast twin: strict, extra fields allowed) get theirs when every field is
    one the SQL can check exactly. A team's own model always goes through the model itself."""
    if not rule.event_type:
        return PYTHON_PATH  # not one of its source's subjects: poison, worded by the models
    if rule.model is None:
        return PYTHON_PATH if rule.unknown_is_poison else _index(checks, "", "true")
    if rule.fast is None:
        return PYTHON_PATH
    predicate = _model_predicate(rule.model)
    return PYTHON_PATH if predicate is None else _index(checks, rule.model.__name__, predicate)


def _index(checks: list[tuple[str, str]], name: str, predicate: str) -> int:
    for i, (known, _) in enumerate(checks):
        if known == name:
            return i
    checks.append((name, predicate))
    return len(checks) - 1


def _model_predicate(model: type[BaseModel]) -> str | None:
    """The model's fields as SQL on `data`, or None when a field is of a kind the SQL does not check."""
    name_metadata = Envelope.model_fields["id"].metadata
    parts = []
    for name, info in model.model_fields.items():
        if not name.isidentifier() or info.alias or not info.is_required():
            return None
        path, value = f"'$.{name}'", f"json_extract_string(data, '$.{name}')"
        if info.annotation is str and repr(info.metadata) == repr(name_metadata):
            parts.append(f"json_type(data, {path}) = 'VARCHAR' AND {_name_ok(value)}")
        elif info.annotation is int and (bounds := _int_bounds(info.metadata)) is not None:
            within = f"TRY_CAST({value} AS HUGEINT) BETWEEN {bounds[0]} AND {bounds[1]}"
            parts.append(f"json_type(data, {path}) IN ('UBIGINT', 'BIGINT') AND {within}")
        else:
            return None
    return " AND ".join(parts) or "true"


def _int_bounds(metadata: list[Any]) -> tuple[int, int] | None:
    lo, hi = -(2**63), 2**63 - 1
    for m in metadata:
        if isinstance(m, annotated_types.Ge) and isinstance(m.ge, int):
            lo = max(lo, m.ge)
        elif isinstance(m, annotated_types.Le) and isinstance(m.le, int):
            hi = min(hi, m.le)
        else:
            return None
    return lo, hi


def _name_ok(value: str) -> str:
    return f"strlen({value}) <= 256 AND regexp_full_match({value}, '{_NAME}')"


# -- the vectorized pass --------------------------------------------------------------------------


def _accepted_sql(checks: list[tuple[str, str]]) -> str:
    """The batch's messages the SQL is certain of, typed as the raw tables store them."""
    cases = " ".join(f"WHEN {i} THEN ({predicate})" for i, (_, predicate) in enumerate(checks))
    data_check = f"CASE kind {cases} ELSE false END" if checks else "false"
    v, t = "v", "t"  # json_extract_string / json_type of: id, type, user_id, occurred_at, schema_version, data
    return f"""
    WITH raw AS (
        SELECT d.stream, d.subject, d.stream_seq, d.num_delivered, d.stored_ns, r.event_type, r.kind, r.known_type,
               try(decode(d.body)) AS j
        FROM read_parquet($p) d JOIN {_RULES} r USING (stream, subject)
        WHERE r.kind <> {PYTHON_PATH}
    ), valid AS (
        SELECT *, json_keys(j) AS keys FROM raw
        WHERE j IS NOT NULL AND NOT regexp_matches(j, '{_GUARD}') AND json_valid(j) AND json_type(j) = 'OBJECT'
    ), parsed AS MATERIALIZED (  -- once: an inlined CTE would parse the body again for every use of v and t
        SELECT *,
               json_extract_string(j, ['$.id', '$.type', '$.user_id', '$.occurred_at', '$.schema_version']) AS {v},
               json_type(j, ['$.id', '$.type', '$.user_id', '$.occurred_at', '$.schema_version', '$.data']) AS {t},
               json_extract(j, '$.data') AS data, json_keys(json_extract(j, '$.data')) AS data_keys
        FROM valid
        WHERE len(keys) = len(list_distinct(keys))
    ), typed AS (
        SELECT *, TRY_CAST({v}[4] AS TIMESTAMPTZ) AS at_utc FROM parsed
        WHERE {t}[1] = 'VARCHAR' AND {_name_ok(f"{v}[1]")}
          AND {t}[2] = 'VARCHAR' AND {v}[2] = event_type AND {_name_ok(f"{v}[2]")}
          AND {t}[3] = 'VARCHAR' AND {_name_ok(f"{v}[3]")}
          AND {t}[4] = 'VARCHAR' AND regexp_full_match({v}[4], '{_TIME}')
          AND {t}[5] = 'UBIGINT' AND TRY_CAST({v}[5] AS BIGINT) BETWEEN 1 AND {_INT32_MAX}
          AND ({t}[6] IS NULL OR ({t}[6] = 'OBJECT'
               AND len(data_keys) = len(list_distinct(data_keys))
               AND NOT contains(substr(CAST(data AS VARCHAR), 2), '{{')))
    )
    SELECT stream, subject, stream_seq, num_delivered,
           timezone('UTC', make_timestamp(stored_ns // 1000)) AS received_at,
           {v}[1] AS event_id, {v}[2] AS type, {v}[3] AS user_id, at_utc AS occurred_at,
           CAST({v}[5] AS INTEGER) AS schema_version, coalesce(CAST(data AS VARCHAR), '{{}}') AS data, known_type
    FROM typed
    WHERE at_utc BETWEEN TIMESTAMPTZ '1900-01-01 00:00:00+00' AND TIMESTAMPTZ '9998-12-31 00:00:00+00'
      AND ({data_check})
    """


# -- what the SQL left: the models, message by message ----------------------------------------------------


def _check_the_rest(con: duckdb.DuckDBPyConnection, deliveries: str, contract: Contract, out: Intake) -> None:
    rest = _arrow(
        con,
        f"SELECT d.* FROM read_parquet($p) d ANTI JOIN {STAGED} s USING (stream, stream_seq) WHERE d.stream <> $dead",
        {"p": deliveries, "dead": streams.DEADLETTER.name},
    )
    if rest.num_rows == 0:
        return
    rows: dict[str, list[Any]] = {name: [] for name in EVENTS_SCHEMA.names}
    for row in rest.to_pylist():
        d = delivery_from_row(row)
        out.checked_by_models += 1
        try:
            ev = contract.validate(d.stream, d.subject, d.data)
        except PoisonMessage as exc:
            out.poison.append((d, str(exc)))
            continue
        except Exception as exc:  # a validator bug must not wedge the batch: the copy in DEADLETTER keeps it
            out.poison.append((d, f"unexpected validation error {exc!r}"))
            continue
        values = (d.stream, d.subject, d.stream_seq, d.num_delivered, d.stored_ns // 1000, ev.event_id, ev.type,
                  ev.user_id, ev.occurred_at, ev.schema_version, ev.data_json, ev.known_type)  # fmt: skip
        for name, value in zip(rows, values, strict=True):
            rows[name].append(value)
    _from_arrow(con, f"INSERT INTO {STAGED}", pa.table(rows, schema=EVENTS_SCHEMA))


def _arrow(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any]) -> pa.Table:
    table: pa.Table = con.sql(sql, params=params).to_arrow_table()
    return table


def _from_arrow(con: duckdb.DuckDBPyConnection, statement: str, rows: pa.Table) -> None:
    """`statement` (an INSERT INTO or CREATE ... AS) of the Arrow `rows`."""
    con.register("intake_rows", rows)
    try:
        con.execute(f"{statement} SELECT * FROM intake_rows")
    finally:
        con.unregister("intake_rows")


def _dead_letter_rows(con: duckdb.DuckDBPyConnection, deliveries: str, pipeline: str | None) -> None:
    found = _arrow(
        con, "SELECT * FROM read_parquet($p) WHERE stream = $dead", {"p": deliveries, "dead": streams.DEADLETTER.name}
    )
    ours = [
        dead_letter_row(d)
        for d in map(delivery_from_row, found.to_pylist())
        if pipeline is None or not _theirs(d, pipeline)
    ]
    _from_arrow(
        con,
        f"CREATE OR REPLACE TEMP TABLE {STAGED_DEAD_LETTERS} AS",
        pa.Table.from_pylist(ours, schema=DEAD_LETTERS_SCHEMA),
    )


def _theirs(d: Delivery, pipeline: str) -> bool:
    """A dead-letter copy another pipeline on the same streams made: acked with the batch, recorded by it."""
    return (d.headers or {}).get(streams.H_PIPELINE, pipeline) != pipeline


def dead_letter_row(d: Delivery) -> dict[str, Any]:
    """A DEADLETTER message as a dead_letters row, from the headers the pipeline set on its copy."""
    h = d.headers or {}

    def as_int(name: str) -> int | None:
        try:
            return int(h[name])
        except (KeyError, ValueError):
            return None

    try:
        at = datetime.fromisoformat(h[streams.H_AT].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        at = datetime.fromtimestamp(d.stored_ns / 1e9, UTC)
    original_seq = as_int(streams.H_SEQUENCE)
    known = streams.H_STREAM in h and original_seq is not None
    return {
        # A message someone else put on deadletter.> is recorded under its own DEADLETTER sequence.
        "original_stream": h.get(streams.H_STREAM) if known else streams.DEADLETTER.name,
        "original_subject": h.get(streams.H_SUBJECT, d.subject.removeprefix(f"{streams.DEADLETTER.prefixes[0]}.")),
        "original_seq": original_seq if known else d.stream_seq,
        "delivery_count": as_int(streams.H_DELIVERIES) or 0,
        "reason": h.get(streams.H_REASON, "no reason given (message published to deadletter.> by another client)"),
        "dead_lettered_at": at,
        "deadletter_seq": d.stream_seq,
        "body": d.data,
    }
