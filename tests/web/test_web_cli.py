"""`mailer user` and `mailer web` from the command line."""

from __future__ import annotations

from click.testing import CliRunner
from sqlalchemy import select

from mailer import clock, config, db
from mailer.cli import cli
from mailer.models import Role, User
from mailer.web import accounts
from tests.web.conftest import PASSWORD


def _run(*args: str, stdin: str | None = None) -> tuple[int, str]:
    """Exit code, and the output with the error a MailerError would print."""
    result = CliRunner().invoke(cli, list(args), input=stdin)
    error = "" if result.exception is None else str(result.exception)
    return result.exit_code, result.output + error


def test_user_add_list_passwd_remove(web_db: str) -> None:
    code, out = _run("user", "add", "ann", "--role", "operator", "--password-stdin", stdin=PASSWORD)
    assert code == 0 and "user ann added (operator)" in out
    with db.session_scope() as session:
        stored = session.scalar(select(User.password_hash).where(User.name == "ann"))
        assert stored is not None and stored.startswith("$argon2id$") and PASSWORD not in stored
        assert accounts.authenticate(session, "ann", PASSWORD, clock.now()) is not None
    code, out = _run("user", "list")
    assert code == 0 and "ann" in out and "operator" in out
    code, _ = _run("user", "passwd", "ann", "--password-stdin", stdin="a new long password")
    with db.session_scope() as session:
        assert accounts.authenticate(session, "ann", PASSWORD, clock.now()) is None
        assert accounts.authenticate(session, "ann", "a new long password", clock.now())
    assert _run("user", "remove", "ann")[0] == 0
    assert "ann" not in _run("user", "list")[1]


def test_user_add_prompts_twice_and_refuses_bad_input(web_db: str) -> None:
    code, out = _run("user", "add", "bob", "--role", "viewer", stdin=f"{PASSWORD}\n{PASSWORD}\n")
    assert code == 0 and "user bob added (viewer)" in out
    code, out = _run("user", "add", "bob", "--role", "admin", "--password-stdin", stdin=PASSWORD)
    assert code != 0 and "exists already" in out
    result = CliRunner().invoke(
        cli, ["user", "add", "cat", "--role", "admin", "--password-stdin"], input="short"
    )
    assert result.exit_code != 0 and "at least 10 characters" in str(result.exception)
    result = CliRunner().invoke(cli, ["user", "add", "dan", "--role", "root"], input=PASSWORD)
    assert result.exit_code == 2
    with db.session_scope() as session:
        assert [name for name, _, _ in accounts.listing(session)] == ["bob"]
        assert accounts.get(session, "bob") == accounts.get(session, "bob")
        assert accounts.get(session, "bob").role is Role.VIEWER  # type: ignore[union-attr]


def test_mailer_web_refuses_to_start_without_a_secret(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("MAILER_WEB_SECRET", raising=False)
    result = CliRunner().invoke(cli, ["web", "--port", "1"])
    assert result.exit_code != 0
    assert "MAILER_WEB_SECRET" in str(result.exception) and "token_urlsafe" in str(result.exception)


def test_web_settings_are_checked() -> None:
    import pytest

    from mailer.errors import ConfigError

    with pytest.raises(ConfigError, match="MAILER_WEB_SECRET"):
        config.web({"MAILER_WEB_SECRET": "short"})
    with pytest.raises(ConfigError, match="MAILER_WEB_TRUSTED_PROXIES"):
        config.web({"MAILER_WEB_SECRET": "x" * 20, "MAILER_WEB_TRUSTED_PROXIES": "not-an-ip"})
    with pytest.raises(ConfigError, match="MAILER_WEB_COOKIE_SECURE"):
        config.web({"MAILER_WEB_SECRET": "x" * 20, "MAILER_WEB_COOKIE_SECURE": "yes"})
    web = config.web(
        {"MAILER_WEB_SECRET": "x" * 20, "MAILER_WEB_TRUSTED_PROXIES": "10.0.0.0/8, ::1"}
    )
    assert len(web.trusted_proxies) == 2 and not web.cookie_secure


def test_mailer_web_serves_the_app(web_db: str) -> None:
    """`mailer web` as a user starts it: uvicorn and the app factory, in a process of its own."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "MAILER_DATABASE_URL": web_db, "MAILER_WEB_SECRET": "k" * 32}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailer", "web", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        body = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as response:
                    body = response.read()
                break
            except OSError:
                time.sleep(0.2)
        assert body == b"ok\n", proc.stderr.read().decode() if proc.poll() is not None else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as response:
            assert response.url.endswith("/login?next=%2F")  # redirected to sign in
            assert b'name="csrf"' in response.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
