"""What every case sends: one newsletter template (~2 KB once composed), its recipients, and the
pre-built message of the baselines. Shared by the mailer producer, the naive Celery task and
the raw clients so that every case moves messages of the same shape and size."""

from __future__ import annotations

from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

TEMPLATE = "bench-news"
TXN_TEMPLATE = "bench-reset"
SENDER = "news@bench.example.com"

SUBJECT = "Bench news for {{ name }}: issue {{ issue }}"

_PARA = (
    "This month we shipped faster queues, clearer reports and fewer surprises. "
    "Thank you for reading, and for the notes you send back; every one is read. "
)

TEXT = (
    "Hello {{ name }},\n\n"
    + (_PARA * 4).strip()
    + "\n\n"
    + "Read the whole issue: https://example.com/issues/{{ issue }}?r={{ token }}\n\n"
    + "You receive this because you subscribed as {{ email }}.\n"
    + "Unsubscribe: https://example.com/u/{{ token }}\n"
)

HTML = (
    "<html><body><p>Hello {{ name }},</p><p>"
    + (_PARA * 3).strip()
    + '</p><p><a href="https://example.com/issues/{{ issue }}?r={{ token }}">Read the issue</a>'
    + '</p><p><a href="https://example.com/u/{{ token }}">Unsubscribe</a></p></body></html>\n'
)

HEADERS = {"List-Unsubscribe": "<https://example.com/u/{{ token }}>"}

TXN_SUBJECT = "Reset your password"
TXN_TEXT = "Hello,\n\nreset your password here: {{ link }}\n\nIf you did not ask, ignore this.\n"


def recipient(i: int) -> dict[str, str]:
    return {
        "email": f"r{i:07d}@bench{i % 20}.example.com",
        "name": f"Reader {i}",
        "token": f"{i * 2654435761 % 2**32:08x}",
        "issue": "42",
    }


def recipients(n: int) -> Iterator[dict[str, str]]:
    return (recipient(i) for i in range(n))


def write_csv(path: Path, n: int) -> None:
    """The same n recipients as a CSV file with a header line, as `mailer campaign send`
    reads them."""
    columns = list(recipient(0))
    with path.open("w", encoding="utf-8") as out:
        out.write(",".join(columns) + "\n")
        for start in range(0, n, 10_000):
            rows = (recipient(i) for i in range(start, min(n, start + 10_000)))
            out.write("".join(",".join(row[c] for c in columns) + "\n" for row in rows))


def _render(source: str, context: dict[str, str]) -> str:
    # the baselines do not need Jinja2: plain substitution of {{ key }}
    for key, value in context.items():
        source = source.replace("{{ " + key + " }}", value)
    return source


def build_message(i: int = 0) -> bytes:
    """The baselines' pre-built message: the template rendered for recipient i, text + HTML,
    as a typical client would compose it."""
    ctx = recipient(i)
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = ctx["email"]
    msg["Subject"] = _render(SUBJECT, ctx)
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain="bench.example.com")
    msg["List-Unsubscribe"] = _render(HEADERS["List-Unsubscribe"], ctx)
    msg.set_content(_render(TEXT, ctx))
    msg.add_alternative(_render(HTML, ctx), subtype="html")
    data = msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data


if __name__ == "__main__":
    print(len(build_message()), "bytes")
