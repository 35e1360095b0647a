"""mailer: queued bulk-mail delivery. The producer API lives here: send() and send_campaign()."""
