"""Addresses: validate and normalise with email-validator (syntax only, no DNS)."""

from __future__ import annotations

from dataclasses import dataclass

import email_validator

from mailer.compose import LINE_BREAK
from mailer.errors import InvalidAddress

MAX_LENGTH = 254  # RFC 5321 4.5.3.1.3: a path is 256 octets, the angle brackets included


@dataclass(frozen=True)
class Address:
    normalized: str  # domain lower-cased (and Unicode-normalised); local part kept as written
    domain: str
    smtputf8: bool  # the local part is not ASCII: only a server offering SMTPUTF8 can take it

    @property
    def key(self) -> str:
        """Comparison key for de-duplication and the suppression list."""
        return self.normalized.lower()


def parse(raw: object) -> Address:
    """The address, or InvalidAddress saying what is wrong with it."""
    if not isinstance(raw, str):
        raise InvalidAddress(repr(raw), f"an address must be a string, not {type(raw).__name__}")
    stripped = raw.strip()
    if not stripped:
        raise InvalidAddress(raw, "the address is empty")
    if len(stripped) > MAX_LENGTH:
        # checked first, and the address shortened in the message: the input may be megabytes
        reason = f"{len(stripped):,} characters long; an address has at most {MAX_LENGTH}"
        raise InvalidAddress(raw[:40] + "...", reason)
    if LINE_BREAK.search(raw):
        raise InvalidAddress(raw, "contains a line break or NUL")
    if "=?" in raw:
        # mail software decodes RFC 2047 words in headers: the address shown (or a new header
        # line) would differ from the one the mail is sent to
        raise InvalidAddress(raw, "contains '=?', the start of an RFC 2047 encoded word")
    try:
        result = email_validator.validate_email(
            stripped, check_deliverability=False, allow_smtputf8=True, strict=True
        )
    except email_validator.EmailNotValidError as exc:
        raise InvalidAddress(raw, str(exc)) from None
    return Address(normalized=result.normalized, domain=result.domain, smtputf8=result.smtputf8)
