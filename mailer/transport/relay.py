"""The relay URL: parse `smtp://user:pass@host:port?tls=...` into a RelayConfig.

Error messages never repeat the URL's password: config.py shows them to the operator.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlsplit

TLSMode = Literal["none", "starttls", "opportunistic", "implicit"]

_SMTP_PORT = 25
_SUBMISSION_PORT = 587
_SMTPS_PORT = 465
_MAX_PORT = 65535
_TLS_CHOICES = ("none", "starttls", "opportunistic")
_BAD_HOST = re.compile(r"[\s/\\@?#\[\]%\x00-\x1f\x7f]")
_EHLO_NAME = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f.:IPv]+\]")
_ENCODE = (
    "unexpected '/', '?' or '#' before the host, or after it: percent-encode them in the user "
    "and password (/ as %2F, ? as %3F, # as %23, @ as %40)"
)
_SWITCH = {"on": True, "true": True, "yes": True, "1": True}
_SWITCH |= {"off": False, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class RelayConfig:
    host: str
    port: int
    tls: TLSMode
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ehlo_name: str | None = None
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    # RFC 5321 4.5.3.2.6: wait at least 10 minutes for the reply to the final "."
    data_timeout: float = 600.0
    ca_file: str | None = None
    max_messages: int = 100
    idle_noop_after: float = 5.0
    pipelining: bool = True
    # messages a second, minute or hour across every worker (mailer.hooks.shaping), as the
    # `limits` library reads it ("100/second"); None: no limit
    rate: str | None = None
    # messages in any 24 hours across every worker; None: no cap
    daily: int | None = None

    @property
    def name(self) -> str:
        """The relay's identity in the database and in logs: never carries credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def windows(self) -> tuple[str, ...]:
        """The relay's limits as mailer.hooks.shaping keeps them; empty: none."""
        found = (self.rate, f"{self.daily}/day" if self.daily else None)
        return tuple(limit for limit in found if limit is not None)

    def redacted(self) -> str:
        """The URL to show: the password is replaced by ***."""
        scheme = "smtps" if self.tls == "implicit" else "smtp"
        user = f"{quote(self.username, safe='')}:***@" if self.username else ""
        query = "" if self.tls == "implicit" else f"?tls={self.tls}"
        return f"{scheme}://{user}{self.name}{query}"


def parse_relay_url(url: str) -> RelayConfig:
    """Parse a relay URL; raises ValueError with a message that says what to fix."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("smtp", "smtps"):
        raise ValueError(f"scheme must be smtp:// or smtps://, got {parts.scheme or 'none'!r}")
    if parts.fragment or parts.path not in ("", "/"):
        raise ValueError(_ENCODE)
    options = _query(parts.query)
    host, port = _host_and_port(parts)
    tls = _tls_mode(scheme, options.pop("tls", None), port)
    if not port:
        port = {"implicit": _SMTPS_PORT, "starttls": _SUBMISSION_PORT}.get(tls, _SMTP_PORT)
    username, password = _credentials(parts)
    return RelayConfig(
        host=host, port=port, tls=tls, username=username, password=password, **_options(options)
    )


def _host_and_port(parts: SplitResult) -> tuple[str, int]:
    hostport = parts.netloc.rpartition("@")[2]
    try:
        port = parts.port or 0
    except ValueError:
        raise ValueError(
            "bad port: write host:port with a port from 1 to 65535 (a user and password go "
            "before an @)"
        ) from None
    host = unquote(parts.hostname or "")
    if not port and host.count(":") == 1:
        # the `host:port` form smtplib.SMTP.connect accepts, here percent-encoded in the host
        host, _, port_text = host.partition(":")
        if not port_text.isdigit() or int(port_text) > _MAX_PORT:
            raise ValueError("bad port: a port is a number from 1 to 65535")
        port = int(port_text)
    if not host:
        raise ValueError("no host: write e.g. smtp://mail.example.com:587")
    if ":" in host:
        _ipv6(host, hostport)
    elif _BAD_HOST.search(host):
        raise ValueError(f"bad host {host!r}: write a host name or address, e.g. mail.example.com")
    return host, port


def _ipv6(host: str, hostport: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(
            f"bad host {hostport!r}: give the port once, and an IPv6 address in brackets"
        ) from None


def _credentials(parts: SplitResult) -> tuple[str | None, str | None]:
    if parts.username is None:
        return None, None
    username = unquote(parts.username)
    if not username:
        raise ValueError("empty user name: write smtp://user:password@host, or no @ at all")
    if parts.password is None:
        raise ValueError(
            f"user {username!r} has no password: write smtp://user:password@host "
            "(percent-encode : / @ # ? in either)"
        )
    return username, unquote(parts.password)


def _query(query: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if "@" in key:  # a "?" in the password: the rest of the URL became the query
            raise ValueError(_ENCODE)
        if key in options:
            raise ValueError(f"option {key!r} is given twice")
        options[key] = value
    return options


def _tls_mode(scheme: str, asked: str | None, port: int) -> TLSMode:
    if scheme == "smtps":
        if asked not in (None, "implicit"):
            raise ValueError("smtps:// is implicit TLS; drop the tls= option")
        return "implicit"
    if asked is None:
        if port == _SMTPS_PORT:
            raise ValueError(
                "port 465 expects TLS from the start: write smtps://host:465 "
                "(or say tls=none/opportunistic/starttls explicitly)"
            )
        return "starttls" if port == _SUBMISSION_PORT else "opportunistic"
    if asked == "implicit":
        raise ValueError("for implicit TLS write smtps://host instead of tls=implicit")
    if asked not in _TLS_CHOICES:
        raise ValueError(f"tls must be one of {', '.join(_TLS_CHOICES)}, got {asked!r}")
    return cast(TLSMode, asked)


_RATE = re.compile(r"(\d+)/(s|m|h)")
_PER = {"s": "second", "m": "minute", "h": "hour"}


def _options(options: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in _PARSERS:
            known = ", ".join(("tls", *_PARSERS))
            raise ValueError(f"unknown option {key!r} (known: {known})")
        field_name, parse = _PARSERS[key]
        out[field_name] = parse(key, value)
    return out


def _ehlo(key: str, value: str) -> str:
    if not _EHLO_NAME.fullmatch(value):
        raise ValueError(f"ehlo must be a host name or [address], got {value!r}")
    return value


def _ca_file(key: str, value: str) -> str:
    if not value:
        raise ValueError("ca_file is empty: give the path of a PEM file")
    return value


def _switch(key: str, value: str) -> bool:
    if value.lower() not in _SWITCH:
        raise ValueError(f"{key} must be on or off, got {value!r}")
    return _SWITCH[value.lower()]


def _idle(key: str, value: str) -> float:
    return _seconds(key, value, allow_zero=True)


def _timeout(key: str, value: str) -> float:
    return _seconds(key, value, allow_zero=False)


def _rate(key: str, value: str) -> str:
    """ "100/s" -> "100/second" (messages a second, minute or hour)."""
    found = _RATE.fullmatch(value.strip().lower())
    if found is None or int(found.group(1)) < 1:
        raise ValueError(
            f"{key} must be messages per second, minute or hour, such as 100/s, 6000/m or "
            f"20000/h, got {value!r}"
        )
    return f"{int(found.group(1))}/{_PER[found.group(2)]}"


def _seconds(key: str, value: str, *, allow_zero: bool) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{key} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        least = "0 or more" if allow_zero else "more than 0"
        raise ValueError(f"{key} must be {least} seconds, got {value!r}")
    return number


def _count(key: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{key} must be a whole number of 1 or more, got {value!r}")
    return int(value)


# option -> (RelayConfig field, parser(key, value)); `tls` is read before these
_PARSERS: dict[str, tuple[str, Any]] = {
    "ehlo": ("ehlo_name", _ehlo),
    "ca_file": ("ca_file", _ca_file),
    "max_messages": ("max_messages", _count),
    "idle": ("idle_noop_after", _idle),
    "pipelining": ("pipelining", _switch),
    "timeout": ("command_timeout", _timeout),
    "connect_timeout": ("connect_timeout", _timeout),
    "data_timeout": ("data_timeout", _timeout),
    "rate": ("rate", _rate),
    "daily": ("daily", _count),
}
