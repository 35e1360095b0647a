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


def read(path: Path) -> Iterator[Row]:
    """Rows of a .csv or .jsonl file; errors name the file and the line."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise InputError(f"{path}: recipients must be a .csv or .jsonl file")
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror}") from None
    with handle:
        text = _utf8_lines(handle, path)
        yield from (_csv_rows(text, path) if suffix == ".csv" else _jsonl_rows(text, path))


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
        raise InputError(f"{path}: no 'email' column in the header ({', '.join(header)})")
    try:
        for row in reader:
            if None in row:
                raise InputError(f"{path}, line {reader.line_num}: more fields than the header has")
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
        if not isinstance(row, dict) or not isinstance(row.get("email"), str):
            raise InputError(
                f'{path}, line {number}: each line must be an object with an "email" string'
            )
        yield number, row
