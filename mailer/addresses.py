"""Addresses: validate and normalise with email-validator (syntax only, no DNS)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import email_validator

from mailer.compose import has_line_break
from mailer.errors import InvalidAddress

MAX_LENGTH = 254  # RFC 5321 4.5.3.1.3: a path is 256 octets, the angle brackets included
# The common case, decided without email-validator: an ASCII dot-atom local part of at most 64
# characters and a host name of letter-digit-hyphen labels under an alphabetic top-level
# domain. Everything this accepts, email-validator accepts and normalises the same way
# (tests/test_addresses.py checks that on generated addresses); anything else, including every
# address it refuses, goes to email-validator, which also writes the error message.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# no leading or trailing hyphen, and no "ab--" (reserved for IDNA, such as xn--)
_LABEL = r"(?!-)(?![A-Za-z0-9]{2}--)[A-Za-z0-9-]{1,63}(?<!-)"
_PLAIN = re.compile(
    rf"(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?P<domain>(?:{_LABEL}\.)+[A-Za-z]{{2,63}})"
)
_SPECIAL_USE = frozenset(email_validator.SPECIAL_USE_DOMAIN_NAMES)


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
    if has_line_break(raw):
        raise InvalidAddress(raw, "contains a line break or NUL")
    if "=?" in raw:
        # mail software decodes RFC 2047 words in headers: the address shown (or a new header
        # line) would differ from the one the mail is sent to
        raise InvalidAddress(raw, "contains '=?', the start of an RFC 2047 encoded word")
    plain = _PLAIN.fullmatch(stripped)
    if plain and len(plain["local"]) <= 64 and not _special_use(domain := plain["domain"].lower()):
        return Address(normalized=f"{plain['local']}@{domain}", domain=domain, smtputf8=False)
    try:
        result = email_validator.validate_email(
            stripped, check_deliverability=False, allow_smtputf8=True, strict=True
        )
    except email_validator.EmailNotValidError as exc:
        raise InvalidAddress(raw, str(exc)) from None
    return Address(normalized=result.normalized, domain=result.domain, smtputf8=result.smtputf8)


@functools.lru_cache(maxsize=4096)  # a list has a few domains for many addresses
def _special_use(domain: str) -> bool:
    """Is the (lower-cased) domain, or a domain above it, one reserved for special use?"""
    labels = domain.split(".")
    return any(".".join(labels[i:]) in _SPECIAL_USE for i in range(len(labels)))
