"""Test doubles for mailer: a scripted SMTP server that misbehaves on cue."""
