"""Fixtures of the dashboard's tests: accounts, an app on the test database, a signed-in client."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import create_engine, text
from starlette.testclient import TestClient

from mailer import clock, db
from mailer.config import WebSettings
from mailer.models import Role
from mailer.web import accounts
from mailer.web.app import create_app

SECRET = "a test key, long enough to sign cookies"
PASSWORD = "correct horse battery"

MakeUser = Callable[..., None]


def _truncate_users(url: str) -> None:
    """The accounts, and the campaign counts that pg_db leaves (ids start again at 1)."""
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text("TRUNCATE users, state_counts, state_count_changes"))
    eng.dispose()


@pytest.fixture(autouse=True)
def cheap_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2 at its lowest cost: the tests check what is hashed and verified, not the cost."""
    from argon2 import PasswordHasher

    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    monkeypatch.setattr(accounts, "_hasher", cheap)
    monkeypatch.setattr(accounts, "_DUMMY_HASH", cheap.hash("not a password anyone has"))


@pytest.fixture
def web_db(pg_db: str) -> str:
    """The PostgreSQL test schema, emptied, with no accounts."""
    _truncate_users(pg_db)
    return pg_db


@pytest.fixture
def make_user(web_db: str) -> MakeUser:
    def make(name: str, role: Role = Role.OPERATOR, password: str = PASSWORD) -> None:
        with db.session_scope() as session:
            accounts.add(session, name, role, password, clock.now())

    return make


def web_settings(**changes: object) -> WebSettings:
    values: dict[str, object] = {
        "secret": SECRET,
        "cookie_secure": False,
        "trusted_header": None,
        "trusted_proxies": (),
    }
    values.update(changes)
    return WebSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def client(web_db: str) -> Iterator[TestClient]:
    app = create_app(web_settings(), broker_url="memory://")
    with TestClient(app, base_url="http://testserver") as c:
        yield c


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page carries no CSRF token"
    return found.group(1)


def sign_in(c: TestClient, name: str, password: str = PASSWORD) -> str:
    """Sign in through the form; returns the session's CSRF token."""
    token = csrf_of(c.get("/login").text)
    response = c.post(
        "/login",
        data={"name": name, "password": password, "csrf": token},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    return csrf_of(c.get("/").text)
