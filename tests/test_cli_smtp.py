"""`mailer verify` and `mailer smtp check` against the scripted server."""

from __future__ import annotations

from click.testing import CliRunner

from mailer.cli import cli
from mailer.testing.smtpserver import ScriptedSMTPServer

SECRET = "Sup3r-S3cret-pw"


def test_verify_prints_the_reply_and_its_meaning(smtp_server, configure_env) -> None:
    configure_env(smtp_url=smtp_server.url(tls="none"))
    smtp_server.set_vrfy("ann@example.com", "250 2.1.5 Ann <ann@example.com>")
    smtp_server.set_vrfy("gone@example.com", "550 5.1.1 No such user")
    runner = CliRunner()
    known = runner.invoke(cli, ["verify", "ann@example.com"])
    assert known.exit_code == 0
    assert "250 2.1.5 Ann" in known.output and "knows this address" in known.output
    assert "does not know" in runner.invoke(cli, ["verify", "gone@example.com"]).output
    assert "will not say" in runner.invoke(cli, ["verify", "other@example.com"]).output


def test_smtp_check_shows_each_step_and_never_the_password(configure_env) -> None:
    with ScriptedSMTPServer(auth={"mailer": SECRET}) as server:
        configure_env(smtp_url=server.url(user="mailer", password=SECRET, tls="none"))
        result = CliRunner().invoke(cli, ["smtp", "check"])
    assert result.exit_code == 0, result.output
    steps = [line.split()[0] for line in result.output.splitlines()]
    assert steps == ["relay", "connect", "ehlo", "auth", "noop", "quit", "relay"]
    assert "PIPELINING" in result.output.upper()
    assert SECRET not in result.output


def test_smtp_check_names_the_failing_step(configure_env) -> None:
    with ScriptedSMTPServer() as server:  # no STARTTLS offered
        configure_env(smtp_url=server.url(tls="starttls"))
        result = CliRunner().invoke(cli, ["smtp", "check"])
    assert result.exit_code == 1
    assert "starttls  FAILED" in result.output and "does not offer STARTTLS" in result.output
    assert result.output.strip().endswith("relay check FAILED")


def test_bad_credentials_fail_at_auth(configure_env) -> None:
    with ScriptedSMTPServer(auth={"mailer": SECRET}) as server:
        configure_env(smtp_url=server.url(user="mailer", password="wrong-one", tls="none"))
        result = CliRunner().invoke(cli, ["smtp", "check"])
    assert result.exit_code == 1
    assert "auth      FAILED: 535" in result.output
    assert "wrong-one" not in result.output
