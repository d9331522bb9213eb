"""The `sepnet` command: every subcommand has --help; user errors are one line and exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sepnet.jobs.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sepnet {command}") and "-h, --help" in out


def test_console_script_and_user_errors():
    # the installed entry point, a user error (missing config): one line on stderr, exit 2, no traceback
    res = subprocess.run([sys.executable, "-m", "sepnet.jobs.cli", "cv", "/nonexistent/study.yaml"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == "sepnet cv: error: /nonexistent/study.yaml: config file not found"
    res = subprocess.run([sys.executable, "-m", "sepnet.jobs.cli", "fingerprint", "/nonexistent"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no fingerprint.json" in res.stderr and "Traceback" not in res.stderr


def test_fingerprint_prints_the_store_summary(trained_study, capsys):
    store = trained_study.parent / "study" / "store"
    assert main(["fingerprint", str(store)]) == 0
    out = capsys.readouterr().out
    assert "4 cases" in out and "Brain_Stem" in out and "spacing (z, y, x) mm" in out
