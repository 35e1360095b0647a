"""The pages through the app (no browser): what they show, the actions' dry run and
confirmation, the audit they leave, the CSV export, and escaping of outside data."""

from __future__ import annotations

import csv
import io
import json

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from mailer.cli import cli
from mailer.models import Role
from tests.web import scenario
from tests.web.conftest import MakeUser, csrf_of, sign_in


def _counts(campaign_id: int) -> dict[str, int]:
    """`mailer campaign status --json`: what the CLI says of the campaign."""
    result = CliRunner().invoke(cli, ["campaign", "status", str(campaign_id), "--json"])
    assert result.exit_code == 0, result.output
    counts: dict[str, int] = json.loads(result.output)["counts"]
    return counts


@pytest.fixture
def data(web_db: str) -> scenario.Scenario:
    return scenario.build()


@pytest.fixture
def operator(client: TestClient, make_user: MakeUser) -> str:
    make_user("olga", Role.OPERATOR)
    return sign_in(client, "olga")


def test_the_overview_shows_campaigns_queue_and_relay(
    client: TestClient, operator: str, data: scenario.Scenario
) -> None:
    html = client.get("/").text
    assert f'href="/campaigns/{data.campaign_id}"' in html
    assert "December &lt;news&gt; &amp; offers" in html
    assert "sent 6" in html and "bounced 2" in html and "failed 3" in html
    assert 'id="transactional-queued">1<' in html  # the password reset waits
    assert 'id="bulk-queued">0<' in html
    assert 'id="transactional-latency">none sent lately<' in html  # the reset has not gone yet
    live = client.get("/live/overview")
    assert live.status_code == 200 and 'id="overview-live"' in live.text


def test_a_campaign_page_filters_and_pages_by_key(
    client: TestClient, operator: str, data: scenario.Scenario
) -> None:
    url = f"/campaigns/{data.campaign_id}"
    assert 'hx-get="/campaigns/1/breakdown"' in client.get(url).text
    fragment = client.get(f"{url}/breakdown", headers={"HX-Request": "true"}).text
    assert "hard_bounce" in fragment and "example.com" in fragment and "<html" not in fragment
    assert "<html" in client.get(f"{url}/breakdown").text
    bounced = client.get(url, params={"state": "bounced"}).text
    assert all(a in bounced for a in scenario.GONE) and scenario.GOOD[0] not in bounced
    by_enhanced = client.get(url, params={"enhanced": "5.7"}).text
    assert all(a in by_enhanced for a in scenario.POLICY) and scenario.GONE[0] not in by_enhanced
    bad = client.get(url, params={"code": "6xx"})
    assert bad.status_code == 400 and "code" in bad.text


def test_keyset_pages_cover_every_delivery_once(
    client: TestClient, operator: str, data: scenario.Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailer.web import campaigns

    monkeypatch.setattr(campaigns, "PAGE_SIZE", 4)
    seen: list[str] = []
    url = f"/campaigns/{data.campaign_id}"
    query: dict[str, str] = {}
    for _ in range(10):
        html = client.get(url, params=query).text
        seen += [a for a in [*scenario.GOOD, *scenario.GONE, *scenario.POLICY] if f">{a}<" in html]
        if 'id="next-page"' not in html:
            break
        query = {"after": html.split('id="next-page"')[0].rsplit("after=", 1)[1].split('"')[0]}
    assert sorted(seen) == sorted([*scenario.GOOD, *scenario.GONE, *scenario.POLICY])


def test_the_csv_export_holds_exactly_the_filter(
    client: TestClient, operator: str, data: scenario.Scenario
) -> None:
    response = client.get(f"/campaigns/{data.campaign_id}/export.csv", params={"state": "failed"})
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert sorted(r["recipient"] for r in rows) == sorted(
        [*scenario.POLICY, scenario.HOSTILE_ADDRESS]
    )


def test_search_by_recipient_shows_every_message_and_why(
    client: TestClient, operator: str, data: scenario.Scenario
) -> None:
    html = client.get("/recipients", params={"q": scenario.POLICY[0]}).text
    assert f"campaign {data.campaign_id}" in html
    assert f"transactional message {data.transactional_id}" in html
    assert "Message refused by policy" in html and "5.7.1" in html
    assert "not tried yet" in html and "next attempt" in html  # the reset waits
    bounced = client.get("/recipients", params={"q": scenario.GONE[0]}).text
    assert "No such user here" in bounced and "hard_bounce" in bounced


def test_retry_shows_the_dry_run_then_does_it_and_the_cli_agrees(
    client: TestClient, operator: str, data: scenario.Scenario
) -> None:
    query = {"campaign": str(data.campaign_id), "state": "failed"}
    dry_cli = CliRunner().invoke(
        cli, ["retry", "--campaign", str(data.campaign_id), "--state", "failed", "--dry-run"]
    )
    assert dry_cli.exit_code == 0 and dry_cli.output.startswith("3 ")
    preview = client.get("/actions/retry", params=query)
    assert "3 deliveries would be queued again" in preview.text
    assert _counts(data.campaign_id)["failed"] == 3  # the dry run changed nothing
    done = client.post("/actions/retry", data={**query, "csrf": csrf_of(preview.text)})
    assert done.status_code == 200 and "3 deliveries queued again" in done.text
    counts = _counts(data.campaign_id)
    assert counts.get("failed", 0) == 0 and counts["queued"] == 3
    audit = client.get("/audit").text
    assert "olga" in audit and "retry" in audit and "&#34;campaign_id&#34;" in audit


def test_a_state_alone_is_refused(
    client: TestClient, operator: str, data: scenario.Scenario
) -> None:
    response = client.get("/actions/retry", params={"state": "failed"})
    assert response.status_code == 400 and "say which deliveries" in response.text


def test_a_viewer_cannot_act_even_with_the_token(
    client: TestClient, make_user: MakeUser, data: scenario.Scenario
) -> None:
    make_user("vic", Role.VIEWER)
    token = sign_in(client, "vic")
    query = {"campaign": str(data.campaign_id), "state": "failed"}
    assert "Retry these" not in client.get(f"/campaigns/{data.campaign_id}").text
    refused = client.post("/actions/retry", data={**query, "csrf": token})
    assert refused.status_code == 403
    assert _counts(data.campaign_id)["failed"] == 3


def test_pause_and_resume_a_campaign(
    client: TestClient, operator: str, data: scenario.Scenario
) -> None:
    url = f"/campaigns/{data.campaign_id}/pause"
    preview = client.get(url)
    assert "0 waiting deliveries would be held back" in preview.text
    client.post(url, data={"csrf": operator})
    assert "paused" in client.get(f"/campaigns/{data.campaign_id}").text
    client.post(f"/campaigns/{data.campaign_id}/resume", data={"csrf": operator})
    assert 'class="tag warn">paused' not in client.get(f"/campaigns/{data.campaign_id}").text


def test_the_suppression_list_search_add_remove_import_export(
    client: TestClient, operator: str, data: scenario.Scenario
) -> None:
    listed = client.get("/suppressions", params={"q": "gone"}).text
    assert all(a in listed for a in scenario.GONE) and scenario.GOOD[0] not in listed
    preview = client.post(
        "/suppressions/preview",
        data={"csrf": operator, "do": "add", "addresses": "new@example.com\ngone1@example.org"},
    )
    assert "1 of these addresses would be added" in preview.text
    client.post(
        "/suppressions/add",
        data={"csrf": operator, "addresses": "new@example.com\ngone1@example.org"},
    )
    assert "new@example.com" in client.get("/suppressions").text
    client.post("/suppressions/remove", data={"csrf": operator, "addresses": "new@example.com"})
    assert "new@example.com" not in client.get("/suppressions").text
    upload = client.post(
        "/suppressions/import",
        data={"csrf": operator},
        files={"file": ("list.csv", b"email,reason\nimp@example.com,complaint\n", "text/csv")},
    )
    assert "1 added" in upload.text
    exported = client.get("/suppressions/export.csv").text
    assert "imp@example.com,complaint" in exported and "gone2@example.org" in exported
    bad = client.post(
        "/suppressions/import",
        data={"csrf": operator},
        files={"file": ("list.csv", b"email\nnot an address\n", "text/csv")},
    )
    assert bad.status_code == 400 and "line 2" in bad.text


def test_outside_data_is_escaped_on_every_page(
    client: TestClient, operator: str, data: scenario.Scenario
) -> None:
    pages = [
        client.get("/recipients", params={"q": scenario.HOSTILE_ADDRESS}).text,
        client.get(f"/campaigns/{data.campaign_id}", params={"state": "failed"}).text,
    ]
    for html in pages:
        assert "<script>window.pwned" not in html and '<b id="injected">' not in html
        assert "&lt;script&gt;window.pwned = 1;" in html
    search = client.get("/recipients", params={"q": '"><script>alert(1)</script>@x'}).text
    assert "<script>alert(1)" not in search
