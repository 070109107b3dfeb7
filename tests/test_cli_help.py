"""Every option of every subcommand says what it does; positionals are described (issue 21)."""
from __future__ import annotations

import argparse

from rsitr.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield path + (name,), None, helps.get(name)
                yield from _walk(sub, path + (name,))
        else:
            yield path, action, action.help


def test_every_option_has_help():
    missing = []
    for path, action, text in _walk(build_parser(), ("rsitr",)):
        if action is not None and isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if not text or text == argparse.SUPPRESS or not str(text).strip():
            what = "subcommand" if action is None else ("/".join(action.option_strings) or f"positional {action.dest}")
            missing.append(f"{' '.join(path)}: {what}")
    assert not missing, "options without a help text:\n" + "\n".join(missing)


def test_search_does_not_offer_sar():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["search"]
    rerank = next(a for a in sub._actions if "--rerank" in a.option_strings)
    assert "sar" not in rerank.choices
    assert "SAR" in rerank.help  # the reason stays in the help
