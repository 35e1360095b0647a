"""Reading the server's replies off smtplib's buffer: the one place that knows how it reads.

smtplib.SMTP reads every reply through `SMTP.file`, a buffered reader over the socket that its
getreply() makes on first use (the greeting's); EHLO, STARTTLS and AUTH are read through it.
The session's own replies (MAIL, RCPT, DATA, the final ".") must come from that same buffer, as
a second reader would miss what the first has buffered. The usual reply, one line already in
the buffer, is parsed here straight from `SMTP.file` (peek() and read()), as getreply would
parse it but without its per-line work; anything else goes to getreply() itself. The internals
relied on: the attribute `SMTP.file` and its being a buffered reader (peek), and the value of
smtplib._MAXLINE, the longest reply line smtplib accepts. (bounded.py's socket factory,
_get_socket, is the only other part of smtplib a session reaches behind.)
"""

from __future__ import annotations

import smtplib

from mailer.replies import SMTPReply
from mailer.transport.wire import reply_of

_MAXLINE = 8192  # smtplib._MAXLINE

# A server answers MAIL, RCPT and DATA with the same few lines message after message: each is
# parsed once per process, then found by the line as read (a bounded number of them; a server
# that echoes the address in every reply fills the table once, then its replies are parsed
# each time).
envelope_replies: dict[bytes, SMTPReply] = {}
_ENVELOPE_REPLIES_KEPT = 256


def read_reply(
    smtp: smtplib.SMTP, seen: dict[bytes, SMTPReply] | None = None
) -> tuple[SMTPReply, bool]:
    """The next reply, and whether the one after it is already buffered whole: a complete line
    that ends its reply, which getreply reads without a wait whatever it says (so reading it
    needs no timeout of its own). `seen` keeps the replies already parsed, by their line."""
    file = smtp.file
    if file is not None:
        buffered = file.peek()
        end = buffered.find(b"\n", 0, _MAXLINE)
        if end > 2 and buffered[3:4] != b"-" and buffered[:3].isdigit():
            line = file.read(end + 1)
            following = buffered.find(b"\n", end + 1, end + 1 + _MAXLINE)
            whole = following > end + 4 and buffered[end + 4 : end + 5] != b"-"
            if seen is not None and (reply := seen.get(line)) is not None:
                return reply, whole
            reply = reply_of(int(line[:3]), line[4:].strip(b" \t\r\n"))
            if seen is not None and len(seen) < _ENVELOPE_REPLIES_KEPT:
                seen[line] = reply  # a tuple: safe to share between sessions and threads
            return reply, whole
    code, text = smtp.getreply()
    return reply_of(code, text), False
