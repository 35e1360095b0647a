"""The slow statements of a case, from PostgreSQL's server log: mailer's processes load
auto_explain on their own connections (--log-slow), and each case keeps the slowest
statements, with their plans, that the log gained while it ran."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

DURATION = re.compile(r"duration: ([0-9.]+) ms\s+(.*)")


def find_log(given: str | None) -> Path | None:
    """The server log to read: the one given, else the newest under /var/log/postgresql."""
    if given:
        return Path(given)
    found = sorted(glob.glob("/var/log/postgresql/*.log"), key=os.path.getmtime)
    return Path(found[-1]) if found else None


class SlowLog:
    """Lines of the log written after mark(); none if the log cannot be read."""

    def __init__(self, path: Path | None) -> None:
        self.path = path if path and os.access(path, os.R_OK) else None
        self.offset = 0

    def mark(self) -> None:
        if self.path is not None:
            self.offset = self.path.stat().st_size

    def slowest(self, top: int = 8, width: int = 3000) -> list[dict[str, object]]:
        """The `top` slowest statements logged since mark(), slowest first, each with its
        plan (an entry's continuation lines are indented)."""
        if self.path is None:
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            text = f.read().decode(errors="replace")
        entries: list[list[str]] = []
        for line in text.splitlines():
            if line[:1] in ("\t", " ") and entries:
                entries[-1].append(line.strip("\t"))
            else:
                entries.append([line])
        found = []
        for entry in entries:
            match = DURATION.search(entry[0])
            if match:
                body = "\n".join([match.group(2), *entry[1:]])
                found.append({"ms": float(match.group(1)), "statement": body[:width]})
        found.sort(key=lambda s: -float(str(s["ms"])))
        return found[:top]
