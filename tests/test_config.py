"""Settings: a wrong value stops start-up with a message naming its variable."""

from __future__ import annotations

import pytest

from mailer import config
from mailer.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("MAILER_DATABASE_URL", "mysql://db/x", "only sqlite:/// and postgresql://"),
        ("MAILER_BROKER_URL", "amqp://guest@rabbit", "must be a redis://"),
        ("MAILER_SMTP_URL", "http://relay", "scheme must be smtp:// or smtps://"),
        ("MAILER_RETRY_FIRST_DELAY", "soon", "could not convert"),
        ("MAILER_RETRY_MAX_AGE", "nan", "finite"),
        ("MAILER_RETRY_FACTOR", "0.5", "must be 1 or more"),
        ("MAILER_RETRY_MAX_ATTEMPTS", "0", "1 or more"),
        ("MAILER_AMBIGUOUS", "maybe", "hold or retry"),
        ("MAILER_SMTP_SESSIONS", "-2", "1 or more"),
        ("MAILER_LOG_LEVEL", "LOUD", "DEBUG, INFO"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config.load({name: value})
    assert refused.value.variable == name
    assert says in str(refused.value) and str(refused.value).startswith(f"{name}: ")


def test_defaults_load() -> None:
    settings = config.load({})
    assert settings.database_url.startswith("sqlite:///")
    assert settings.smtp.port == 25 and settings.smtp.tls == "opportunistic"
    assert settings.ambiguous == "hold" and settings.retry.max_age == 4 * 86400


def test_postgresql_urls_use_psycopg_and_passwords_are_not_shown() -> None:
    settings = config.load({"MAILER_DATABASE_URL": "postgresql://u:pw@db/mailer"})
    assert settings.database_url.startswith("postgresql+psycopg://")
    with pytest.raises(ConfigError) as refused:
        config.load({"MAILER_SMTP_URL": "smtp://apikey:s3cret"})
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize(
    ("relay", "sessions"),
    [
        ("smtp://localhost:25", 2),
        ("smtp://127.0.0.1:2525", 2),
        ("smtp://127.0.0.53", 2),
        ("smtp://[::1]:25", 2),
        ("smtp://mail.localhost", 2),
        ("smtp://LOCALHOST.:25", 2),
        ("smtp://[::ffff:127.0.0.1]:25", 2),
        ("smtp://relay.example.com:587", 4),
        ("smtp://10.0.0.7:25", 4),
        ("smtps://[2001:db8::1]:465", 4),
    ],
)
def test_sessions_by_default_depend_on_where_the_relay_is(relay: str, sessions: int) -> None:
    assert config.load({"MAILER_SMTP_URL": relay}).smtp_sessions == sessions
    chosen = {"MAILER_SMTP_URL": relay, "MAILER_SMTP_SESSIONS": "8"}
    assert config.load(chosen).smtp_sessions == 8
    assert config.load({**chosen, "MAILER_SMTP_SESSIONS": "AUTO"}).smtp_sessions == sessions
