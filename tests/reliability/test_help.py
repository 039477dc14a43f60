"""Help of every subcommand: each option explained, each default shown once and never as "(default: None)"."""

from __future__ import annotations

import re

import pytest

from motif_video.cli import COMMANDS, build_parser

PARSER = build_parser()
SUBCOMMANDS = next(a for a in PARSER._actions if a.__class__.__name__ == "_SubParsersAction").choices


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_help_shows_each_default_once(name):
    text = SUBCOMMANDS[name].format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for block in re.split(r"\n  (?=-)", text):
        assert block.count("(default:") <= 1, block


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_option_has_help(name):
    missing = [a.option_strings or a.dest for a in SUBCOMMANDS[name]._actions if a.help is None]
    assert missing == []


def test_every_listed_command_is_registered():
    assert {c.replace("_", "-") for c in COMMANDS} <= set(SUBCOMMANDS)
