"""Sign-in, sessions, CSRF and roles: what `auth.guard` must refuse, through the real app."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from mailer import clock, db
from mailer.models import Role
from mailer.web import accounts
from mailer.web.app import create_app
from tests.web.conftest import PASSWORD, MakeUser, csrf_of, sign_in, web_settings

PUBLIC = {"/healthz", "/login"}


def _guarded_routes(client: TestClient) -> list[tuple[str, str]]:
    found = []
    for route in client.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, Route) and route.path not in PUBLIC and route.path != "/logout":
            path = route.path.replace("{campaign_id:int}", "1").replace("{action}", "retry")
            found += [(method, path) for method in route.methods or () if method != "HEAD"]
    return found


def test_nothing_but_health_and_login_is_served_without_a_session(client: TestClient) -> None:
    assert client.get("/healthz").text == "ok\n"
    routes = _guarded_routes(client)
    assert ("GET", "/") in routes and any(m == "POST" for m, _ in routes)
    for method, path in routes:
        response = client.request(method, path, follow_redirects=False)
        assert response.status_code in (303, 401), (method, path, response.status_code)
        if method == "GET":
            assert response.headers["location"].startswith("/login?next=")


def test_signing_in_sets_a_signed_httponly_lax_cookie(
    client: TestClient, make_user: MakeUser
) -> None:
    make_user("ann")
    token = csrf_of(client.get("/login").text)
    response = client.post(
        "/login",
        data={"name": "ann", "password": PASSWORD, "csrf": token, "next": "/suppressions"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/suppressions"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    page = client.get("/")
    assert page.status_code == 200 and "ann (operator)" in page.text


def test_the_cookie_is_secure_when_asked(web_db: str, make_user: MakeUser) -> None:
    make_user("ann")
    app = create_app(web_settings(cookie_secure=True), broker_url="memory://")
    with TestClient(app, base_url="https://testserver") as c:
        token = csrf_of(c.get("/login").text)
        response = c.post(
            "/login",
            data={"name": "ann", "password": PASSWORD, "csrf": token},
            follow_redirects=False,
        )
        assert "secure" in response.headers["set-cookie"].lower()


def test_a_wrong_password_is_refused_and_says_nothing_of_the_name(
    client: TestClient, make_user: MakeUser
) -> None:
    make_user("ann")
    token = csrf_of(client.get("/login").text)
    wrong = client.post("/login", data={"name": "ann", "password": "nope", "csrf": token})
    unknown = client.post("/login", data={"name": "bob", "password": "nope", "csrf": token})
    assert wrong.status_code == unknown.status_code == 401
    assert "Wrong name or password." in wrong.text and "Wrong name or password." in unknown.text
    assert client.get("/", follow_redirects=False).status_code == 303


def test_failed_sign_ins_are_limited_per_name(client: TestClient, make_user: MakeUser) -> None:
    make_user("ann")
    token = csrf_of(client.get("/login").text)
    for _ in range(5):
        assert (
            client.post(
                "/login", data={"name": "ann", "password": "wrong", "csrf": token}
            ).status_code
            == 401
        )
    right = client.post("/login", data={"name": "ann", "password": PASSWORD, "csrf": token})
    assert right.status_code == 429 and "Too many failed sign-ins" in right.text


def test_failed_sign_ins_are_limited_per_address(client: TestClient, make_user: MakeUser) -> None:
    make_user("zed")
    token = csrf_of(client.get("/login").text)
    for n in range(20):
        client.post("/login", data={"name": f"nobody{n}", "password": "x", "csrf": token})
    right = client.post("/login", data={"name": "zed", "password": PASSWORD, "csrf": token})
    assert right.status_code == 429


def test_a_post_without_the_csrf_token_is_refused(client: TestClient, make_user: MakeUser) -> None:
    make_user("ann")
    token = sign_in(client, "ann")
    no_token = client.post("/relays/resume", data={}, follow_redirects=False)
    assert no_token.status_code == 403 and "security token" in no_token.text
    wrong = client.post("/relays/resume", data={"csrf": token + "x"})
    assert wrong.status_code == 403
    login_without = client.post("/login", data={"name": "ann", "password": PASSWORD})
    assert login_without.status_code == 403
    logout_without = client.post("/logout", follow_redirects=False)
    assert logout_without.status_code == 403
    assert client.get("/", follow_redirects=False).status_code == 200


def test_a_viewer_sees_but_cannot_act(client: TestClient, make_user: MakeUser) -> None:
    make_user("vic", Role.VIEWER)
    token = sign_in(client, "vic")
    assert client.get("/").status_code == 200
    refused = client.post("/relays/resume", data={"csrf": token})
    assert refused.status_code == 403 and "viewer" in refused.text
    assert client.get("/relays/resume").status_code == 403


def test_a_changed_password_or_a_removed_user_ends_the_session(
    client: TestClient, make_user: MakeUser
) -> None:
    make_user("ann")
    sign_in(client, "ann")
    with db.session_scope() as session:
        accounts.set_password(session, "ann", "another long password", clock.now())
    assert client.get("/", follow_redirects=False).status_code == 303
    sign_in(client, "ann", "another long password")
    with db.session_scope() as session:
        accounts.remove(session, "ann")
    assert client.get("/", follow_redirects=False).status_code == 303


@pytest.mark.parametrize(
    "target", ["//evil.example/", "https://evil.example/", "/\\evil.example", "javascript:x"]
)
def test_sign_in_never_redirects_off_site(
    client: TestClient, make_user: MakeUser, target: str
) -> None:
    make_user("ann")
    token = csrf_of(client.get("/login").text)
    response = client.post(
        "/login",
        data={"name": "ann", "password": PASSWORD, "csrf": token, "next": target},
        follow_redirects=False,
    )
    assert response.headers["location"] == "/"


def test_a_trusted_proxy_may_name_the_user(web_db: str, make_user: MakeUser) -> None:
    make_user("sso-ann", Role.VIEWER)
    settings = web_settings(trusted_header="X-Remote-User", trusted_proxies=())
    from ipaddress import ip_network

    settings = web_settings(
        trusted_header="X-Remote-User", trusted_proxies=(ip_network("10.0.0.0/8"),)
    )
    app = create_app(settings, broker_url="memory://")
    with TestClient(app, client=("10.1.2.3", 5000)) as proxied:
        page = proxied.get("/", headers={"X-Remote-User": "sso-ann"}, follow_redirects=False)
        assert page.status_code == 200 and "sso-ann (viewer)" in page.text
        unknown = proxied.get("/", headers={"X-Remote-User": "mallory"}, follow_redirects=False)
        assert unknown.status_code == 303
    with TestClient(app, client=("192.0.2.7", 5000)) as direct:
        page = direct.get("/", headers={"X-Remote-User": "sso-ann"}, follow_redirects=False)
        assert page.status_code == 303


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    for path in ("/login", "/healthz", "/static/style.css", "/nowhere"):
        headers = client.get(path).headers
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"


def test_the_app_refuses_to_start_without_a_secret(web_db: str) -> None:
    from mailer.errors import ConfigError

    with pytest.raises(ConfigError, match="MAILER_WEB_SECRET"):
        create_app(web_settings(secret=""), broker_url="memory://")


def test_metrics_are_served_without_login_when_given(web_db: str) -> None:
    async def metrics(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"mailer_up 1\n"})

    app = create_app(web_settings(), broker_url="memory://", metrics=metrics)
    with TestClient(app) as c:
        assert c.get("/metrics").text == "mailer_up 1\n"
        assert c.get("/", follow_redirects=False).status_code == 303
