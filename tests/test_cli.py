"""The `mailer` command: every command has help, errors are one clear line, the flow works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mailer.cli import cli
from mailer.transport.memory import MemoryTransport
from tests.helpers import deliveries


def _paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, command in group.commands.items():
        out.append((*prefix, name))
        if isinstance(command, click.Group):
            out.extend(_paths(command, (*prefix, name)))
    return out


@pytest.mark.parametrize("path", _paths(cli), ids=" ".join)
def test_every_command_has_help(path: tuple[str, ...], configure_env) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    command = cli
    for part in path:
        command = command.commands[part]  # type: ignore[attr-defined]
    assert command.help, f"`mailer {' '.join(path)}` has no description"


def _mailer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailer", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_a_bad_setting_is_one_line_naming_the_variable() -> None:
    result = _mailer("config", env={"MAILER_SMTP_URL": "http://relay"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: MAILER_SMTP_URL: scheme must be smtp:// or smtps://, got 'http' (got 'http://relay')"
    ]


def test_a_missing_schema_says_to_run_db_upgrade(tmp_path: Path) -> None:
    result = _mailer(
        "campaign", "status", "1", env={"MAILER_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"}
    )
    assert result.returncode == 1
    assert "run `mailer db upgrade`" in result.stderr
    assert "Traceback" not in result.stderr


def test_template_campaign_status_and_report(sqlite_db: str, tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("Hi {{ name }}\n")
    (tmp_path / "t.txt").write_text("Hello {{ name }}\n")
    rows = "email,name\na@example.com,Ann\nb@example.com,Bob\na@example.com,Ann\n"
    (tmp_path / "r.csv").write_text(rows)
    runner = CliRunner()
    out = runner.invoke(
        cli,
        [
            "template",
            "add",
            "news",
            "--subject",
            str(tmp_path / "s.txt"),
            "--text",
            str(tmp_path / "t.txt"),
        ],
    )
    assert out.exit_code == 0 and "version 1" in out.output
    out = runner.invoke(
        cli, ["campaign", "send", "--template", "news", "--recipients", str(tmp_path / "r.csv")]
    )
    assert out.exit_code == 0, out.output
    campaign_id = int(out.stdout.strip().splitlines()[-1])
    assert "2 queued" in out.stderr and "1 duplicates dropped" in out.stderr

    from mailer.delivery import deliver_chunk

    deliver_chunk([d.id for d in deliveries()], transport=MemoryTransport())
    out = runner.invoke(cli, ["campaign", "status", str(campaign_id), "--json"])
    status = json.loads(out.stdout)
    assert status["counts"] == {"sent": 2} and status["progress"] == 1.0
    out = runner.invoke(cli, ["report", str(campaign_id), "--format", "csv"])
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("recipient,state,attempts,code")
    assert lines[1].startswith("a@example.com,sent,1,250")


def test_campaign_file_without_email_column_is_refused(sqlite_db: str, tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("mail,name\na@example.com,Ann\n")
    from tests.helpers import add_template

    add_template("news")
    out = CliRunner().invoke(
        cli, ["campaign", "send", "--template", "news", "--recipients", str(tmp_path / "r.csv")]
    )
    assert out.exit_code != 0
    assert "no 'email' column" in str(out.exception)
