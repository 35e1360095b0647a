"""The README says what the code does: every setting and every command is documented."""

from __future__ import annotations

from pathlib import Path

import click

from mailer.cli import cli
from mailer.config import VARIABLES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_in_the_configuration_table() -> None:
    for name, default, meaning in VARIABLES:
        row = f"| `{name}` | `{default}` | {meaning} |" if default else f"| `{name}` | (none) |"
        assert row in README, f"README's configuration table lacks or misstates {name}"


def _commands(group: click.Group, prefix: str = "mailer") -> list[str]:
    out = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out += _commands(command, f"{prefix} {name}")
        else:
            out.append(f"{prefix} {name}")
    return out


def _documented() -> set[str]:
    """Commands named in README code spans: `mailer campaign pause\\|resume ID` gives two."""
    found = set()
    for span in README.split("`")[1::2]:
        words = span.split()
        if not words or words[0] != "mailer":
            continue
        stems = [["mailer"]]
        for word in words[1:]:
            if not word[:1].islower() or word.startswith("-"):
                break  # an argument (ID, NAME) or an option: the command ends here
            stems = [[*stem, part] for stem in stems for part in word.split("\\|")]
        found |= {" ".join(stem) for stem in stems}
    return found


def test_every_command_is_in_the_command_table() -> None:
    missing = [command for command in _commands(cli) if command not in _documented()]
    assert missing == []
