"""Recipient domains as a small, fixed set of groups for metric labels: the big mailbox
providers by domain, everything else "other" (one label a domain would grow without bound)."""

from __future__ import annotations

OTHER = "other"

# domains each provider receives mail for; a company's own domain hosted by one of them
# (Google Workspace, Microsoft 365) counts as "other": only its MX would tell
_PROVIDERS: dict[str, tuple[str, ...]] = {
    "gmail": ("gmail.com", "googlemail.com"),
    "microsoft": (
        "outlook.com",
        "hotmail.com",
        "live.com",
        "msn.com",
        "hotmail.co.uk",
        "hotmail.fr",
        "hotmail.de",
        "hotmail.it",
        "hotmail.es",
        "live.co.uk",
        "live.fr",
        "live.de",
        "live.nl",
        "outlook.fr",
        "outlook.de",
    ),
    "yahoo": (
        "yahoo.com",
        "ymail.com",
        "rocketmail.com",
        "yahoo.co.uk",
        "yahoo.fr",
        "yahoo.de",
        "yahoo.it",
        "yahoo.es",
        "yahoo.co.jp",
        "yahoo.com.br",
        "aol.com",
    ),
    "apple": ("icloud.com", "me.com", "mac.com"),
    "proton": ("proton.me", "protonmail.com", "pm.me"),
    "gmx": ("gmx.de", "gmx.net", "gmx.com", "gmx.at", "gmx.ch", "web.de"),
    "yandex": ("yandex.ru", "yandex.com", "ya.ru"),
    "mailru": ("mail.ru", "bk.ru", "inbox.ru", "list.ru"),
    "qq": ("qq.com", "163.com", "126.com"),
}

BY_DOMAIN: dict[str, str] = {d: group for group, domains in _PROVIDERS.items() for d in domains}
GROUPS: tuple[str, ...] = (*_PROVIDERS, OTHER)


def group(recipient: str) -> str:
    """The group of an address's domain (the part after its last "@")."""
    return BY_DOMAIN.get(recipient.rpartition("@")[2].lower(), OTHER)
