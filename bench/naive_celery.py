"""The naive Celery pattern, the usual first implementation of "send mail from a task queue":
one task per message, and each task renders the template, composes the message, opens a new
SMTP connection, sendmail()s and QUITs. No database, no outbox, Celery's defaults otherwise
(early ack, prefetch multiplier 4). Not mailer's app: only the broker is shared in kind.

    worker:   celery -A naive_celery worker --pool prefork --concurrency 2   (cwd bench/)
    publish:  python bench/naive_celery.py publish N   (prints the first publish time, JSON)

Settings come from BENCH_BROKER_URL and BENCH_SMTP_PORT.
"""

from __future__ import annotations

import json
import os
import smtplib
import sys
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import content
import jinja2
from celery import Celery

app = Celery("naive", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/15"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)

_env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_html_env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=True)
_subject = _env.from_string(content.SUBJECT)
_text = _env.from_string(content.TEXT)
_html = _html_env.from_string(content.HTML)
_unsub = _env.from_string(content.HEADERS["List-Unsubscribe"])


@app.task(name="naive.send_one")  # type: ignore[untyped-decorator]
def send_one(context: dict[str, str]) -> None:
    msg = EmailMessage()
    msg["From"] = content.SENDER
    msg["To"] = context["email"]
    msg["Subject"] = _subject.render(context)
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain="bench.example.com")
    msg["List-Unsubscribe"] = _unsub.render(context)
    msg.set_content(_text.render(context))
    msg.add_alternative(_html.render(context), subtype="html")
    smtp = smtplib.SMTP("127.0.0.1", int(os.environ["BENCH_SMTP_PORT"]), timeout=30)
    try:
        smtp.sendmail(content.SENDER, [context["email"]], msg.as_bytes())
    finally:
        smtp.quit()


def publish(n: int) -> None:
    first = time.time()
    with app.producer_or_acquire() as producer:
        for row in content.recipients(n):
            send_one.apply_async(args=[row], producer=producer)
    sys.stdout.write(json.dumps({"first_publish": first, "published": time.time(), "n": n}) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "publish":
        publish(int(sys.argv[2]))
    else:
        sys.exit(__doc__)
