"""The error tree: one root, each error carrying what a user needs to fix it."""

from __future__ import annotations


class MailerError(Exception):
    """Root of every error mailer raises on purpose; the CLI prints these as one line."""


class ConfigError(MailerError):
    """A setting is missing or malformed; `variable` names the environment variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(variable, problem)
        self.variable = variable
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.variable}: {self.problem}"


class InputError(MailerError):
    """Something a producer handed over cannot become mail; nothing was written."""


class InvalidAddress(InputError):
    def __init__(self, address: str, reason: str) -> None:
        super().__init__(address, reason)
        self.address = address
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid address {self.address!r}: {self.reason}"


class HeaderInjection(InputError):
    """A header value would carry CR, LF or NUL (directly or inside an RFC 2047 word)."""

    def __init__(self, header: str, value: str) -> None:
        super().__init__(header, value)
        self.header = header
        self.value = value

    def __str__(self) -> str:
        shown = self.value if len(self.value) <= 60 else self.value[:57] + "..."
        return (
            f"header {self.header!r} would contain a line break or NUL ({shown!r}); "
            "remove CR, LF and NUL characters from the value"
        )


class TemplateError(InputError):
    """A template does not compile, or does not render with the given context."""


class NotFound(MailerError):
    """A named template, campaign or message does not exist."""


class RelayError(MailerError):
    """The SMTP relay cannot be used as configured (TLS, AUTH, HELO): mail stays queued."""

    def __init__(self, step: str, reason: str, code: int | None = None, reply: str = "") -> None:
        super().__init__(step, reason, code, reply)
        self.step = step
        self.reason = reason
        self.code = code
        self.reply = reply

    def __str__(self) -> str:
        server = f" (server said: {self.code} {self.reply})" if self.code else ""
        return f"relay unusable at {self.step}: {self.reason}{server}"


class DatabaseUnavailable(MailerError):
    """The database did not answer within the retry budget."""


class PermissionDenied(MailerError):
    """The actor's role does not allow this action (a viewer acts on nothing)."""
