"""mailer: queued bulk-mail delivery. Producer API: `mailer.send()`, `mailer.send_campaign()`."""

from __future__ import annotations

from typing import Any

__all__ = ["send", "send_campaign"]


def __getattr__(name: str) -> Any:
    # imported on first use, so that `import mailer` stays cheap for the CLI and the tools
    if name in __all__:
        from mailer import enqueue

        return getattr(enqueue, name)
    raise AttributeError(f"module 'mailer' has no attribute {name!r}")
