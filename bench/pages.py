"""Each dashboard page's server time on a big outbox:

    .venv/bin/python bench/pages.py [DELIVERIES] [ROUNDS] [CAMPAIGN_SIZE]

Builds an outbox of its own (tests/outbox_scale.py: campaigns of CAMPAIGN_SIZE, by default
100,000, two attempts a delivery) in a schema it drops at the end, then requests each page
ROUNDS times through the app in this process and prints p50 and p95 of the time the app took.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from starlette.testclient import TestClient

# the outbox builder and the sign-in are the tests' own (tests/outbox_scale.py, tests/web)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailer import clock, config, db
from mailer.models import Role
from mailer.web import accounts
from mailer.web.app import create_app
from tests import outbox_scale
from tests.conftest import PG_URL
from tests.web.conftest import PASSWORD, sign_in, web_settings


def pages(campaigns: int, size: int) -> list[str]:
    last = campaigns
    return [
        "/",
        "/live/overview",
        f"/campaigns/{last}",
        f"/campaigns/{last}/live",
        f"/campaigns/{last}/breakdown",
        f"/campaigns/{last}?state=failed",
        f"/campaigns/{last}?state=deferred&domain=example7.com",
        f"/campaigns/{last}?reply=ok&after={(last - 1) * size + size // 2}",
        "/recipients?q=user999901@example1.com",
        "/suppressions",
        "/suppressions?q=user12",
        "/audit",
        f"/actions/retry?campaign={last}&state=failed",
        f"/actions/retry?campaign={last}&code=5xx&state=failed,bounced",
    ]


def main(deliveries: int, rounds: int, campaign_size: int) -> None:
    schema = f"mailer_webmeasure_{os.getpid()}"
    started = time.perf_counter()
    outbox = outbox_scale.build(PG_URL, schema, deliveries, campaign_size=campaign_size)
    print(
        f"built {deliveries:,} deliveries in campaigns of {campaign_size:,} "
        f"in {time.perf_counter() - started:.0f} s"
    )
    os.environ["MAILER_DATABASE_URL"] = outbox.url
    config.reload()
    db.reset()
    db.set_role("producer")
    try:
        with db.session_scope() as session:
            accounts.add(session, "measure", Role.OPERATOR, PASSWORD, clock.now())
        app = create_app(web_settings(), broker_url="memory://")
        with TestClient(app) as client:
            sign_in(client, "measure")
            print(f"{'page':62} {'p50 ms':>7} {'p95 ms':>7}")
            for path in pages(outbox.campaigns, campaign_size):
                times = []
                for _ in range(rounds):
                    t = time.perf_counter()
                    response = client.get(path)
                    times.append((time.perf_counter() - t) * 1000)
                    assert response.status_code == 200, (path, response.status_code)
                times.sort()
                p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
                print(f"{path:62} {statistics.median(times):7.1f} {p95:7.1f}")
    finally:
        db.reset()
        if not os.environ.get("MEASURE_KEEP"):
            outbox_scale.drop(PG_URL, schema)
        else:
            print(f"kept: {outbox.url}")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    defaults = [1_000_000, 20, 100_000]
    main(*(args + defaults[len(args) :]))
