"""classify() against replies as real servers send them, and SMTPReply parsing.

Texts are written as smtplib returns them (the reply code dropped from every line, lines joined
by "\\n"), except where a row says it is the raw wire form. Each row's last field says why the
class is right; it is part of the test id.
"""

from __future__ import annotations

import pytest

from mailer.replies import Phase, ReplyClass, ReplyCode, SMTPReply, classify

P = Phase
C = ReplyClass
LOST = None  # the code of a row whose "reply" is SMTPReply.lost(text)
GSMTP = "d2e1a72fcca58-6e2b1f0b7a0si1234567pfh.123 - gsmtp"  # Gmail's trailer
EOP = "[BN8NAM12FT045.eop-nam12.prod.protection.outlook.com 2026-11-28T10:00:00.000Z]"

# (code, text, phase, expected class, why)
ROWS: list[tuple[int | None, str, Phase, ReplyClass, str]] = [
    # --- accepted ----------------------------------------------------------------------------
    (250, "2.0.0 Ok: queued as 4XyZ1k2Lmnz3Q", P.DOT, C.DELIVERED, "Postfix took the message"),
    (250, f"2.0.0 OK  1764324000 {GSMTP}", P.DOT, C.DELIVERED, "Gmail took the message"),
    (
        250,
        "2.6.0 <20261128.1234@mail.example.org> [InternalId=123456789, "
        "Hostname=AM0PR01MB1234.eurprd01.prod.exchangelabs.com] 15234 bytes in 0.123, "
        "120.9 KB/sec Queued mail for delivery",
        P.DOT,
        C.DELIVERED,
        "Exchange Online took the message",
    ),
    (250, "OK id=1t2AbC-000123-4d", P.DOT, C.DELIVERED, "Exim: 250 without enhanced code"),
    (
        251,
        "2.1.5 User not local; will forward to <alice@example.net>",
        P.RCPT,
        C.DELIVERED,
        "251: the server takes responsibility for forwarding",
    ),
    # --- the relay closes or slows us down: relay-wide, no attempt spent ----------------------
    (
        421,
        f"4.7.0 Try again later, closing connection. (EHLO) {GSMTP}",
        P.EHLO,
        C.THROTTLED,
        "Gmail rate limit before any transaction: 4.7.x refines 421",
    ),
    (
        421,
        f"4.7.0 Try again later, closing connection. (MAIL) {GSMTP}",
        P.MAIL,
        C.THROTTLED,
        "Gmail rate limit at MAIL: the session ends, the relay rests",
    ),
    (
        421,
        "mx.example.com Service not available, closing transmission channel",
        P.GREETING,
        C.CONNECTION,
        "421 at the greeting without enhanced code: retry the relay later",
    ),
    (
        421,
        "Too many concurrent SMTP connections from this IP address; please try again later.",
        P.GREETING,
        C.CONNECTION,
        "Exim smtp_accept_max_per_host: a bare 421 is about the session",
    ),
    (
        421,
        "4.4.5 Server busy, try again later.",
        P.GREETING,
        C.CONNECTION,
        "Gmail busy: 4.4.x is not a policy status",
    ),
    (
        421,
        "4.3.2 Service shutting down, closing transmission channel",
        P.RCPT,
        C.CONNECTION,
        "Postfix shutting down mid-transaction: reconnect later",
    ),
    (
        421,
        "4.4.2 mx.example.com Error: timeout exceeded",
        P.DOT,
        C.CONNECTION,
        "421 after the dot is a refusal, not a lost reply: defer, not ambiguous",
    ),
    (
        421,
        "4.7.28 [203.0.113.7      15] Our system has detected an unusual rate of\n"
        "4.7.28 unsolicited mail originating from your IP address. To protect our\n"
        "4.7.28 users from spam, mail sent from your IP address has been temporarily\n"
        "4.7.28 rate limited. For more information, go to\n"
        f"4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError {GSMTP}",
        P.RCPT,
        C.THROTTLED,
        "Gmail IP rate limit (multi-line)",
    ),
    (
        421,
        "4.7.0 [TSS04] Messages from 203.0.113.7 temporarily deferred due to unexpected "
        "volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
        P.MAIL,
        C.THROTTLED,
        "Yahoo volume deferral",
    ),
    (
        451,
        "4.7.500 Server busy. Please try again later from [203.0.113.7]. (S77714) " + EOP,
        P.RCPT,
        C.THROTTLED,
        "Outlook 4.7.500 server busy: slow the relay down",
    ),
    (
        451,
        "4.7.650 The mail server [203.0.113.7] has been temporarily rate limited due to IP "
        "reputation. For e-mail delivery information, see https://postmaster.live.com (S775) "
        "[Name=Protocol Filter Agent][AGT=PFA][MxId=11BA1234]",
        P.RCPT,
        C.THROTTLED,
        "Outlook IP reputation rate limit",
    ),
    (
        454,
        "4.7.0 TLS not available due to local problem",
        P.TLS,
        C.THROTTLED,
        "Postfix STARTTLS temporarily broken: temporary and relay-wide",
    ),
    (
        451,
        "4.7.1 Service unavailable - try again later",
        P.DATA,
        C.THROTTLED,
        "Plesk greylisting without the word: indistinguishable from a rate limit; harmless, "
        "the relay rests briefly and no attempt is spent",
    ),
    # --- transient: deferred with backoff ----------------------------------------------------
    (
        450,
        "4.2.1 The user you are trying to contact is receiving mail at a rate that\n"
        "4.2.1 prevents additional messages from being delivered. Please resend your\n"
        "4.2.1 message at a later time. If the user is able to receive mail at that\n"
        "4.2.1 time, your message will be delivered. For more information, please\n"
        f"4.2.1  https://support.google.com/mail/?p=ReceivingRate {GSMTP}",
        P.RCPT,
        C.TRANSIENT,
        "Gmail: this one user receives mail too fast; not the relay's fault",
    ),
    (
        450,
        "4.2.0 <bob@example.com>: Recipient address rejected: Greylisted, see "
        "http://postgrey.schweikert.ch/help/example.com.html",
        P.RCPT,
        C.TRANSIENT,
        "postgrey through Postfix (4.2.0)",
    ),
    (
        450,
        "4.7.1 <bob@example.com>: Recipient address rejected: Greylisted, see "
        "http://postgrey.schweikert.ch/help/example.com.html",
        P.RCPT,
        C.TRANSIENT,
        "postgrey 4.7.1: greylisting is per sender/recipient pair, not a relay throttle",
    ),
    (
        451,
        "4.7.1 Greylisting in progress, please try again later",
        P.RCPT,
        C.TRANSIENT,
        "Exim greylist ACL",
    ),
    (
        451,
        "4.7.1 Greylisting in action, please come back in 00:05:00",
        P.RCPT,
        C.TRANSIENT,
        "milter-greylist (Sendmail)",
    ),
    (
        451,
        "203.0.113.7 is not yet authorized to deliver mail from <news@example.org> to "
        "<bob@example.com>. Please try later.",
        P.RCPT,
        C.TRANSIENT,
        "greylistd (Exim): a bare 451",
    ),
    (
        452,
        "4.2.2 The email account that you tried to reach is over quota. Please direct\n"
        f"4.2.2 the recipient to\n4.2.2  https://support.google.com/mail/?p=OverQuotaTemp {GSMTP}",
        P.RCPT,
        C.TRANSIENT,
        "Gmail mailbox full, temporary",
    ),
    (451, "4.3.0 Error: queue file write error", P.DOT, C.TRANSIENT, "Postfix local trouble"),
    (452, "4.3.1 Insufficient system storage", P.MAIL, C.TRANSIENT, "Postfix disk full"),
    (
        450,
        "4.1.8 <news@example.org>: Sender address rejected: Domain not found",
        P.RCPT,
        C.TRANSIENT,
        "Postfix: our sender's domain did not resolve (yet), reported at RCPT",
    ),
    (451, "Temporary local problem - please try later", P.DOT, C.TRANSIENT, "Exim, bare 451"),
    (
        451,
        "Internal resource temporarily unavailable - "
        "https://community.mimecast.com/docs/DOC-1369#451 [aBcDeFgHiJ.uk123]",
        P.RCPT,
        C.TRANSIENT,
        "Mimecast temporary failure",
    ),
    (
        455,
        "4.5.4 Server unable to accommodate parameters",
        P.MAIL,
        C.TRANSIENT,
        "455: MAIL parameters not accepted now",
    ),
    (
        552,
        "5.2.2 The email account that you tried to reach is over quota. Please direct\n"
        f"5.2.2 the recipient to\n5.2.2  https://support.google.com/mail/?p=OverQuotaPerm {GSMTP}",
        P.RCPT,
        C.TRANSIENT,
        "552 5.2.2 mailbox full: transient by policy (DESIGN)",
    ),
    (
        552,
        "5.2.2 <bob@example.com> Quota exceeded (mailbox for user is full)",
        P.DOT,
        C.TRANSIENT,
        "Dovecot LMTP mailbox full after the dot: still transient by policy",
    ),
    (
        552,
        "Requested mail action aborted: exceeded storage allocation",
        P.RCPT,
        C.TRANSIENT,
        "bare 552 to RCPT is mailbox full (RFC 5321 text)",
    ),
    (
        552,
        "1 Requested mail action aborted, mailbox not found",
        P.RCPT,
        C.TRANSIENT,
        "Yahoo's non-standard bare 552: mailbox full by policy, retried until it expires",
    ),
    # --- too many recipients: the rest in a new transaction ----------------------------------
    (
        452,
        "4.5.3 Your message has too many recipients. For more information regarding\n"
        "4.5.3 Google's sending limits, visit\n"
        f"4.5.3  https://support.google.com/mail/?p=TooManyRecipientsError {GSMTP}",
        P.RCPT,
        C.TOO_MANY_RECIPIENTS,
        "Gmail 452 4.5.3",
    ),
    (
        452,
        "4.5.3 Error: too many recipients",
        P.RCPT,
        C.TOO_MANY_RECIPIENTS,
        "Postfix smtpd_recipient_limit",
    ),
    (
        452,
        "Too many recipients",
        P.RCPT,
        C.TOO_MANY_RECIPIENTS,
        "RFC 5321 4.5.3.1.10: a bare 452 saying so",
    ),
    (
        552,
        "5.5.3 Too many recipients",
        P.RCPT,
        C.TOO_MANY_RECIPIENTS,
        "552 with x.5.3 on RCPT (older servers)",
    ),
    # --- hard bounce: bounced and suppressed --------------------------------------------------
    (
        550,
        "5.1.1 The email account that you tried to reach does not exist. Please try\n"
        "5.1.1 double-checking the recipient's email address for typos or\n"
        "5.1.1 unnecessary spaces. For more information, go to\n"
        f"5.1.1  https://support.google.com/mail/?p=NoSuchUser {GSMTP}",
        P.RCPT,
        C.HARD_BOUNCE,
        "Gmail user unknown",
    ),
    (
        550,
        "5.1.1 RESOLVER.ADR.RecipNotFound; not found",
        P.RCPT,
        C.HARD_BOUNCE,
        "Exchange user unknown",
    ),
    (
        550,
        "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient bob@contoso.com not found by SMTP "
        "address lookup",
        P.RCPT,
        C.HARD_BOUNCE,
        "Outlook 5.1.10 recipient not found (two-digit detail)",
    ),
    (
        550,
        "5.1.1 <bob@example.com>: Recipient address rejected: User unknown in local "
        "recipient table",
        P.RCPT,
        C.HARD_BOUNCE,
        "Postfix local user unknown",
    ),
    (
        550,
        "5.1.1 <bob@example.com>: Recipient address rejected: User unknown in relay "
        "recipient table",
        P.RCPT,
        C.HARD_BOUNCE,
        "Postfix relay recipient table: 'relay' in the text is no relay denial",
    ),
    (550, "5.1.1 User Unknown", P.RCPT, C.HARD_BOUNCE, "Proofpoint user unknown"),
    (550, "5.1.1 <bob@example.com>... User unknown", P.RCPT, C.HARD_BOUNCE, "Sendmail"),
    (
        550,
        "5.1.2 <bob@nonexistent.example>: Recipient address rejected: Domain not found",
        P.RCPT,
        C.HARD_BOUNCE,
        "5.1.2 the recipient's domain does not exist",
    ),
    (
        551,
        "5.1.6 User has moved; please try <bob@example.net>",
        P.RCPT,
        C.HARD_BOUNCE,
        "551 with 5.1.6: mailbox moved",
    ),
    (
        553,
        "5.1.3 The recipient address <bob@@example.com> is not a valid RFC 5321\n"
        f"5.1.3 address. For more information, go to\n"
        f"5.1.3  https://support.google.com/a/answer/3221692 {GSMTP}",
        P.RCPT,
        C.HARD_BOUNCE,
        "Gmail 553 5.1.3 bad address syntax",
    ),
    (
        556,
        "5.1.10 <bob@example.com>: Recipient address rejected: Domain example.com does not "
        "accept mail (nullMX)",
        P.RCPT,
        C.HARD_BOUNCE,
        "Postfix: the recipient's domain publishes a null MX (RFC 7505)",
    ),
    # --- message failure: failed, nothing suppressed ------------------------------------------
    (
        550,
        "550-5.7.1 [203.0.113.7      12] Our system has detected that this message is\r\n"
        "550-5.7.1 likely unsolicited mail. To reduce the amount of spam sent to Gmail,\r\n"
        "550-5.7.1 this message has been blocked. For more information, go to\r\n"
        f"550 5.7.1  https://support.google.com/mail/?p=UnsolicitedMessageError {GSMTP}",
        P.DOT,
        C.MESSAGE_FAILURE,
        "Gmail spam block, raw wire form: 5.7.x policy",
    ),
    (
        550,
        "5.7.26 Unauthenticated email from example.org is not accepted due to\n"
        "5.7.26 domain's DMARC policy. Please contact the administrator of example.org\n"
        "5.7.26 domain if this was a legitimate mail. To learn about the DMARC\n"
        f"5.7.26 initiative, go to\n5.7.26  https://support.google.com/mail/?p=DmarcRejection "
        f"{GSMTP}",
        P.DOT,
        C.MESSAGE_FAILURE,
        "Gmail DMARC rejection",
    ),
    (
        550,
        "5.7.26 This mail has been blocked because the sender is unauthenticated.\n"
        "5.7.26 Gmail requires all senders to authenticate with either SPF or DKIM.\n"
        "5.7.26\n5.7.26  Authentication results:\n5.7.26  DKIM = did not pass\n"
        "5.7.26  SPF [example.org] with ip: [203.0.113.7] = did not pass\n5.7.26\n"
        f"5.7.26  https://support.google.com/mail/answer/81126#authentication {GSMTP}",
        P.DOT,
        C.MESSAGE_FAILURE,
        "Gmail unauthenticated mail",
    ),
    (
        554,
        "5.7.26 Message rejected: unauthenticated email from example.org is not accepted "
        "due to domain's DMARC policy",
        P.DOT,
        C.MESSAGE_FAILURE,
        "554 5.7.26 DMARC from a filtering gateway",
    ),
    (
        550,
        "5.7.1 Unfortunately, messages from [203.0.113.7] weren't sent. Please contact your "
        "Internet service provider since part of their network is on our block list (S3150). "
        "You can also refer your provider to "
        "http://mail.live.com/mail/troubleshooting.aspx#errors. " + EOP,
        P.MAIL,
        C.MESSAGE_FAILURE,
        "Outlook block list: 5.7.x policy",
    ),
    (
        554,
        "5.7.1 Service unavailable; Client host [203.0.113.7] blocked using zen.spamhaus.org; "
        "https://www.spamhaus.org/query/ip/203.0.113.7",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "Postfix RBL reject, delayed to RCPT: 5.7.x policy, the address is fine",
    ),
    (
        554,
        "5.7.9 Message not accepted for policy reasons.  See "
        "https://postmaster.yahooinc.com/error-codes",
        P.DOT,
        C.MESSAGE_FAILURE,
        "Yahoo policy rejection",
    ),
    (
        553,
        "5.7.2 [TSS09] All messages from 203.0.113.7 will be permanently deferred; Retrying "
        "will NOT succeed. See https://postmaster.yahooinc.com/error-codes",
        P.MAIL,
        C.MESSAGE_FAILURE,
        "Yahoo 553 with 5.7.x: policy, not the address",
    ),
    (
        550,
        "5.7.60 SMTP; Client does not have permissions to send as this sender",
        P.MAIL,
        C.MESSAGE_FAILURE,
        "Exchange send-as refused: about our sender",
    ),
    (
        553,
        "5.1.7 The sender address <news@@example.org> is not a valid RFC 5321 address. " + GSMTP,
        P.MAIL,
        C.MESSAGE_FAILURE,
        "5.1.7 is the sender's address: no recipient is suppressed",
    ),
    (
        554,
        "5.1.0 Sender denied",
        P.MAIL,
        C.MESSAGE_FAILURE,
        "Exchange sender filter: an address status at MAIL is about our sender",
    ),
    (
        550,
        "5.1.90 Your message can't be sent because you've reached your daily limit for "
        "message recipients. " + EOP,
        P.RCPT,
        C.MESSAGE_FAILURE,
        "Outlook.com 5.1.90 is our quota, not the recipient: only registered X.1.y suppress",
    ),
    (
        553,
        "5.1.8 <news@example.org>: Sender address rejected: Domain not found",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "Postfix sender check reported at RCPT (smtpd_delay_reject): our sender, not them",
    ),
    (
        550,
        "5.1.0 <news@example.org>: Sender address rejected: User unknown in local recipient table",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "Postfix reject_unlisted_sender at RCPT: 5.1.0 is no recipient verdict",
    ),
    (
        550,
        "5.1.1 <news@example.org>: Sender address rejected: User unknown in local sender table",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "5.1.1 about the sender at RCPT: suppressing every recipient would be a disaster",
    ),
    (
        550,
        "Verification failed for <news@example.org>\nUnrouteable address\nSender verify failed",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "Exim sender verification (multi-line, bare 550)",
    ),
    (
        550,
        "5.1.1 <bob@example.com>: Recipient address rejected: User unknown",
        P.DOT,
        C.MESSAGE_FAILURE,
        "5.1.1 after the dot covers every accepted recipient alike: none is suppressed",
    ),
    (
        552,
        "5.3.4 Message size exceeds fixed limit",
        P.MAIL,
        C.MESSAGE_FAILURE,
        "Postfix: refused at MAIL because of SIZE= (too big)",
    ),
    (
        552,
        "5.3.4 Your message exceeded Google's message size limits. For more information, "
        f"visit\n5.3.4  https://support.google.com/mail/?p=MaxSizeError {GSMTP}",
        P.DOT,
        C.MESSAGE_FAILURE,
        "Gmail message too big",
    ),
    (
        552,
        "5.2.3 Message size exceeds maximum value",
        P.DOT,
        C.MESSAGE_FAILURE,
        "Sendmail 5.2.3 message length over the limit",
    ),
    (
        552,
        "Message size exceeds maximum permitted",
        P.DOT,
        C.MESSAGE_FAILURE,
        "Exim too big, bare 552 after the dot",
    ),
    (
        550,
        "5.2.1 The email account that you tried to reach is disabled.\n"
        f"5.2.1  https://support.google.com/mail/?p=DisabledUser {GSMTP}",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "Gmail disabled account: 5.2.1 is not a 5.1.x address verdict",
    ),
    (
        550,
        "5.2.1 The user you are trying to contact is receiving mail at a rate that\n"
        "5.2.1 prevents additional messages from being delivered. For more information,\n"
        f"5.2.1 go to\n5.2.1  https://support.google.com/mail/?p=ReceivingRatePerm {GSMTP}",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "Gmail uses 5.2.1 for a busy recipient too: why 5.2.1 never suppresses",
    ),
    (
        550,
        "5.4.1 Recipient address rejected: Access denied. For more information see "
        "https://aka.ms/EXOSmtpErrors " + EOP,
        P.RCPT,
        C.MESSAGE_FAILURE,
        "Exchange Online directory-based edge blocking: 5.4.x is routing, not address",
    ),
    (
        550,
        "5.4.5 Daily user sending limit exceeded. For more information on Gmail\n"
        f"5.4.5 sending limits go to\n5.4.5  https://support.google.com/a/answer/166852 {GSMTP}",
        P.MAIL,
        C.MESSAGE_FAILURE,
        "Gmail as relay, daily quota: permanent for this message",
    ),
    (
        550,
        "Requested action not taken: mailbox unavailable",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "bare 550 (RFC 5321 text) covers policy too: no suppression without 5.1.x",
    ),
    (
        550,
        "5.5.0 Requested action not taken: mailbox unavailable (S2017062302). " + EOP,
        P.RCPT,
        C.MESSAGE_FAILURE,
        "Outlook.com 5.5.0 adds nothing to the bare 550",
    ),
    (
        550,
        "Message rejected as spam by Content Filtering.",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "bare 550 spam at RCPT: the address is fine",
    ),
    (
        550,
        "Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550 [aBcDeF.uk123]",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "Mimecast bare 550: no enhanced code, no suppression",
    ),
    (
        550,
        "sorry, no mailbox here by that name. (#5.1.1)",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "qmail's trailing (#5.1.1) is not an RFC 3463 leading code: not suppressed",
    ),
    (
        551,
        "User not local; please try <bob@example.net>",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "bare 551: DESIGN suppresses only 550/551/553 with 5.1.x",
    ),
    (
        554,
        "Email rejected due to security policies - "
        "https://community.mimecast.com/docs/DOC-1369#554 [aBcDeF.uk123]",
        P.DOT,
        C.MESSAGE_FAILURE,
        "Mimecast content policy after the dot",
    ),
    (
        554,
        "Message rejected: Email address is not verified. The following identities failed "
        "the check in region US-EAST-1: news@example.org",
        P.DOT,
        C.MESSAGE_FAILURE,
        "Amazon SES as relay: the sender identity, bare 554",
    ),
    (
        554,
        "delivery error: dd This user doesn't have a yahoo.com account (bob@yahoo.com) [0] - "
        "mta1234.mail.gq1.yahoo.com",
        P.DOT,
        C.MESSAGE_FAILURE,
        "Yahoo user unknown after the dot, bare 554: not suppressed",
    ),
    # --- disagreeing class digits: judged by the basic code alone -----------------------------
    (
        550,
        "4.2.2 <bob@example.com>: mailbox is full",
        P.RCPT,
        C.MESSAGE_FAILURE,
        "5xx with 4.x.x: judged as a bare 550",
    ),
    (
        450,
        "5.1.1 <bob@example.com>: Recipient address rejected: User unknown",
        P.RCPT,
        C.TRANSIENT,
        "4xx with 5.x.x: judged as a bare 450, retried, never suppressed",
    ),
    (
        451,
        "5.7.1 Please try again later",
        P.RCPT,
        C.TRANSIENT,
        "4xx with 5.7.x: a bare 451, not a 4.7.x throttle",
    ),
    # --- configuration: relay paused, recipients stay queued ----------------------------------
    (
        554,
        "5.7.1 <bob@example.com>: Relay access denied",
        P.RCPT,
        C.CONFIGURATION,
        "Postfix relay access denied: our relay setup or credentials",
    ),
    (
        454,
        "4.7.1 <bob@example.com>: Relay access denied",
        P.RCPT,
        C.CONFIGURATION,
        "Postfix defer_unauth_destination: relay denied, temporary form",
    ),
    (
        550,
        "5.7.1 <bob@example.com>... Relaying denied. Proper authentication required.",
        P.RCPT,
        C.CONFIGURATION,
        "Sendmail relaying denied",
    ),
    (550, "relay not permitted", P.RCPT, C.CONFIGURATION, "Exim relay not permitted"),
    (
        550,
        "5.7.54 SMTP; Unable to relay recipient in non-accepted domain",
        P.RCPT,
        C.CONFIGURATION,
        "Exchange unable to relay",
    ),
    (
        553,
        "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)",
        P.RCPT,
        C.CONFIGURATION,
        "qmail's relay denial: a 553 that must not suppress the recipient",
    ),
    (
        535,
        "5.7.8 Username and Password not accepted. For more information, go to\n"
        f"5.7.8  https://support.google.com/mail/?p=BadCredentials {GSMTP}",
        P.AUTH,
        C.CONFIGURATION,
        "Gmail bad credentials",
    ),
    (
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
        "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. " + EOP,
        P.AUTH,
        C.CONFIGURATION,
        "Office 365 SMTP AUTH disabled",
    ),
    (
        530,
        f"5.7.0 Must issue a STARTTLS command first. {GSMTP}",
        P.MAIL,
        C.CONFIGURATION,
        "Gmail wants STARTTLS before MAIL: our TLS setting",
    ),
    (
        530,
        "5.7.57 Client not authenticated to send mail. " + EOP,
        P.MAIL,
        C.CONFIGURATION,
        "Office 365 authentication required",
    ),
    (
        534,
        "5.7.9 Application-specific password required. For more information, go to\n"
        f"5.7.9  https://support.google.com/mail/?p=InvalidSecondFactor {GSMTP}",
        P.AUTH,
        C.CONFIGURATION,
        "Gmail app password required",
    ),
    (
        538,
        "5.7.11 Encryption required for requested authentication mechanism",
        P.AUTH,
        C.CONFIGURATION,
        "RFC 4954 538",
    ),
    (554, "No SMTP service here", P.GREETING, C.CONFIGURATION, "554 greeting: no service for us"),
    (
        554,
        "Blocked - see https://ipcheck.proofpoint.com/?ip=203.0.113.7",
        P.GREETING,
        C.CONFIGURATION,
        "Proofpoint IP block at the greeting: a person must act",
    ),
    (
        501,
        "5.5.4 Syntax: EHLO hostname",
        P.EHLO,
        C.CONFIGURATION,
        "a 50x before any transaction is our set-up (EHLO name), not the recipients' fault",
    ),
    # --- protocol: failed, logged as a bug ----------------------------------------------------
    (500, "5.5.2 Error: command not recognized", P.MAIL, C.PROTOCOL, "Postfix 500"),
    (
        501,
        "5.1.3 Bad recipient address syntax",
        P.RCPT,
        C.PROTOCOL,
        "Postfix 501: our RCPT syntax; the validator should have refused it",
    ),
    (502, f"5.5.1 Unrecognized command. {GSMTP}", P.DATA, C.PROTOCOL, "Gmail 502"),
    (503, "5.5.1 Error: need RCPT command", P.DATA, C.PROTOCOL, "Postfix bad sequence"),
    (
        504,
        "5.5.2 <mailer>: Helo command rejected: need fully-qualified hostname",
        P.RCPT,
        C.PROTOCOL,
        "Postfix 504 delayed to RCPT",
    ),
    (555, "5.5.4 Unsupported option: SMTPUTF8", P.MAIL, C.PROTOCOL, "Postfix 555"),
    (
        354,
        "End data with <CR><LF>.<CR><LF>",
        P.RCPT,
        C.PROTOCOL,
        "an intermediate reply where a verdict was due",
    ),
    (-1, "", P.MAIL, C.PROTOCOL, "an empty line instead of a reply: smtplib's code -1"),
    (
        -1,
        "Dovecot ready.",
        P.GREETING,
        C.CONFIGURATION,
        "'+OK Dovecot ready.': a POP3 server greets, wrong port (-1)",
    ),
    (
        -1,
        "queued as 4XyZ1k2Lmnz3Q",
        P.DOT,
        C.AMBIGUOUS,
        "'Ok: queued as ...' without a code (-1) after the dot: it may have been stored",
    ),
    # --- no reply at all (SMTPReply.lost) -----------------------------------------------------
    (LOST, "timed out waiting for the server", P.DOT, C.AMBIGUOUS, "lost after the dot"),
    (
        LOST,
        "SMTPServerDisconnected: Connection unexpectedly closed",
        P.DOT,
        C.AMBIGUOUS,
        "closed after the dot: maybe stored",
    ),
    (
        LOST,
        "SMTPServerDisconnected: Connection unexpectedly closed",
        P.BODY,
        C.CONNECTION,
        "lost before the dot went out: nothing was stored",
    ),
    (
        LOST,
        "SMTPServerDisconnected: Connection unexpectedly closed",
        P.MAIL,
        C.CONNECTION,
        "lost at MAIL",
    ),
    (
        LOST,
        "ConnectionResetError: [Errno 104] Connection reset by peer",
        P.RCPT,
        C.CONNECTION,
        "lost at RCPT",
    ),
    (LOST, "no reply to DATA", P.DATA, C.CONNECTION, "lost at DATA"),
    (
        LOST,
        "ConnectionRefusedError: [Errno 111] Connection refused",
        P.CONNECT,
        C.CONNECTION,
        "connection refused",
    ),
    (LOST, "timed out waiting for the server", P.CONNECT, C.CONNECTION, "connect timeout"),
    (
        LOST,
        "the server's certificate is not trusted (self-signed certificate); for a private CA "
        "set ca_file=/path/ca.pem in MAILER_SMTP_URL",
        P.TLS,
        C.CONFIGURATION,
        "certificate does not verify",
    ),
    (
        LOST,
        "the server does not offer STARTTLS and tls=starttls requires it; nothing was sent",
        P.TLS,
        C.CONFIGURATION,
        "TLS required but not offered",
    ),
    (
        LOST,
        "the server offers no AUTH; check the port, or remove the user from the URL",
        P.AUTH,
        C.CONFIGURATION,
        "AUTH not offered",
    ),
    (
        LOST,
        "message is 31457280 bytes; the server accepts at most 26214400 (SIZE)",
        P.LOCAL,
        C.MESSAGE_FAILURE,
        "refused here: too big for the server's SIZE",
    ),
    (
        LOST,
        "an address is not ASCII and the server does not offer SMTPUTF8",
        P.LOCAL,
        C.MESSAGE_FAILURE,
        "refused here: SMTPUTF8 missing",
    ),
]


def _reply(code: int | None, text: str) -> SMTPReply:
    return SMTPReply.lost(text) if code is None else SMTPReply.of(code, text)


@pytest.mark.parametrize(
    ("code", "text", "phase", "expected", "why"),
    ROWS,
    ids=[f"{code or 'lost'}@{phase.value}: {why}" for code, _, phase, _, why in ROWS],
)
def test_classify(
    code: int | None, text: str, phase: Phase, expected: ReplyClass, why: str
) -> None:
    assert classify(_reply(code, text), phase) is expected, why


def test_the_table_is_large_and_covers_every_class_and_phase() -> None:
    assert len(ROWS) >= 45
    assert {row[3] for row in ROWS} == set(ReplyClass)
    assert {row[2] for row in ROWS} == set(Phase)


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("code", [-1, 0, 199, 220, 252, 334, 421, 499, 500, 559, 599, 600])
def test_classify_answers_for_any_code_and_phase(code: int, phase: Phase) -> None:
    assert isinstance(classify(SMTPReply.of(code, "x"), phase), ReplyClass)


# --- SMTPReply ---------------------------------------------------------------------------------


def test_of_takes_the_enhanced_code_from_the_first_line_of_a_multiline_text() -> None:
    text = "5.7.1 [203.0.113.7] Our system has detected that this message is\n5.7.1 likely spam"
    reply = SMTPReply.of(550, text)
    assert reply.enhanced == "5.7.1"
    assert reply.text == text
    assert reply.code == 550


def test_of_drops_reply_codes_left_on_wire_lines() -> None:
    reply = SMTPReply.of(550, "550-5.7.1 first line\r\n550-5.7.1 second\r\n550 5.7.1 last\r\n")
    assert reply.text == "5.7.1 first line\n5.7.1 second\n5.7.1 last"
    assert reply.enhanced == "5.7.1"


def test_of_keeps_numbers_that_are_not_the_reply_code() -> None:
    reply = SMTPReply.of(250, "2.0.0 Ok: queued as 550")
    assert reply.text == "2.0.0 Ok: queued as 550"
    assert SMTPReply.of(421, "450 is not our code").text == "450 is not our code"


def test_of_accepts_bytes_as_smtplib_returns_them() -> None:
    reply = SMTPReply.of(250, b"2.0.0 Ok: queued as 4XyZ1k2Lmnz3Q")
    assert reply == SMTPReply(250, "2.0.0 Ok: queued as 4XyZ1k2Lmnz3Q", "2.0.0")
    assert SMTPReply.of(550, b"5.1.1 caf\xc3\xa9 inconnu").text == "5.1.1 café inconnu"
    assert SMTPReply.of(550, b"5.1.1 bad \xff byte").text == "5.1.1 bad \ufffd byte"


def test_of_accepts_a_reply_code_by_name() -> None:
    reply = SMTPReply.of(ReplyCode.MAILBOX_UNAVAILABLE, "550-5.1.1 gone\n550 5.1.1 really")
    assert (reply.code, reply.text, reply.enhanced) == (550, "5.1.1 gone\n5.1.1 really", "5.1.1")


@pytest.mark.parametrize(
    ("text", "enhanced"),
    [
        ("5.1.10 RESOLVER.ADR.RecipientNotFound; not found", "5.1.10"),
        ("  4.7.650 The mail server has been temporarily rate limited  ", "4.7.650"),
        ("5.7.1: blocked", "5.7.1"),
        ("2.0.0", "2.0.0"),
        ("Requested action not taken: mailbox unavailable", None),
        ("203.0.113.7 is not yet authorized to deliver mail", None),
        ("1.2.3 is not a class", None),
        ("5.1.1.2 looks like an address", None),
        ("sorry, no mailbox here by that name. (#5.1.1)", None),  # qmail: not at the start
        ("[TSS04] 4.7.0 later in the text", None),
        ("", None),
    ],
)
def test_of_extracts_only_a_leading_rfc3463_code(text: str, enhanced: str | None) -> None:
    assert SMTPReply.of(550, text).enhanced == enhanced


def test_lost_has_no_code_and_says_why() -> None:
    reply = SMTPReply.lost("timed out waiting for the server")
    assert (reply.code, reply.enhanced) == (None, None)
    assert str(reply) == "(no reply: timed out waiting for the server)"
    assert str(SMTPReply.of(250, "2.0.0 Ok")) == "250 2.0.0 Ok"


@pytest.mark.parametrize("klass", list(ReplyClass))
def test_relay_wide_is_the_relay_not_the_recipient(klass: ReplyClass) -> None:
    relay_faults = {C.THROTTLED, C.CONNECTION, C.CONFIGURATION}
    assert klass.relay_wide is (klass in relay_faults)
