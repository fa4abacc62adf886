"""`--help` teaches: every option of every command says what it does, and the model commands show examples."""

import argparse

from fusar_edge.cli import _parser


def _commands(parser, prefix=()):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, prefix + (name,))


def test_every_option_has_help_text():
    missing = [f"{' '.join(cmd) or 'fusar-edge'} {a.option_strings or a.dest}"
               for cmd, parser in _commands(_parser()) for a in parser._actions
               if a.help is None and not isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                                                        argparse._SubParsersAction))]
    assert not missing, missing


def test_commands_that_take_a_model_show_examples():
    commands = dict(_commands(_parser()))
    for name in ("ask", "import-fusar-gpt", "export", "train", "eval", "serve", "sample"):
        epilog = commands[(name,)].epilog or ""
        assert "fusar-edge " + name in epilog, f"{name} --help has no example"
