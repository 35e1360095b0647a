"""addresses.parse: the fast path agrees with email-validator on everything it accepts."""

from __future__ import annotations

import random
import re

import email_validator
import pytest

from mailer import addresses
from mailer.errors import InvalidAddress

ALPHABET = "abcXYZ019.-_+@'!#~=?" + "." * 4 + "@" * 2


def _email_validator(raw: str) -> addresses.Address | None:
    try:
        r = email_validator.validate_email(
            raw, check_deliverability=False, allow_smtputf8=True, strict=True
        )
    except email_validator.EmailNotValidError:
        return None
    return addresses.Address(r.normalized, r.domain, r.smtputf8)


def _candidates(n: int) -> list[str]:
    rng = random.Random(1234)
    out = []
    for _ in range(n):
        local = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 70)))
        labels = [
            "".join(rng.choice("abcQ019-") for _ in range(rng.randint(0, 12)))
            for _ in range(rng.randint(1, 4))
        ]
        tld = rng.choice(["com", "ORG", "io", "test", "local", "arpa", "c0m", "x", "museum", ""])
        out.append(f"{local}@{'.'.join([*labels, tld])}")
    return out


def _outcome(raw: str) -> addresses.Address | str:
    try:
        return addresses.parse(raw)
    except InvalidAddress as exc:
        return str(exc)


def test_fast_path_matches_email_validator_on_generated_addresses(monkeypatch) -> None:
    candidates = _candidates(20000)
    fast = [_outcome(raw) for raw in candidates]
    monkeypatch.setattr(addresses, "_PLAIN", re.compile(r"(?!)"))  # email-validator for all
    slow = [_outcome(raw) for raw in candidates]
    assert fast == slow
    assert sum(isinstance(r, addresses.Address) for r in fast) > 250  # the fast path ran


@pytest.mark.parametrize(
    "raw",
    [
        "Ann.Lee+news@Example.COM",
        "o'brien@mail.example.org",
        "a@b.co",
        "x@sub-domain.example.io",
    ],
)
def test_common_addresses(raw: str) -> None:
    assert addresses.parse(raw) == _email_validator(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "a..b@example.com",
        ".a@example.com",
        "a.@example.com",
        "a@-example.com",
        "a@example-.com",
        "a@example.test",
        "a@mail.localhost",
        "a@example",
        "x" * 65 + "@example.com",
        "a@" + "b" * 64 + ".com",
    ],
)
def test_refused_with_email_validators_message(raw: str) -> None:
    with pytest.raises(InvalidAddress) as refused:
        addresses.parse(raw)
    with pytest.raises(email_validator.EmailNotValidError) as reference:
        email_validator.validate_email(raw, check_deliverability=False, strict=True)
    assert str(reference.value) in str(refused.value)
