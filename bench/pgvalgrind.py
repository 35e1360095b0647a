"""A private PostgreSQL server whose every backend runs under callgrind, for
`bench/instructions.py --server`: the server's instructions for what a client did, counted the
same whatever else the machine is doing.

The server is made with the machine's own binaries (initdb, postgres) in a temporary directory,
listens on a free port of 127.0.0.1, and runs without autovacuum (which would start at times
of its own) and without fsync (the count is of instructions, not of waits). Each backend
writes its count when it exits: `backends_since` sums the backends that started after a mark.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import infra
from infra import BenchError

SETTINGS = (
    "listen_addresses = '127.0.0.1'",
    "autovacuum = off",
    "fsync = off",
    "synchronous_commit = off",
)


def bindir() -> Path:
    """Where the server's programs are: pg_config's answer, else Debian's newest version."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        found = Path(out.stdout.strip())
        if (found / "postgres").exists():
            return found
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_version)
    if not versions:
        raise BenchError("no PostgreSQL server binaries (initdb, postgres) on this machine")
    return Path(versions[-1]).parent


def _version(path: str) -> int:
    found = re.search(r"/postgresql/(\d+)/", path)
    return int(found.group(1)) if found else 0


class Server:
    """The running server: `url` for SQLAlchemy, `mark()` then `backends_since(mark)`."""

    def __init__(self, work: Path, port: int) -> None:
        import psycopg

        self.work, self.port = work, port
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        # one connection kept open throughout, to watch the others come and go: its own
        # backend writes its count only when the server stops
        self._watch = psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True
        )
        # the postmaster's file, open from the start and written when the server stops
        self._lasting = set(glob.glob(str(self.work / "cg.*")))

    def close(self) -> None:
        self._watch.close()

    def mark(self) -> set[str]:
        """The counts written so far, once every earlier client's backend has written its."""
        return self._settled()

    def backends_since(self, mark: set[str]) -> int:
        """Instructions of the backends that started after `mark` (all exited by now)."""
        return sum(_total(path) or 0 for path in self._settled() - mark)

    def _settled(self, timeout: float = 300.0) -> set[str]:
        """The count files once no other client is connected and every backend that served
        one has written its count (a backend exits soon after its client disconnects)."""
        deadline = time.monotonic() + timeout
        while True:
            others = self._watch.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone()
            files = set(glob.glob(str(self.work / "cg.*"))) - self._lasting
            if others == (0,) and all(_total(path) is not None for path in files):
                time.sleep(1.0)  # a backend that left just now may still be writing
                if set(glob.glob(str(self.work / "cg.*"))) - self._lasting == files:
                    return files
            if time.monotonic() > deadline:
                raise BenchError(f"backends did not write their counts in {timeout:.0f}s")
            time.sleep(0.5)


def _total(path: str) -> int | None:
    with contextlib.suppress(OSError):
        found = re.search(r"^(?:summary|totals): (\d+)", Path(path).read_text(), re.M)
        if found:
            return int(found.group(1))
    return None


def _wait_ready(port: int, server: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Until the server takes connections (it listens before its start-up is over)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres").close()
            return
        except psycopg.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the private PostgreSQL server did not start") from None
            time.sleep(0.5)


@contextlib.contextmanager
def running() -> Iterator[Server]:
    """Make, start and finally remove a server under callgrind."""
    if shutil.which("valgrind") is None:
        raise BenchError("valgrind is not installed (apt-get install valgrind)")
    programs = bindir()
    work = Path(tempfile.mkdtemp(prefix="mailer-pgvalgrind-"))
    # PostgreSQL refuses to run as root: the server runs as the postgres user then
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(work, "postgres")
    port = infra.free_port()
    data = work / "data"
    server: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [*as_user, str(programs / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
        )
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n".join((*SETTINGS, f"port = {port}", f"unix_socket_directories = '{work}'"))
            )
        server = subprocess.Popen(
            [
                *as_user,
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={work}/cg.%p",
                str(programs / "postgres"),
                "-D",
                str(data),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(work / "server.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        infra.wait_port(port, timeout=120, proc=server)
        _wait_ready(port, server)
        running_server = Server(work, port)
        try:
            yield running_server
        finally:
            running_server.close()
    finally:
        if server is not None:
            subprocess.run(
                [*as_user, str(programs / "pg_ctl"), "-D", str(data), "stop", "-m", "immediate"],
                capture_output=True,
            )
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(60)
        shutil.rmtree(work, ignore_errors=True)
