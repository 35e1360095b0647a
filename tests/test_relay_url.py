"""Relay URLs: schemes, default ports, smtplib's host:port form, credentials, options, errors."""

from __future__ import annotations

import pytest

from mailer.transport.relay import RelayConfig, parse_relay_url


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("smtp://mail.example.com", "mail.example.com", 25, "opportunistic"),
        ("smtp://mail.example.com:0", "mail.example.com", 25, "opportunistic"),
        ("smtp://mail.example.com?tls=starttls", "mail.example.com", 587, "starttls"),
        ("smtp://mail.example.com:0?tls=starttls", "mail.example.com", 587, "starttls"),
        ("smtp://mail.example.com:587", "mail.example.com", 587, "starttls"),
        ("smtp://mail.example.com:587?tls=opportunistic", "mail.example.com", 587, "opportunistic"),
        ("smtp://mail.example.com:2525?tls=none", "mail.example.com", 2525, "none"),
        ("smtp://mail.example.com:465?tls=starttls", "mail.example.com", 465, "starttls"),
        ("smtps://mail.example.com", "mail.example.com", 465, "implicit"),
        ("smtps://mail.example.com:0", "mail.example.com", 465, "implicit"),
        ("smtps://mail.example.com:4650", "mail.example.com", 4650, "implicit"),
        ("smtps://mail.example.com?tls=implicit", "mail.example.com", 465, "implicit"),
        ("SMTP://Mail.Example.COM:25", "mail.example.com", 25, "opportunistic"),
        ("smtp://[::1]:2525?tls=none", "::1", 2525, "none"),
        ("  smtp://mail.example.com/  ", "mail.example.com", 25, "opportunistic"),
    ],
)
def test_schemes_and_default_ports(url: str, host: str, port: int, tls: str) -> None:
    config = parse_relay_url(url)
    assert (config.host, config.port, config.tls) == (host, port, tls)


@pytest.mark.parametrize(
    ("url", "port", "tls"),
    [
        # smtplib.SMTP.connect("host:port") form, percent-encoded inside the host
        ("smtp://mail.example.com%3A2525?tls=none", 2525, "none"),
        ("smtp://mail.example.com%3a587", 587, "starttls"),
        ("smtps://mail.example.com%3A4465", 4465, "implicit"),
        ("smtp://mail.example.com%3A0", 25, "opportunistic"),
    ],
)
def test_host_port_form_as_smtplib_parses_it(url: str, port: int, tls: str) -> None:
    config = parse_relay_url(url)
    assert (config.host, config.port, config.tls) == ("mail.example.com", port, tls)


def test_percent_encoded_credentials() -> None:
    config = parse_relay_url("smtp://us%40er%3Ax:p%40ss%3Aw%2Fo%23rd%3F%25@mail.example.com:587")
    assert config.username == "us@er:x"
    assert config.password == "p@ss:w/o#rd?%"
    assert parse_relay_url("smtp://u:p+q@h").password == "p+q"  # "+" is not a space here
    assert parse_relay_url("smtp://u:p@ss@h").password == "p@ss"  # the last @ ends userinfo
    assert parse_relay_url("smtp://u:@h").password == ""
    assert parse_relay_url("smtp://h").username is None


def test_options() -> None:
    config = parse_relay_url(
        "smtp://mail.example.com?tls=none&ehlo=client.example.org&timeout=5&connect_timeout=2.5"
        "&data_timeout=900&ca_file=/etc/ssl/private%20ca.pem&max_messages=7&idle=0"
        "&pipelining=off"
    )
    assert config == RelayConfig(
        host="mail.example.com",
        port=25,
        tls="none",
        ehlo_name="client.example.org",
        command_timeout=5.0,
        connect_timeout=2.5,
        data_timeout=900.0,
        ca_file="/etc/ssl/private ca.pem",
        max_messages=7,
        idle_noop_after=0.0,
        pipelining=False,
    )
    assert parse_relay_url("smtp://h?pipelining=on").pipelining is True
    assert parse_relay_url("smtp://h?rate=100/s").rate == "100/second"
    assert parse_relay_url("smtp://h?rate=6000/M").rate == "6000/minute"
    assert parse_relay_url("smtp://h?rate=20000/h").rate == "20000/hour"
    assert parse_relay_url("smtp://h").rate is None
    assert parse_relay_url("smtp://h?daily=50000").daily == 50000
    assert parse_relay_url("smtp://h?rate=10/s&daily=5").windows() == ("10/second", "5/day")
    assert parse_relay_url("smtp://h").windows() == ()
    assert parse_relay_url("smtp://h?ehlo=[192.0.2.1]").ehlo_name == "[192.0.2.1]"


def test_defaults() -> None:
    config = parse_relay_url("smtp://h")
    assert (config.max_messages, config.pipelining, config.ca_file) == (100, True, None)
    assert config.data_timeout >= 600  # RFC 5321 4.5.3.2.6


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://mail.example.com", "scheme must be smtp:// or smtps://"),
        ("mail.example.com:25", "scheme must be smtp:// or smtps://"),
        ("smtp://", "no host"),
        ("smtp://:25", "no host"),
        ("smtp://h:99999", "bad port"),
        ("smtp://h:port", "bad port"),
        ("smtp://h%3Aabc", "bad port"),
        ("smtp://h%3A70000", "bad port"),
        ("smtp://h%3A25:26", "give the port once"),
        ("smtp://my host", "bad host"),
        ("smtp://h?tls=maybe", "tls must be one of none, starttls, opportunistic"),
        ("smtp://h?tls=implicit", "write smtps://"),
        ("smtp://h:465", "smtps://host:465"),
        ("smtps://h?tls=starttls", "smtps:// is implicit TLS"),
        ("smtp://h?tls=none&tls=starttls", "given twice"),
        ("smtp://h?colour=blue", "unknown option 'colour'"),
        ("smtp://h?timeout=soon", "timeout must be a number of seconds"),
        ("smtp://h?timeout=0", "timeout must be more than 0 seconds"),
        ("smtp://h?data_timeout=-1", "data_timeout must be more than 0"),
        ("smtp://h?connect_timeout=nan", "connect_timeout must be more than 0"),
        ("smtp://h?idle=inf", "idle must be 0 or more"),
        ("smtp://h?max_messages=0", "max_messages must be a whole number of 1 or more"),
        ("smtp://h?max_messages=1.5", "max_messages must be a whole number"),
        ("smtp://h?pipelining=maybe", "pipelining must be on or off"),
        ("smtp://h?ehlo=bad%20name", "ehlo must be a host name"),
        ("smtp://h?ehlo=x%0D%0AQUIT", "ehlo must be a host name"),
        ("smtp://h?ca_file=", "ca_file is empty"),
        ("smtp://h?rate=100", "rate must be messages per second, minute or hour, such as 100/s"),
        ("smtp://h?rate=100/d", "rate must be messages per second"),
        ("smtp://h?rate=0/s", "rate must be messages per second"),
        ("smtp://h?daily=0", "daily must be a whole number of 1 or more"),
        ("smtp://h?daily=lots", "daily must be a whole number"),
        ("smtp://user@h", "has no password"),
        ("smtp://:secret@h", "empty user name"),
        ("smtp://h/path", "percent-encode"),
    ],
)
def test_bad_urls_say_what_to_fix(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace("+", r"\+")):
        parse_relay_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "smtp://user:s3cr%23t@h:587",  # unencoded '#' would start a fragment
        "smtp://user:s3cr#t@h:587",
        "smtp://user:s3cr/t@h:587",
        "smtp://user:s3cr?t@h:587",
        "smtp://user:s3cr@h:99999",
        "smtp://user:s3cr@h?tls=wrong",
        "smtp://user:s3cr@h?unknown=s3cr",
    ],
)
def test_errors_never_show_the_password(url: str) -> None:
    try:
        config = parse_relay_url(url)
    except ValueError as exc:
        assert "s3cr" not in str(exc)
    else:
        assert "s3cr" not in repr(config)


def test_redacted_and_repr_hide_the_password() -> None:
    config = parse_relay_url("smtp://us%40er:hunter2%40@mail.example.com:587")
    assert config.redacted() == "smtp://us%40er:***@mail.example.com:587?tls=starttls"
    assert "hunter2" not in repr(config)
    assert "hunter2" not in str(config)
    assert "hunter2" not in config.name
    smtps = parse_relay_url("smtps://u:hunter2@mail.example.com")
    assert smtps.redacted() == "smtps://u:***@mail.example.com:465"
    assert parse_relay_url("smtp://h?tls=none").redacted() == "smtp://h:25?tls=none"
    ipv6 = parse_relay_url("smtp://[2001:db8::1]:25?tls=none")
    assert (ipv6.name, ipv6.redacted()) == ("[2001:db8::1]:25", "smtp://[2001:db8::1]:25?tls=none")


def test_redacted_url_parses_back_to_the_same_relay() -> None:
    config = parse_relay_url("smtp://u:pw@mail.example.com:2525?tls=starttls")
    again = parse_relay_url(config.redacted())
    assert (again.host, again.port, again.tls, again.username) == (
        config.host,
        config.port,
        config.tls,
        config.username,
    )


def test_at_sign_in_an_option_value_is_fine() -> None:
    assert parse_relay_url("smtp://h?ca_file=/etc/ca@corp.pem").ca_file == "/etc/ca@corp.pem"
