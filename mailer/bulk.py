"""Bulk statements: one statement per batch on PostgreSQL, executemany on SQLite.

On PostgreSQL, rows that are only inserted (the attempts) go by COPY in the binary format,
each row written by psycopg in C, so the server reads typed values instead of parsing text.
An insert that skips conflicting rows, and every update, cannot be a COPY: those batches
travel as one JSON document (a list of rows, written by orjson) that the server turns back
into rows of the table's type (json_populate_recordset), so a batch is one statement with a
fixed text, compiled once. Multi-row VALUES (SQLAlchemy's compiler), executemany (a statement
a row on the server) and one array per column (psycopg's array dumper) all cost more; see
BENCHMARKS.md, "What each step bought". SQLite runs in-process, where executemany is cheap.
For the same reason a set of keys is one array parameter on PostgreSQL (`among`), not an IN
list re-rendered for each size.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import psycopg
from sqlalchemy import (
    BigInteger,
    BindParameter,
    ColumnElement,
    Integer,
    Table,
    TextClause,
    TypeDecorator,
    any_,
    bindparam,
    text,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.types import UserDefinedType

from mailer.models import Base

Row = Mapping[str, Any]
T = TypeVar("T")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of up to `size` items, reading `items` once (it may be a stream)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def among(column: Any, name: str, postgresql: bool) -> ColumnElement[bool]:
    """`column IN :name`: one array parameter on PostgreSQL, an expanding IN on SQLite. The
    statement's text does not depend on how many values there are, so a statement built once
    serves every call."""
    clause: ColumnElement[bool]
    if postgresql:
        clause = column == any_(_array(name, column.type))
    else:
        clause = column.in_(bindparam(name, expanding=True))
    return clause


class _IntegerArray(UserDefinedType[list[int]]):
    """The SQL side of `_Integers`: the parameter is cast to `kind[]` where it stands."""

    cache_ok = True
    render_bind_cast = True

    def __init__(self, kind: Integer) -> None:
        self.kind = kind

    def get_col_spec(self, **kw: Any) -> str:
        return "BIGINT[]" if isinstance(self.kind, BigInteger) else "INTEGER[]"


class _Integers(TypeDecorator[list[int]]):
    """A list of integers sent as one array literal, '{1,2,3}', that the server reads as an
    array of `kind` itself. psycopg sends a str as of unknown type, and the cast beside the
    parameter (`$1::BIGINT[]`) gives it its type: the parameter is then an array that the
    planner sees (its length, an index lookup; hashed in a filter). A cast of a text
    parameter (`CAST($1::VARCHAR AS BIGINT[])`) is an expression instead, parsed again for
    every row a sequential scan reads: rows x ids. psycopg's list dumper would type it too,
    but runs a regular expression on each element to see whether it needs quotes."""

    impl = _IntegerArray
    cache_ok = True

    def __init__(self, kind: Integer) -> None:
        super().__init__(kind)

    def process_bind_param(self, value: list[int] | None, dialect: Any) -> str | None:
        return None if value is None else "{" + ",".join(map(str, map(int, value))) + "}"


def _array(name: str, kind: Any) -> BindParameter[Any]:
    """The parameter `name`, a list of `kind` values, as a PostgreSQL array."""
    if isinstance(kind, Integer):  # BigInteger too
        return bindparam(name, type_=_Integers(kind))
    return bindparam(name, type_=ARRAY(kind))


def insert_rows(
    session: Session,
    model: type[Base],
    rows: Sequence[Row],
    *,
    constant: Mapping[str, Any] | None = None,
    ignore_conflicts: bool = False,
) -> int:
    """INSERT the rows (all with the same keys), each with the `constant` values too; with
    `ignore_conflicts`, rows that would break a unique constraint are skipped. Returns how
    many rows were inserted."""
    if not rows:
        return 0
    table = _table(model)
    columns = tuple(rows[0])
    constant = constant or {}
    if postgresql(session):
        if not ignore_conflicts:
            extra = tuple(constant.values())
            values = (tuple(map(row.__getitem__, columns)) + extra for row in rows)
            return _copy(session, table, columns + tuple(constant), values)
        # the constant values travel once, as parameters, not in every row of the document
        statement = _pg_insert(table, columns, tuple(constant), ignore_conflicts)
        params = {"rows": _json(rows), **{f"k_{c}": v for c, v in constant.items()}}
        inserted: Any = session.connection().execute(statement, params)
        return int(inserted.rowcount)
    lite = sqlite.insert(table)
    inserted = session.connection().execute(
        lite.on_conflict_do_nothing() if ignore_conflicts else lite,
        [{**row, **constant} for row in rows] if constant else list(rows),
    )
    return int(inserted.rowcount)


def update_rows(
    session: Session,
    model: type[Base],
    key: str,
    rows: Sequence[Row],
    *,
    fence: Mapping[str, Any],
    constant: Mapping[str, Any],
) -> int:
    """UPDATE each row (matched on `key`) with its own values, plus `constant` values, where
    every `fence` column still equals the given value; returns how many rows changed."""
    if not rows:
        return 0
    table = _table(model)
    columns = tuple(rows[0])
    if postgresql(session):
        pg_stmt = _pg_update(table, key, columns, tuple(fence), tuple(constant))
        params: dict[str, Any] = {"rows": _json(rows), "keys": [row[key] for row in rows]}
        params.update({f"f_{c}": v for c, v in fence.items()})
        params.update({f"k_{c}": v for c, v in constant.items()})
        result: Any = session.connection().execute(pg_stmt, params)
        return int(result.rowcount)
    stmt = (
        update(table)
        .where(table.c[key] == bindparam(f"b_{key}"), *(table.c[c] == v for c, v in fence.items()))
        .values({**{c: bindparam(f"b_{c}") for c in columns if c != key}, **constant})
    )
    params_list = [{f"b_{c}": row[c] for c in columns} for row in rows]
    result = session.connection().execute(stmt, params_list)
    return int(result.rowcount) if result.rowcount >= 0 else len(rows)


def _copy(
    session: Session, table: Table, names: tuple[str, ...], values: Iterable[tuple[Any, ...]]
) -> int:
    """COPY the rows (`names`' values, in order) into `table` in the binary format; returns
    how many were written. The values go to psycopg as they are, without SQLAlchemy's type
    processing (aware datetimes, plain values), and every row must have every key. psycopg's
    errors come out as SQLAlchemy's, as from a statement: db.retrying retries an
    OperationalError, and the session's rollback then finds a lost connection and has the
    pool drop it (and those opened before it) as for any statement."""
    connection = session.connection()
    raw = connection.connection.dbapi_connection
    assert isinstance(raw, psycopg.Connection)
    sql = f"COPY {table.name} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)"
    try:
        types = _column_types(raw, table.name)
        with raw.cursor() as cursor:
            with cursor.copy(sql) as copy:
                copy.set_types([types[name] for name in names])
                for row in values:
                    copy.write_row(row)
            return cursor.rowcount
    except psycopg.Error as exc:
        # the types are read again on the next try: a column's type changed by a migration
        # while the worker runs made every COPY on this connection fail, for good
        _types.pop(raw, None)
        lost = connection.dialect.is_disconnect(exc, raw, None)
        raise DBAPIError.instance(
            sql, None, exc, psycopg.Error, connection_invalidated=lost, dialect=connection.dialect
        ) from exc


# each connection's column types (binary COPY sends values typed), read once a table
_types: weakref.WeakKeyDictionary[psycopg.Connection[Any], dict[str, dict[str, int]]] = (
    weakref.WeakKeyDictionary()
)


def _column_types(raw: psycopg.Connection[Any], table: str) -> dict[str, int]:
    known = _types.setdefault(raw, {})
    if table not in known:
        rows = raw.execute(
            "SELECT attname, atttypid FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table,),
        )
        known[table] = {name: int(oid) for name, oid in rows}
    return known[table]


def _table(model: type[Base]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _json(rows: Sequence[Row]) -> str:
    try:
        # orjson writes aware datetimes as RFC 3339 itself; the json module needs a callback
        # for each
        return orjson.dumps(rows, option=orjson.OPT_NAIVE_UTC).decode()
    except orjson.JSONEncodeError:  # what only the json module writes (an integer over 64 bits)
        return json.dumps(rows, default=_timestamp, ensure_ascii=False)


def _timestamp(value: object) -> str:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    raise TypeError(f"{type(value).__name__} cannot be written in bulk")


def _recordset(table: Table) -> str:
    # the rows as the table's own row type: a key that is absent reads as NULL
    return f"json_populate_recordset(NULL::{table.name}, CAST(:rows AS json))"


@functools.cache
def _pg_insert(
    table: Table, columns: tuple[str, ...], constant: tuple[str, ...], ignore_conflicts: bool
) -> TextClause:
    names = ", ".join(columns + constant)
    values = ", ".join(columns + tuple(f":k_{c}" for c in constant))
    conflict = " ON CONFLICT DO NOTHING" if ignore_conflicts else ""
    sql = f"INSERT INTO {table.name} ({names}) SELECT {values} FROM {_recordset(table)}{conflict}"
    return text(sql).bindparams(*_typed(table, constant, "k_"))


@functools.cache
def _pg_update(
    table: Table,
    key: str,
    columns: tuple[str, ...],
    fence: tuple[str, ...],
    constant: tuple[str, ...],
) -> TextClause:
    sets = [f"{c} = v.{c}" for c in columns if c != key] + [f"{c} = :k_{c}" for c in constant]
    # The rows are found by their keys (given once more as an array, whose length the planner
    # sees, unlike the JSON's) and only then checked against the fence, which `IS TRUE` keeps
    # out of any index: found through the fence (WHERE state = 'sending'), whose index entries
    # grow with every delivery ever claimed until vacuum, each write of a campaign cost more
    # than the last. The JSON is read
    # once (MATERIALIZED): as the inner side of a nested loop it was parsed again for every row.
    fenced = "".join(f" AND (t.{c} = :f_{c}) IS TRUE" for c in fence)
    sql = (
        f"WITH v AS MATERIALIZED (SELECT * FROM {_recordset(table)}) "
        f"UPDATE {table.name} AS t SET {', '.join(sets)} FROM v "
        f"WHERE t.{key} = ANY(:keys) AND t.{key} = v.{key}{fenced}"
    )
    keys = _array("keys", table.c[key].type)  # as `among` sends them
    return text(sql).bindparams(keys, *_typed(table, fence, "f_"), *_typed(table, constant, "k_"))


def _typed(table: Table, columns: tuple[str, ...], prefix: str) -> list[BindParameter[Any]]:
    """Parameters typed as their columns, so that a None is sent as a NULL of that type."""
    return [bindparam(f"{prefix}{c}", type_=table.c[c].type) for c in columns]
