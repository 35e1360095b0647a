"""Dashboard accounts: add, list, remove, change a password, check a login (argon2 hashes)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from mailer.errors import InputError, NotFound
from mailer.models import Role, User

# argon2id with the library's defaults (RFC 9106's second recommended set)
_hasher = PasswordHasher()
# verified against when the name is unknown, so that a login takes as long either way
_DUMMY_HASH = _hasher.hash("not a password anyone has")
MIN_PASSWORD = 10
MAX_NAME = 100


@dataclass(frozen=True)
class Account:
    """What the web layer knows of a user: never the hash itself."""

    name: str
    role: Role
    # changes when the password does, so that a new password ends the sessions of the old one
    stamp: str

    def may(self, needed: Role) -> bool:
        return _RANK[self.role] >= _RANK[needed]


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def _account(user: User) -> Account:
    stamp = hashlib.sha256(user.password_hash.encode()).hexdigest()[:16]
    return Account(user.name, user.role, stamp)


def check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME or not name.isprintable() or any(c.isspace() for c in name):
        raise InputError(f"a user name is 1 to {MAX_NAME} printable characters without spaces")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise InputError(f"a password needs at least {MIN_PASSWORD} characters")
    return password


def add(session: Session, name: str, role: Role, password: str, now: datetime) -> Account:
    name = check_name(name)
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise InputError(f"user {name!r} exists already (change its password: mailer user passwd)")
    user = User(
        name=name,
        role=role,
        password_hash=_hasher.hash(check_password(password)),
        created_at=now,
        updated_at=now,
    )
    session.add(user)
    session.flush()
    return _account(user)


def listing(session: Session) -> list[tuple[str, Role, datetime]]:
    """Every account: a handful of rows, read whole."""
    rows = session.execute(select(User.name, User.role, User.created_at).order_by(User.name))
    return [(name, role, created) for name, role, created in rows]


def remove(session: Session, name: str) -> None:
    result = session.execute(delete(User).where(User.name == name))
    if not getattr(result, "rowcount", 0):
        raise NotFound(f"no user {name!r}")


def set_password(session: Session, name: str, password: str, now: datetime) -> None:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user {name!r}")
    user.password_hash = _hasher.hash(check_password(password))
    user.updated_at = now


def get(session: Session, name: str) -> Account | None:
    """The account of `name` (by the unique index on users.name), or None."""
    user = session.scalar(select(User).where(User.name == name))
    return None if user is None else _account(user)


def authenticate(session: Session, name: str, password: str, now: datetime) -> Account | None:
    """The account when the password is right; None otherwise, in about the same time."""
    user = session.scalar(select(User).where(User.name == name)) if name else None
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
        user.updated_at = now
    return _account(user)


def same_stamp(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
