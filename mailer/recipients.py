"""Recipient files, streamed: CSV (an `email` column plus context columns) or JSON Lines."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from mailer.errors import InputError

Row = tuple[int, dict[str, Any]]  # (line number, fields including "email")
SUFFIXES = (".csv", ".jsonl", ".ndjson")


def read(path: Path) -> Iterator[Row]:
    """Rows of a .csv or .jsonl file; errors name the file and the line."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(
            f"{path}: recipients must be a .csv file (with an 'email' column) or a .jsonl file "
            f"(one JSON object per line), not {suffix or 'a file without an extension'}; "
            "rename the file if it is one of these"
        )
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror}") from None
    with handle:
        text = _utf8_lines(handle, path)
        rows = _csv_rows(text, path) if suffix == ".csv" else _jsonl_rows(text, path)
        empty = True
        for row in rows:
            empty = False
            yield row
    if empty:
        raise InputError(f"{path}: no recipients in the file; add one line per recipient")


def _utf8_lines(handle: IO[bytes], path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    for number, raw in enumerate(handle, start=1):
        try:
            yield decoder.decode(raw)
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{path}, line {number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                f"{exc.start + 1}); save the file as UTF-8"
            ) from None


def _csv_rows(lines: Iterator[str], path: Path) -> Iterator[Row]:
    reader = csv.DictReader(lines)
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise InputError(f"{path}: not a CSV file: {exc}") from None
    if not header:
        raise InputError(
            f"{path}: the file is empty; it needs a header line with an 'email' column"
        )
    if "email" not in header:
        raise InputError(
            f"{path}: no 'email' column in the header ({', '.join(header)}); "
            "name the column holding the addresses 'email'"
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise InputError(f"{path}: the header names {', '.join(repeated)} more than once")
    try:
        for row in reader:
            if None in row:
                raise InputError(
                    f"{path}, line {reader.line_num}: {len(header) + len(row[None])} fields, "
                    f"the header has {len(header)}; quote fields that contain a comma"
                )
            yield reader.line_num, {k: (v if v is not None else "") for k, v in row.items()}
    except csv.Error as exc:
        raise InputError(f"{path}, line {reader.line_num}: {exc}") from None


def _jsonl_rows(lines: Iterator[str], path: Path) -> Iterator[Row]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}, line {number}: not JSON: {exc.msg}") from None
        except RecursionError:
            raise InputError(f"{path}, line {number}: JSON nested too deeply") from None
        if not isinstance(row, dict) or not isinstance(row.get("email"), str):
            raise InputError(
                f'{path}, line {number}: each line must be a JSON object with an "email" string, '
                'such as {"email": "ann@example.com", "name": "Ann"}'
            )
        yield number, row
