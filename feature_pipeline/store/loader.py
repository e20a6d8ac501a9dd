"""Reading the feature registry from TOML, checked before any run starts.

A mistake is reported with the file, the entry's number and name, and what is wrong; every
`where` filter and payload path is compiled against the raw tables' schema at load time, so a
typo fails the code location's load, not a run.
"""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path
from typing import Any

import duckdb
from pydantic import ValidationError

from feature_pipeline.contract import ContractError, load_models
from feature_pipeline.store.archive import view_ddl
from feature_pipeline.store.features import POINTS, feature_sql
from feature_pipeline.store.registry import Registry
from feature_pipeline.store.schema import raw_ddl
from feature_pipeline.streams import StreamSpec

DEFAULT_FILE = Path(__file__).resolve().parents[1] / "feature_defs.toml"


class RegistryError(ValueError):
    """The feature definitions cannot be used; the text names the file and the feature."""


def load_registry(path: str | Path | None = None) -> Registry:
    """Read and check a registry file (the packaged one when `path` is empty); cached while unchanged."""
    file = Path(path) if path else DEFAULT_FILE
    try:
        st = file.stat()
    except OSError as exc:
        raise RegistryError(f"cannot read feature definitions {file}: {exc.strerror or exc}") from None
    return _load_cached(str(file.resolve()), st.st_mtime_ns, st.st_size)


def sources_for(features_file: str) -> tuple[StreamSpec, ...]:
    """The sources of a registry file (the packaged registry's when empty): what the sensor, health and the
    stream checks read."""
    return load_registry(features_file or None).event_streams


@functools.lru_cache(maxsize=16)
def _load_cached(file: str, _mtime_ns: int, _size: int) -> Registry:
    return _load(Path(file))


def _load(file: Path) -> Registry:
    entries = _entries(file)
    try:
        registry = Registry(**{key: tuple(value) for key, value in entries.items()})
    except ValidationError as exc:
        raise RegistryError(f"{file}: " + "; ".join(_describe(err, entries) for err in exc.errors())) from None
    _check_models(registry, str(file))
    _check_sql(registry, str(file))
    return registry


def _entries(file: Path) -> dict[str, list[Any]]:
    """The `[[feature]]` entries, and the `[[source]]` entries when there are any (else the packaged sources)."""
    try:
        raw = tomllib.loads(file.read_text())
    except OSError as exc:
        raise RegistryError(f"cannot read feature definitions {file}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{file} is not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"feature", "source"})
    if unknown:
        raise RegistryError(
            f"{file}: unknown table(s) {', '.join(unknown)}; a registry holds [[source]] and [[feature]]"
        )
    out = {}
    for table, key in (("feature", "features"), ("source", "sources")):
        entries = raw.get(table)
        if entries is None and table == "source":
            continue
        if not isinstance(entries, list):
            raise RegistryError(f"{file} has no [[{table}]] entries")
        out[key] = entries
    return out


def _describe(err: Any, entries: dict[str, list[Any]]) -> str:
    """One validation error, with the entry's number and name."""
    loc = list(err["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] in entries and isinstance(loc[1], int):
        listed = entries[loc[0]]
        entry = listed[loc[1]] if loc[1] < len(listed) else {}
        name = entry.get("name", "?") if isinstance(entry, dict) else "?"
        field = ".".join(str(p) for p in loc[2:] if not str(p).startswith(("function-", "literal")))
        where = f"{loc[0].removesuffix('s')} #{loc[1] + 1} ({name!r}){f' {field}' if field else ''}: "
    return where + str(err["msg"]).removeprefix("Value error, ")


def _check_models(registry: Registry, origin: str) -> None:
    """Import each source's models now, so a wrong path or a model that is not pydantic stops the load."""
    for i, spec in enumerate(registry.event_streams):
        try:
            load_models(spec)
        except ContractError as exc:
            raise RegistryError(f"{origin}: source #{i + 1} ({spec.key!r}): {exc}") from None


def _check_sql(registry: Registry, origin: str) -> None:
    """Compile every `where` filter and payload path against the raw table schema, once, at load time."""
    con = duckdb.connect()
    try:
        for spec in registry.event_streams:
            con.execute(raw_ddl(spec.table))
            con.execute(view_ddl(spec.table, [], replace=False))
        con.execute(f"CREATE TEMP TABLE {POINTS} (user_id VARCHAR, as_of TIMESTAMPTZ)")
        for f in registry.features:
            if f.aggregation == "ratio":
                continue
            try:
                con.execute(f"EXPLAIN {feature_sql(Registry(features=(f,), sources=registry.sources))}")
            except duckdb.Error as exc:
                raise RegistryError(f"{origin}: feature {f.name!r} does not compile: {exc}") from None
    finally:
        con.close()
