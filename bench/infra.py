"""Processes the benchmark starts (and always stops), free ports, the sink, the delay proxy,
a private redis-server, and RSS sampling through /proc."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable


class BenchError(RuntimeError):
    pass


# --- processes ------------------------------------------------------------------------------------


class Procs:
    """Every process started here gets a session (and process group) of its own; stop() and the
    atexit hook end those groups, by id, and nothing else."""

    def __init__(self) -> None:
        self._live: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        atexit.register(self.stop_all)

    def start(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        stdout: Path | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        out = open(stdout or log or os.devnull, "wb")  # noqa: SIM115
        err = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                list(argv),
                env=env,
                cwd=cwd or ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        finally:
            out.close()
            if log:
                err.close()  # type: ignore[union-attr]
        with self._lock:
            self._live.append(proc)
        return proc

    def stop(
        self, proc: subprocess.Popen[bytes], *, grace: float = 10.0, sig: int = signal.SIGTERM
    ) -> None:
        if proc.poll() is None:
            # the leader first (a Celery worker's warm shutdown stops its own children) ...
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        # ... then whatever is left of its group (forked children), and reap
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        with self._lock:
            if proc in self._live:
                self._live.remove(proc)

    def stop_all(self) -> None:
        with self._lock:
            live = list(reversed(self._live))
        for proc in live:
            self.stop(proc, grace=3.0)


PROCS = Procs()


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    # SIGTERM / SIGHUP unwind through the finally blocks (and atexit) like Ctrl-C does
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


# --- redis ----------------------------------------------------------------------------------------


class Redis:
    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise BenchError("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = PROCS.start(
            [
                exe,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--loglevel",
                "warning",
            ],
            log=workdir / "redis.log",
        )
        wait_port(self.port, proc=self.proc)
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        self.version = self.client.info()["redis_version"]

    def flush(self) -> None:
        self.client.flushall()

    def stop(self) -> None:
        self.client.close()
        PROCS.stop(self.proc)


# --- the sink -------------------------------------------------------------------------------------


def postfix_tool(name: str) -> str | None:
    """The path of one of Postfix's test programs (smtp-sink, smtp-source), which Debian's
    `postfix` package installs in /usr/sbin, or None."""
    path = shutil.which(name) or f"/usr/sbin/{name}"
    return path if os.path.exists(path) else None


class Sink:
    """A fast SMTP sink on loopback that accepts everything and advertises PIPELINING:
    Postfix's smtp-sink when installed, else bench/pysink.py. `count()` is the number of
    messages received (a final "." answered) since the sink started."""

    def __init__(self, workdir: Path, kind: str = "auto") -> None:
        self.port = free_port()
        self.out = workdir / "sink.out"
        exe = postfix_tool("smtp-sink")
        if kind == "auto":
            kind = "smtp-sink" if exe else "python"
        if kind == "smtp-sink":
            if not exe:
                raise BenchError("smtp-sink is not installed (apt-get install postfix)")
            argv = [exe, "-c", f"127.0.0.1:{self.port}", "1000"]
            if os.geteuid() == 0:
                argv[1:1] = ["-u", "nobody"]
        else:
            argv = [PYTHON, str(BENCH / "pysink.py"), "--port", str(self.port)]
        self.kind = kind
        self.argv = argv
        self.proc = PROCS.start(argv, stdout=self.out, log=workdir / "sink.err")
        wait_port(self.port, proc=self.proc)
        self.url = f"smtp://127.0.0.1:{self.port}?tls=none"

    def count(self) -> int:
        """The last `mesg=N` counter the sink wrote (smtp-sink -c format, which pysink copies)."""
        try:
            with open(self.out, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 256))
                tail = f.read()
        except FileNotFoundError:
            return 0
        at = tail.rfind(b"mesg=")
        if at < 0:
            return 0
        digits = bytearray()
        for ch in tail[at + 5 :]:
            if 48 <= ch <= 57:
                digits.append(ch)
            else:
                break
        return int(digits) if digits else 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        PROCS.stop(self.proc)


class DelayProxy:
    """bench/delayproxy.py: forwards to the sink, holding every chunk `delay` seconds in each
    direction (20 ms round trip for 0.010)."""

    def __init__(self, workdir: Path, target_port: int, delay: float) -> None:
        self.port = free_port()
        self.delay = delay
        self.proc = PROCS.start(
            [
                PYTHON,
                str(BENCH / "delayproxy.py"),
                "--port",
                str(self.port),
                "--target-port",
                str(target_port),
                "--delay",
                str(delay),
            ],
            log=workdir / "proxy.log",
        )
        wait_port(self.port, proc=self.proc)
        self.url = f"smtp://127.0.0.1:{self.port}?tls=none"

    def stop(self) -> None:
        PROCS.stop(self.proc)


# --- memory ---------------------------------------------------------------------------------------


def _status_kb(pid: int, field: str, file: str = "status") -> int:
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """pid and every process below it (through /proc/PID/task/*/children, else a /proc scan)."""
    found = [pid]
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        kids: list[int] = []
        try:
            for tid in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids += [int(x) for x in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            kids = _scan_children(parent)
        found += kids
        frontier += kids
    return found


def _scan_children(parent: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    kids.append(int(name))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return kids


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return total - idle, total


def postgres_cpu() -> float:
    """CPU seconds (user + system) used so far by the PostgreSQL server processes running now
    (a local server: every process named postgres). Two readings around a drain give the
    database's own CPU for it, on a machine where nothing else uses the server."""
    ticks = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):  # gone meanwhile
            if comm.read_text().strip() == "postgres":
                ticks += _cpu_ticks(int(comm.parent.name))
    return ticks / CLK_TCK


def with_options(url: str, options: str | None) -> str:
    """`url` with `options` ("rate=100/s&daily=5") added to its query, if any are given."""
    if not options:
        return url
    return url + ("&" if "?" in url else "?") + options


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Share of the machine's CPUs busy (with anything) between two machine_cpu() readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None


class RSSSampler:
    """Samples a process tree every `interval` seconds: `peak_kb` is the largest summed VmRSS
    (pages shared by forked children count once per process), `pss_peak_kb` the largest
    summed PSS (shared pages split between their users: the tree's real footprint), `hwm_kb`
    the sum of each process's own VmHWM; `cpu_seconds()` the CPU time the tree has used. PSS is
    read at most every `pss_interval` seconds: the kernel walks a process's page tables to sum
    it (4 ms for 150 MB on the sixth session's machine), CPU taken from the run it measures."""

    def __init__(self, pid: int, interval: float = 0.2, pss_interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.pss_interval = pss_interval
        self._pss_at = 0.0
        self.peak_kb = 0
        self.pss_peak_kb = 0
        self.processes = 0
        self.hwm: dict[int, int] = {}
        self.ticks: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self, pss: bool = False) -> None:
        """Read the tree now; PSS too if asked, or if it is due."""
        with self._lock:
            pids = descendants(self.pid)
            total = pss_kb = 0
            with_pss = pss or time.monotonic() - self._pss_at >= self.pss_interval
            if with_pss:
                self._pss_at = time.monotonic()
            for pid in pids:
                total += _status_kb(pid, "VmRSS")
                if with_pss:
                    pss_kb += _status_kb(pid, "Pss", "smaps_rollup")
                hwm = _status_kb(pid, "VmHWM")
                if hwm:
                    self.hwm[pid] = max(self.hwm.get(pid, 0), hwm)
                self.ticks[pid] = max(self.ticks.get(pid, 0), _cpu_ticks(pid))
            self.pss_peak_kb = max(self.pss_peak_kb, pss_kb)
            if total > self.peak_kb:
                self.peak_kb = total
                self.processes = len(pids)

    def cpu_seconds(self) -> float:
        """CPU (user + system) used so far by every process of the tree seen alive."""
        self.sample()
        with self._lock:
            return sum(self.ticks.values()) / CLK_TCK

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(2)
        return self.peak_kb

    @property
    def hwm_kb(self) -> int:
        return sum(self.hwm.values())
