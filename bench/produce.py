"""mailer's producer side, run as a process of its own with MAILER_* in the environment (so its
peak RSS is its own). Uses only mailer's public surface. Prints one JSON object.

    python bench/produce.py setup                 migrate (mailer.migrate.upgrade) + templates
    python bench/produce.py campaign N            mailer.send_campaign of N recipients
    python bench/produce.py txn --count C --interval S [--stop-file F] [--to-prefix P]
                                                  C calls of mailer.send(), one every S seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import content


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def setup() -> dict[str, object]:
    from mailer import db, migrate, templates

    t0 = time.time()
    migrate.upgrade()
    with db.session_scope() as session:
        templates.add(session, content.TEMPLATE, content.SUBJECT, content.TEXT, content.HTML)
        templates.add(session, content.TXN_TEMPLATE, content.TXN_SUBJECT, content.TXN_TEXT)
    return {"seconds": time.time() - t0}


def campaign(n: int) -> dict[str, object]:
    import mailer

    last_progress = [0.0]

    def progress(_seen: int) -> None:
        last_progress[0] = time.time()

    t0 = time.time()
    c0 = time.process_time()
    result = mailer.send_campaign(
        content.TEMPLATE,
        content.recipients(n),
        name=f"bench {n}",
        headers=content.HEADERS,
        progress=progress,
    )
    t1 = time.time()
    cpu = time.process_time() - c0
    return {
        "cpu_s": cpu,
        "campaign_id": result.campaign_id,
        "message_id": result.message_id,
        "queued": result.queued,
        "duplicates": result.duplicates,
        "invalid": result.invalid,
        "start": t0,
        "rows_inserted": last_progress[0],  # the last batch INSERTed (before COMMIT, publish)
        "end": t1,  # committed and published
        "peak_rss_kb": _kb("VmHWM"),
        "rss_kb": _kb("VmRSS"),
    }


def _send(i: int, prefix: str) -> dict[str, float | int]:
    import mailer

    t_call = time.time()
    message_id = mailer.send(
        content.TXN_TEMPLATE,
        f"{prefix}{i:04d}@bench.example.com",
        {"link": f"https://example.com/reset/{i:08x}"},
    )
    return {"message_id": message_id, "call": t_call, "returned": time.time()}


def txn(
    count: int, interval: float, stop_file: str | None, prefix: str, warm_up: float | None
) -> dict[str, object]:
    # the first send() of a process pays for imports, the engine and the broker connection: a
    # web backend pays that once per process, so it is measured apart (warm_up), not counted
    warm = None
    if warm_up is not None:
        warm = _send(0, prefix + "-warm")
        time.sleep(warm_up)
    sends = []
    start = time.time()
    for i in range(count):
        due = start + i * interval
        pause = due - time.time()
        if pause > 0:
            time.sleep(pause)
        if stop_file and os.path.exists(stop_file):
            break
        sends.append(_send(i, prefix))
    return {"sends": sends, "warm_up": warm, "peak_rss_kb": _kb("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup")
    p = sub.add_parser("campaign")
    p.add_argument("n", type=int)
    p = sub.add_parser("txn")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--stop-file")
    p.add_argument("--to-prefix", default="txn")
    p.add_argument(
        "--warm-up",
        type=float,
        metavar="SECONDS",
        help="one unmeasured send() first, then wait this long",
    )
    args = parser.parse_args()
    if args.cmd == "setup":
        out = setup()
    elif args.cmd == "campaign":
        out = campaign(args.n)
    else:
        out = txn(args.count, args.interval, args.stop_file, args.to_prefix, args.warm_up)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
