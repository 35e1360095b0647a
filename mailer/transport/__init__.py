"""Ways to hand a composed message to a mail server: SMTP for real, memory for tests."""
