"""The CLI documents itself: --version, and a help text (with its default) on every option."""
import argparse
import subprocess
import sys

from effdetr.cli import parser


def test_every_option_of_every_command_has_help_and_shows_its_default():
    top = parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    assert len(subs.choices) >= 12
    for name, sp in subs.choices.items():
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"effdetr {name} {action.option_strings or action.dest}: no help"
        text = sp.format_help()
        for action in sp._actions:
            if action.option_strings and not action.required and action.default not in (None, argparse.SUPPRESS) \
                    and not isinstance(action, argparse._HelpAction):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)
    assert "(default: None)" not in parser().format_help()


def test_version():
    r = subprocess.run([sys.executable, "-m", "effdetr.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("effdetr ") and len(r.stdout.split()) == 2
