"""Addresses: validate and normalise with email-validator (syntax only, no DNS)."""

from __future__ import annotations

from dataclasses import dataclass

import email_validator

from mailer.errors import InvalidAddress


@dataclass(frozen=True)
class Address:
    normalized: str  # domain lower-cased (and Unicode-normalised); local part kept as written
    domain: str
    smtputf8: bool  # the local part is not ASCII: only a server offering SMTPUTF8 can take it

    @property
    def key(self) -> str:
        """Comparison key for de-duplication and the suppression list."""
        return self.normalized.lower()


def parse(raw: str) -> Address:
    if any(ch in raw for ch in "\r\n\0"):
        raise InvalidAddress(raw, "contains a line break or NUL")
    try:
        result = email_validator.validate_email(
            raw.strip(), check_deliverability=False, allow_smtputf8=True
        )
    except email_validator.EmailNotValidError as exc:
        raise InvalidAddress(raw, str(exc)) from None
    return Address(normalized=result.normalized, domain=result.domain, smtputf8=result.smtputf8)
