"""Small helpers shared by tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from mailer import db, templates
from mailer.models import Attempt, Delivery


def add_template(
    name: str = "welcome",
    subject: str = "Hello {{ name }}",
    text: str = "Hi {{ name }}, this is {{ email }}.\n",
    html: str | None = None,
) -> int:
    with db.session_scope() as session:
        return templates.add(session, name, subject, text, html).version


def deliveries(**where: Any) -> list[Delivery]:
    with db.session_scope() as session:
        query = select(Delivery).order_by(Delivery.id)
        for key, value in where.items():
            query = query.where(getattr(Delivery, key) == value)
        return list(session.scalars(query))


def states() -> dict[str, str]:
    return {d.recipient: d.state.value for d in deliveries()}


def attempts_of(recipient: str) -> list[Attempt]:
    with db.session_scope() as session:
        return list(
            session.scalars(
                select(Attempt)
                .join(Delivery, Attempt.delivery_id == Delivery.id)
                .where(Delivery.recipient == recipient)
                .order_by(Attempt.id)
            )
        )


def count(model: Any) -> int:
    with db.session_scope() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
