"""Bulk writes: one statement per batch on PostgreSQL, executemany on SQLite.

On PostgreSQL the rows travel as one array per column and are unnested server-side, so a batch
is one statement with a fixed text (compiled once). Building a multi-row VALUES statement
instead spent most of a worker's time in SQLAlchemy's compiler, and executemany made the server
run one statement per row. SQLite runs in-process, where executemany is cheap.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import Table, TextClause, bindparam, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

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


def insert_rows(
    session: Session, model: type[Base], rows: Sequence[Row], *, ignore_conflicts: bool = False
) -> None:
    """INSERT the rows (all with the same keys); with `ignore_conflicts`, rows that would
    break a unique constraint are skipped."""
    if not rows:
        return
    table = _table(model)
    columns = tuple(rows[0])
    if _postgresql(session):
        stmt = _pg_insert(table, columns, ignore_conflicts)
        session.execute(stmt, {c: [row[c] for row in rows] for c in columns})
        return
    lite = sqlite.insert(table)
    session.connection().execute(
        lite.on_conflict_do_nothing() if ignore_conflicts else lite, list(rows)
    )


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
    if _postgresql(session):
        pg_stmt = _pg_update(table, key, columns, tuple(fence), tuple(constant))
        params = {c: [row[c] for row in rows] for c in columns}
        params.update({f"f_{c}": v for c, v in fence.items()})
        params.update({f"k_{c}": v for c, v in constant.items()})
        result: Any = session.execute(pg_stmt, params)
        return int(result.rowcount)
    stmt = (
        update(table)
        .where(table.c[key] == bindparam(f"b_{key}"), *(table.c[c] == v for c, v in fence.items()))
        .values({**{c: bindparam(f"b_{c}") for c in columns if c != key}, **constant})
    )
    params_list = [{f"b_{c}": row[c] for c in columns} for row in rows]
    result = session.connection().execute(stmt, params_list)
    return int(result.rowcount) if result.rowcount >= 0 else len(rows)


def _table(model: type[Base]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def _postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@functools.cache
def _pg_insert(table: Table, columns: tuple[str, ...], ignore_conflicts: bool) -> TextClause:
    names = ", ".join(columns)
    arrays = ", ".join(f":{c}" for c in columns)
    conflict = " ON CONFLICT DO NOTHING" if ignore_conflicts else ""
    sql = f"INSERT INTO {table.name} ({names}) SELECT * FROM unnest({arrays}){conflict}"
    return text(sql).bindparams(*_arrays(table, columns))


@functools.cache
def _pg_update(
    table: Table,
    key: str,
    columns: tuple[str, ...],
    fence: tuple[str, ...],
    constant: tuple[str, ...],
) -> TextClause:
    sets = [f"{c} = v.{c}" for c in columns if c != key] + [f"{c} = :k_{c}" for c in constant]
    fenced = "".join(f" AND t.{c} = :f_{c}" for c in fence)
    sql = (
        f"UPDATE {table.name} AS t SET {', '.join(sets)} "
        f"FROM unnest({', '.join(f':{c}' for c in columns)}) AS v({', '.join(columns)}) "
        f"WHERE t.{key} = v.{key}{fenced}"
    )
    scalars = [bindparam(f"f_{c}", type_=table.c[c].type) for c in fence]
    scalars += [bindparam(f"k_{c}", type_=table.c[c].type) for c in constant]
    return text(sql).bindparams(*_arrays(table, columns), *scalars)


def _arrays(table: Table, columns: tuple[str, ...]) -> list[Any]:
    return [bindparam(c, type_=ARRAY(table.c[c].type)) for c in columns]
