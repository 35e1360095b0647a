"""The dashboard in a real headless chromium: sign in, find a bounced recipient, bulk-retry
after the dry run (and the CLI agrees), a viewer refused, a POST without its CSRF token
refused, a reply holding markup and a script shown as text with nothing run. Saves
screenshots of the main pages to $MAILER_SCREENSHOTS (`MAILER_SCREENSHOTS=docs/screenshots`
refreshes the README's), else to a temporary directory."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mailer.cli import cli
from mailer.models import Role
from mailer.web.app import create_app
from tests.conftest import free_port
from tests.web import scenario
from tests.web.browser import chrome, require_chromium, serving
from tests.web.conftest import PASSWORD, MakeUser, web_settings

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(
    os.environ.get("MAILER_SCREENSHOTS") or Path(tempfile.gettempdir()) / "mailer-screenshots"
)


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    require_chromium()
    from selenium.webdriver.remote.webdriver import WebDriver

    browser = chrome()
    assert isinstance(browser, WebDriver)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def site(web_db: str, driver: Any) -> Iterator[str]:
    """The app on a free port, on the test database; the browser without cookies."""
    app = create_app(web_settings(), broker_url="memory://")
    with serving(app, free_port()) as url:
        driver.get(url + "/healthz")
        driver.delete_all_cookies()
        yield url


@pytest.fixture
def data(web_db: str) -> scenario.Scenario:
    return scenario.build()


def _wait_for(driver: Any, css: str) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 30).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def _sign_in(driver: Any, site: str, name: str, shot: bool = False) -> None:
    from selenium.webdriver.common.by import By

    driver.get(site + "/")
    _wait_for(driver, "#sign-in")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    if shot:
        _screenshot(driver, "login")
    driver.find_element(By.ID, "sign-in").click()
    _wait_for(driver, "#overview-live")


def _screenshot(driver: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def _counts(campaign_id: int) -> dict[str, int]:
    result = CliRunner().invoke(cli, ["campaign", "status", str(campaign_id), "--json"])
    assert result.exit_code == 0, result.output
    counts: dict[str, int] = json.loads(result.output)["counts"]
    return counts


def test_sign_in_and_find_a_bounced_recipient_and_its_attempts(
    driver: Any, site: str, make_user: MakeUser, data: scenario.Scenario
) -> None:
    from selenium.webdriver.common.by import By

    make_user("olga", Role.OPERATOR)
    _sign_in(driver, site, "olga", shot=True)
    assert "olga (operator)" in _text(driver)
    assert "December <news> & offers" in _text(driver)
    _screenshot(driver, "overview")
    driver.find_element(By.LINK_TEXT, "December <news> & offers").click()
    _wait_for(driver, "section#breakdown")  # loaded by htmx after the page
    _screenshot(driver, "campaign")
    driver.find_element(By.LINK_TEXT, "Recipients").click()
    _wait_for(driver, "#q").send_keys(scenario.GONE[0])
    driver.find_element(By.ID, "search").click()
    _wait_for(driver, ".delivery")
    page = _text(driver)
    assert "bounced" in page and "550" in page and "5.1.1" in page
    assert "No such user here" in page and "hard_bounce" in page
    _screenshot(driver, "recipient")
    driver.get(site + "/suppressions")
    _wait_for(driver, "table.suppressions")
    assert scenario.GONE[0] in _text(driver)
    _screenshot(driver, "suppressions")


def test_bulk_retry_after_its_dry_run_and_the_cli_agrees(
    driver: Any, site: str, make_user: MakeUser, data: scenario.Scenario
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    make_user("olga", Role.OPERATOR)
    _sign_in(driver, site, "olga")
    driver.get(f"{site}/campaigns/{data.campaign_id}")
    Select(_wait_for(driver, "#f-state")).select_by_value("failed")
    old = driver.find_element(By.ID, "apply-filter")
    old.click()
    # the filtered page, not the one being left (its link would go stale under the click)
    WebDriverWait(driver, 30).until(expected_conditions.staleness_of(old))
    _wait_for(driver, "#retry-filter").click()
    dry_run = _wait_for(driver, "#dry-run").text
    cli_dry = CliRunner().invoke(
        cli, ["retry", "--campaign", str(data.campaign_id), "--state", "failed", "--dry-run"]
    )
    assert dry_run.startswith("3 deliveries would be queued again")
    assert cli_dry.output.startswith("3 deliveries would be queued again")
    assert _counts(data.campaign_id)["failed"] == 3
    _screenshot(driver, "retry-confirm")
    driver.find_element(By.ID, "confirm").click()
    assert _wait_for(driver, "#done").text.startswith("3 deliveries queued again")
    counts = _counts(data.campaign_id)
    assert "failed" not in counts and counts["queued"] == 3
    driver.get(site + "/audit")
    row = _wait_for(driver, "table.audit tbody tr").text
    assert "olga" in row and "retry" in row and '"campaign_id": 1' in row
    _screenshot(driver, "audit")


def _post_from_the_page(driver: Any, action: str, fields: dict[str, str]) -> None:
    """Submit a form built in the page (what a forged or scripted request would send)."""
    driver.execute_script(
        """
        const form = document.createElement("form");
        form.method = "post";
        form.action = arguments[0];
        for (const [name, value] of Object.entries(arguments[1])) {
          const input = document.createElement("input");
          input.type = "hidden"; input.name = name; input.value = value;
          form.appendChild(input);
        }
        document.body.appendChild(form);
        form.submit();
        """,
        action,
        fields,
    )
    _wait_for(driver, "#why")


def test_a_viewers_action_is_refused(
    driver: Any, site: str, make_user: MakeUser, data: scenario.Scenario
) -> None:
    from selenium.webdriver.common.by import By

    make_user("vic", Role.VIEWER)
    _sign_in(driver, site, "vic")
    driver.get(f"{site}/campaigns/{data.campaign_id}?state=failed")
    _wait_for(driver, "#campaign-live")
    assert not driver.find_elements(By.ID, "retry-filter")  # no action offered to a viewer
    driver.get(f"{site}/actions/retry?campaign={data.campaign_id}&state=failed")
    assert "Not allowed" in _text(driver) and "viewer" in _text(driver)
    token = driver.execute_script("return document.querySelector('input[name=csrf]').value")
    _post_from_the_page(
        driver,
        "/actions/retry",
        {"campaign": str(data.campaign_id), "state": "failed", "csrf": token},
    )
    assert "Not allowed" in _text(driver)
    _screenshot(driver, "viewer-refused")
    assert _counts(data.campaign_id)["failed"] == 3


def test_a_post_without_the_csrf_token_is_refused(
    driver: Any, site: str, make_user: MakeUser, data: scenario.Scenario
) -> None:
    make_user("olga", Role.OPERATOR)
    _sign_in(driver, site, "olga")
    _post_from_the_page(
        driver, "/actions/retry", {"campaign": str(data.campaign_id), "state": "failed"}
    )
    assert "Form expired or forged" in _text(driver)
    assert _counts(data.campaign_id)["failed"] == 3


def test_a_reply_holding_markup_and_a_script_is_shown_as_text(
    driver: Any, site: str, make_user: MakeUser, data: scenario.Scenario
) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    make_user("olga", Role.OPERATOR)
    _sign_in(driver, site, "olga")
    for path in (
        f"/recipients?q={scenario.HOSTILE_ADDRESS}",
        f"/campaigns/{data.campaign_id}?state=failed",
    ):
        driver.get(site + path)
        _wait_for(driver, "main")
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text  # noqa: B018 (the alert's presence is the question)
        assert driver.execute_script("return window.pwned === undefined")
        assert driver.execute_script("return document.getElementById('injected') === null")
        assert "<script>window.pwned = 1; alert('pwned')</script>" in _text(driver)
        assert '<b id="injected">bold</b>' in _text(driver)
        if path.startswith("/recipients"):
            _screenshot(driver, "escaped-reply")
