"""The relay URL: parse `smtp://user:pass@host:port?tls=...` into a RelayConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

TLSMode = Literal["none", "starttls", "opportunistic", "implicit"]

_SMTP_PORT = 25
_SUBMISSION_PORT = 587
_SMTPS_PORT = 465
_TLS_CHOICES = ("none", "starttls", "opportunistic")


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

    @property
    def name(self) -> str:
        """The relay's identity in the database and in logs: never carries credentials."""
        return f"{self.host}:{self.port}"

    def redacted(self) -> str:
        scheme = "smtps" if self.tls == "implicit" else "smtp"
        user = f"{quote(self.username, safe='')}:***@" if self.username else ""
        query = "" if self.tls == "implicit" else f"?tls={self.tls}"
        return f"{scheme}://{user}{self.host}:{self.port}{query}"


def parse_relay_url(url: str) -> RelayConfig:
    """Parse a relay URL; raises ValueError with a message that says what to fix."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("smtp", "smtps"):
        raise ValueError(f"scheme must be smtp:// or smtps://, got {parts.scheme or 'none'!r}")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    host = unquote(parts.hostname or "")
    try:
        port = parts.port or 0
    except ValueError as exc:
        raise ValueError(f"bad port in {parts.netloc.rsplit('@', 1)[-1]!r}") from exc
    if not port and host.count(":") == 1:
        # the `host:port` form smtplib.SMTP.connect accepts, here percent-encoded in the host
        host, _, port_text = host.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"bad port {port_text!r}")
        port = int(port_text)
    if not host:
        raise ValueError("no host: write e.g. smtp://mail.example.com:587")

    tls = _tls_mode(scheme, options.pop("tls", None), port)
    if not port:
        port = {"implicit": _SMTPS_PORT, "starttls": _SUBMISSION_PORT}.get(tls, _SMTP_PORT)
    return RelayConfig(
        host=host,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        **_options(options),
    )


def _tls_mode(scheme: str, asked: str | None, port: int) -> TLSMode:
    if scheme == "smtps":
        if asked not in (None, "implicit"):
            raise ValueError("smtps:// is implicit TLS; drop the tls= option")
        return "implicit"
    if asked is None:
        return "starttls" if port == _SUBMISSION_PORT else "opportunistic"
    if asked not in _TLS_CHOICES:
        raise ValueError(f"tls must be one of {', '.join(_TLS_CHOICES)}, got {asked!r}")
    return asked  # type: ignore[return-value]


_FLOAT_OPTIONS = {
    "timeout": "command_timeout",
    "connect_timeout": "connect_timeout",
    "data_timeout": "data_timeout",
    "idle": "idle_noop_after",
}


def _options(options: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in options.items():
        if key in _FLOAT_OPTIONS:
            out[_FLOAT_OPTIONS[key]] = _positive(key, value, float)
        elif key == "max_messages":
            out["max_messages"] = _positive(key, value, int)
        elif key == "ehlo":
            out["ehlo_name"] = value
        elif key == "ca_file":
            out["ca_file"] = value
        elif key == "pipelining":
            if value not in ("on", "off"):
                raise ValueError("pipelining must be on or off")
            out["pipelining"] = value == "on"
        else:
            known = ", ".join(
                ["tls", "ehlo", "ca_file", "max_messages", "pipelining", *_FLOAT_OPTIONS]
            )
            raise ValueError(f"unknown option {key!r} (known: {known})")
    return out


def _positive(key: str, value: str, kind: type[float] | type[int]) -> float | int:
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"{key} must be positive, got {value!r}")
    return number
